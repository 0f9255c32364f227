"""Entry point: ``python -m experiments.train variant=dora variant.rank=8 task=synthetic seed=1``.

Compose the config, check it (bad input: one error line, nothing written), skip if a finished record
exists, build task -> model -> variant, train with the shared trainer, write the record (``ok`` or
``failed``). Multirun (``-m``) runs each job through the same path; a failing job never stops the others.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import platform
import re
import sys
import time
import traceback
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf
from torch import nn

import variants
from experiments import files, records, resume, schema, tasks  # noqa: F401  (schema: the structured configs, on import)
from experiments.hub import Loading, ModelOptions
from experiments.snapshots import Snapshots
from experiments.trainer import OptimConfig, fit, pick_device, reseed, seed_everything, total_steps


class ConfigError(ValueError):
    """The configuration cannot describe a run (bad option, unknown name, targets matching nothing)."""


def _variant(cfg: dict, spec: tasks.TaskSpec) -> variants.Variant:
    """The run's variant, created once: its options, where they are null (``head``, ``train_head``,
    ``targets``: "the task's") the task's head, whether it trains and its default targets."""
    opts = dict(cfg["variant"])
    name = opts.pop("name")
    from_task = {"head": spec.head, "train_head": spec.train_head, "targets": spec.default_targets}
    opts.update({k: v for k, v in from_task.items() if k in opts and opts[k] is None})
    return variants.create(name, **opts)


def _optim(cfg: dict) -> OptimConfig:
    known = set(OptimConfig.__dataclass_fields__)
    unknown = sorted(set(cfg["optim"]) - known)
    if unknown:
        raise ConfigError(f"unknown option optim.{unknown[0]} (options: {', '.join(sorted(known))})")
    optim = OptimConfig(**cfg["optim"])
    optim.validate()
    return optim


def per_variant_lr(cfg: dict) -> dict:
    """``optim.lr`` may map variant names to learning rates, so that one sweep runs each method at its own
    lr (``-m variant=lora,full optim.lr={lora:3e-3,full:5e-5}``; a sweep over several such maps is a
    per-method lr grid). The run takes its variant's value: its config, run id and record are exactly those
    of ``optim.lr=3e-3``."""
    lr, name = cfg["optim"].get("lr"), cfg["variant"].get("name")
    if not isinstance(lr, dict):
        return cfg
    if name not in lr:
        raise ConfigError(f"invalid option optim.lr={{{', '.join(f'{k}:{v}' for k, v in lr.items())}}}: "
                          f"no learning rate for variant {name!r}")
    return {**cfg, "optim": {**cfg["optim"], "lr": lr[name]}}


def _task_options(cfg: dict) -> dict:
    return {k: v for k, v in cfg["task"].items() if k != "name"}


def _model_options(cfg: dict) -> ModelOptions:
    """The top-level ``model`` node (how a task loads its pretrained base), checked."""
    node = dict(cfg.get("model") or {})
    known = set(ModelOptions.__dataclass_fields__)
    unknown = sorted(set(node) - known)
    if unknown:
        raise ConfigError(f"unknown option model.{unknown[0]} (options: {', '.join(sorted(known))})")
    options = ModelOptions(**node)
    options.validate()
    return options


def _filled_by_entry_point(spec: tasks.TaskSpec) -> set[str]:
    """The builder's keyword-only parameters: not task options; ``build`` passes them (``loading``)."""
    return {n for n, p in inspect.signature(spec.build).parameters.items() if p.kind is p.KEYWORD_ONLY}


PATHS = ("results_dir", "cache_dir", "assets_dir")  # top-level directories (the task's follow them)


def expand_paths(cfg: dict) -> dict:
    """``~`` and environment variables expanded in every directory option (top level and the task's)."""
    def expand(v):
        return os.path.expandvars(os.path.expanduser(v)) if isinstance(v, str) else v

    task = {k: expand(v) if k in PATHS else v for k, v in cfg.get("task", {}).items()}
    return {**{k: expand(v) if k in PATHS else v for k, v in cfg.items()}, "task": task}


def _top_level(cfg: dict) -> None:
    """The top-level options: seed, device, bf16, threads_per_job and the directories."""
    seed = cfg.get("seed")
    if not (isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < 2**32):
        raise ConfigError(f"invalid option seed={seed!r}: expected an integer in [0, 2^32)")
    pick_device(str(cfg.get("device", "auto")))
    for key in ("bf16", "force", "save_adapter", "eval_merged", "compile"):
        if not isinstance(cfg.get(key, False), bool):
            raise ConfigError(f"invalid option {key}={cfg[key]!r}: expected true or false")
    every = cfg.get("checkpoint_every", 0)
    if not (isinstance(every, int) and not isinstance(every, bool) and every >= 0):
        raise ConfigError(f"invalid option checkpoint_every={every!r}: expected an integer >= 0 (0: no checkpoints)")
    step = cfg.get("profile_memory", 0)
    if not (isinstance(step, int) and not isinstance(step, bool) and step >= 0):
        raise ConfigError(f"invalid option profile_memory={step!r}: expected an integer >= 0 (the step to profile; "
                          "0: none)")
    steps = cfg.get("snapshot_steps") or []
    if not (isinstance(steps, list) and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in steps)):
        raise ConfigError(f"invalid option snapshot_steps={steps!r}: expected a list of integers >= 0 (the steps "
                          "whose weights to save; 0: before training)")
    threads = cfg.get("threads_per_job")
    if threads is not None and not (isinstance(threads, int) and not isinstance(threads, bool) and threads >= 1):
        raise ConfigError(f"invalid option threads_per_job={threads!r}: expected an integer >= 1")
    for key in PATHS:
        if key in cfg and not (isinstance(cfg[key], str) and cfg[key].strip()):
            raise ConfigError(f"invalid option {key}={cfg[key]!r}: expected a directory (an empty path would "
                              "write into the current folder)")


def claim_dir(option: str, path: str) -> None:
    """Create ``path`` (and ``runs/`` below a results directory) and prove it writable, before any training:
    one ConfigError line for a path that is a file, lies below one, or cannot be written."""
    target = Path(path) / "runs" if option == "results_dir" else Path(path)
    blocker = next((p for p in [Path(path), *Path(path).parents] if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        where = "it is a file" if blocker == Path(path) else f"it lies below the file {blocker}"
        raise ConfigError(f"invalid option {option}={path!r}: cannot write there ({where})")
    try:
        target.mkdir(parents=True, exist_ok=True)
        probe = target / f".lorabench-write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except (OSError, ValueError) as e:
        why = {FileExistsError: "a file is in the way", NotADirectoryError: "it lies below a file",
               PermissionError: "not writable"}.get(type(e), type(e).__name__)
        raise ConfigError(f"invalid option {option}={path!r}: cannot write there ({why}: {e.strerror or e})") from None


def check(cfg: dict) -> tuple[tasks.TaskSpec, variants.Variant]:
    """Everything that can be checked without building the model: the top-level options, the task and its
    option names, the ``model`` node (a task that loads no pretrained transformers model cannot quantize
    one), the variant (created here, once) and the optimisation options."""
    _top_level(cfg)
    spec = tasks.check_options(cfg["task"].get("name"), _task_options(cfg))
    reserved = sorted(_filled_by_entry_point(spec) & set(_task_options(cfg)))
    if reserved:
        raise ConfigError(f"unknown option task.{reserved[0]} for task {spec.name!r} (options: "
                          f"{', '.join(o for o in spec.options if o not in _filled_by_entry_point(spec))})")
    options = _model_options(cfg)
    if not options.default and "loading" not in _filled_by_entry_point(spec):
        bad = "quantize" if options.quantize != "none" else "gradient_checkpointing"
        value = options.quantize if bad == "quantize" else "true"
        able = ", ".join(n for n in tasks.available() if "loading" in _filled_by_entry_point(tasks.get(n)))
        raise ConfigError(f"invalid option model.{bad}={value}: task {spec.name!r} does not load a pretrained "
                          f"transformers model (the tasks that do: {able})")
    variant = _variant(cfg, spec)
    optim = _optim(cfg)
    variant.check_optim(optim.grad_clip, optim.grad_accum)
    return spec, variant


def build(cfg: dict, variant: variants.Variant | None = None) -> tuple[tasks.Task, variants.Variant, nn.Module]:
    """task -> model -> adapted model (the variant from ``check`` unless given). The task's new weights (a
    classifier head) and the adapter's init each draw from their own stream of the run's seed
    (``stream_seed``), never from one shared state."""
    if variant is None:
        _, variant = check(cfg)
    seed = cfg["seed"]
    seed_everything(seed)  # python and numpy; torch's generators are pointed at one stream per use below
    reseed(seed, "model")
    options = _task_options(cfg)
    if "loading" in _filled_by_entry_point(tasks.get(cfg["task"]["name"])):  # a pretrained transformers model
        device = str(pick_device(cfg.get("device", "auto")))
        options["loading"] = Loading(**dataclasses.asdict(_model_options(cfg)), device=device)
    task = tasks.build(cfg["task"]["name"], **options)
    steps = total_steps(_optim(cfg), len(task.train))
    variant.check_steps(steps)  # e.g. AdaLoRA's schedule must fit the run
    late = [t for t in cfg.get("snapshot_steps") or [] if t > steps]
    if late:
        raise ConfigError(f"invalid option snapshot_steps={cfg['snapshot_steps']}: step {late[0]} is beyond the "
                          f"run's {steps} steps")
    if cfg.get("profile_memory", 0) > steps:
        raise ConfigError(f"invalid option profile_memory={cfg['profile_memory']}: step beyond the run's {steps} steps")
    reseed(seed, "adapter")
    model = variant.apply(task.model)
    if cfg.get("snapshot_steps"):
        _snapshot_modules(cfg, variant, model)  # snapshot_targets that match nothing: an error before training
    return task, variant, model


def run(cfg: dict) -> dict:
    """One run from a resolved config dict. Returns the record (also written unless it was skipped).

    Raises ``ConfigError`` for bad input before anything is written (W&B included). While it trains, the
    run holds ``runs/<run_id>.lock``: another process on the same config skips it. SIGINT and SIGTERM
    raise ``resume.Interrupted`` (after an ``interrupted`` record and, with ``checkpoint_every``, a
    checkpoint the next run of the same config resumes from).
    """
    with resume.interruptible() as signals:
        sweep = _sweep_parent()
        if sweep is not None:
            resume.watch_parent(sweep)
        try:
            return _run(cfg)
        except resume.Interrupted as e:
            if sweep is not None and os.getppid() != sweep:  # orphaned: nobody will give this worker a job
                print(f"[lorabench] {e}: the sweep's process {sweep} is gone; this worker exits", file=sys.stderr)
                os._exit(128 + e.signum)
            signals.hand_on(e)  # submitit's SIGUSR2: requeue the job (it resumes from the checkpoint)
            raise


def _sweep_parent() -> int | None:
    """The sweep's process, when this job runs in one of its worker processes (launcher=joblib): the job
    stops when that process is gone, instead of training on for nobody."""
    host, _, pid = os.environ.get(SWEEP_PID, "").rpartition(" ")
    if host == platform.node() and pid.isdigit() and int(pid) != os.getpid() and int(pid) == os.getppid():
        return int(pid)
    return None


SWEEP_PID = "LORABENCH_SWEEP_PID"  # "<host> <pid>", set by the CLI; inherited by the sweep's workers


def _run(cfg: dict) -> dict:
    try:
        cfg = expand_paths(per_variant_lr(cfg))
        _, variant = check(cfg)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    rid = records.run_id(cfg)
    results_dir = cfg["results_dir"]
    try:
        done = records.finished(results_dir, rid)
    except records.NewerRecord as e:
        raise ConfigError(str(e)) from None
    if done and not cfg.get("force", False):
        print(f"[lorabench] skip {rid}: a finished record exists ({records.record_path(results_dir, rid)})")
        return {**records.load(records.record_path(results_dir, rid)), "skipped": True}

    if cfg.get("threads_per_job"):  # parallel sweeps: jobs x threads <= cores
        import torch

        torch.set_num_threads(int(cfg["threads_per_job"]))
    device = str(pick_device(cfg.get("device", "auto")))
    claim_dir("cache_dir", cfg["cache_dir"])  # the task writes its caches there while it is built
    try:
        task, variant, model = build(cfg, variant)
    except ValueError as e:  # bad task option, targets that do not fit the model, missing asset
        raise ConfigError(str(e)) from None
    claim_dir("results_dir", results_dir)  # before training: an unusable results dir never costs a run
    with records.claimed(results_dir, rid, force=cfg.get("force", False)) as mine:
        if not mine:
            print(f"[lorabench] skip {rid}: another process is training it ({records.record_path(results_dir, rid)}"
                  ".lock; force=true takes it over)")
            return {"run_id": rid, "status": "running", "skipped": True}
        if records.finished(results_dir, rid) and not cfg.get("force", False):  # finished while we built
            print(f"[lorabench] skip {rid}: another process finished it meanwhile")
            return {**records.load(records.record_path(results_dir, rid)), "skipped": True}
        return _record_and_train(cfg, rid, task, variant, model, device)


def _snapshot_modules(cfg: dict, variant: variants.Variant, model: nn.Module) -> list[str]:
    """``snapshot_targets`` (resolved on the adapted model), or else the adapted layers, or else (full
    fine-tuning, GaLore: no adapter) the variant's targets or the task's default targets."""
    spec = cfg.get("snapshot_targets")
    if spec is None and not variants.snapshot_modules(model):
        spec = getattr(variant.cfg, "targets", None) or tasks.get(cfg["task"]["name"]).default_targets
    try:
        return variants.snapshot_modules(model, spec, head=variant.cfg.heads)
    except variants.TargetError as e:
        raise ConfigError(f"invalid option snapshot_targets={spec!r}: {e}") from None


def _record_and_train(cfg, rid, task, variant, model, device) -> dict:
    from experiments.wandb_log import WandbRun

    record = {
        "schema": records.SCHEMA, "run_id": rid, "group_id": records.group_id(cfg), "status": "running",
        "error": None, "variant": variant.name, "task": task.name, "model": task.model_name,
        **variant.identity(),  # rank, alpha, scaling, targets: as resolved by apply()
        "lr": cfg["optim"]["lr"], "seed": cfg["seed"], "metrics": None, "history": [], "cost": None,
        "main_metric": task.main_metric, "higher_is_better": task.higher_is_better,
        "directions": task.directions, "trivial": task.trivial, "task_info": task.info, "config": cfg,
        "env": records.environment(device),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    with WandbRun(cfg) as wb:
        _train(cfg, task, variant, model, record, wb)
    return record


def _train(cfg, task, variant, model, record, wb) -> None:
    results_dir, rid = cfg["results_dir"], record["run_id"]
    checkpoint = resume.Checkpoint(records.record_path(results_dir, rid).with_suffix(".ckpt"),
                                   cfg.get("checkpoint_every", 0))
    snapshots = None
    if cfg.get("snapshot_steps"):
        snapshots = Snapshots(records.record_path(results_dir, rid).with_suffix(".snapshots"), cfg["snapshot_steps"],
                              _snapshot_modules(cfg, variant, model), {"variant": variant.name, "run_id": rid})
    if cfg.get("force", False):
        checkpoint.remove()  # force: from the start
        if snapshots is not None:
            snapshots.remove()
    try:
        result = fit(model, variant, task, _optim(cfg), seed=cfg["seed"], device=record["env"]["device"],
                     bf16=cfg.get("bf16", False), progress=cfg.get("progress"), log=wb.log, checkpoint=checkpoint,
                     eval_merged=cfg.get("eval_merged", False), compile=cfg.get("compile", False),
                     snapshots=snapshots, profile_memory=cfg.get("profile_memory", 0))
        if snapshots is not None:
            record["snapshot_dir"] = str(snapshots.directory)
        record.update(result, status="ok")
        state = variant.summary(model)
        if state is not None:
            record["variant_state"] = state
        if cfg.get("save_adapter"):
            adapter_dir = records.record_path(results_dir, rid).with_suffix("")
            saved = {}  # written whole into a folder beside it, then renamed: never half an adapter
            files.replace_dir(adapter_dir, lambda tmp: saved.update(bytes=variant.save_adapter(model, tmp)))
            record["cost"]["adapter_bytes"] = saved["bytes"]
            record["adapter_dir"] = str(adapter_dir)
    except resume.Interrupted as e:  # stopped by a signal: an unfinished record, then stop the process
        record.update(status="interrupted", error={
            "type": "Interrupted", "message": str(e), "step": e.step, "traceback": traceback.format_exc(limit=8),
            "checkpoint": str(checkpoint.path) if checkpoint.path.exists() else None})
        _finish(results_dir, record, wb)
        raise
    except Exception as e:  # the run failed: say so in its record, keep the sweep going
        record.update(status="failed", error={
            "type": type(e).__name__, "message": str(e).splitlines()[0] if str(e) else "",
            "step": getattr(e, "step", None), "traceback": traceback.format_exc(limit=8),
        })
    _finish(results_dir, record, wb)
    checkpoint.remove()  # the record is whole: nothing left to resume


def _finish(results_dir, record: dict, wb) -> None:
    record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    records.write(results_dir, record)
    wb.finish_with(record)


def _print_result(record: dict) -> None:
    if record.get("skipped"):
        return
    if record["status"] == "ok":
        test = ", ".join(f"{k}={v:.4g}" for k, v in record["metrics"]["test"].items())
        c = record["cost"]
        rank = f" rank={record['rank']}" if record["rank"] is not None else ""
        print(f"[lorabench] ok {record['run_id']} {record['variant']}{rank} seed={record['seed']}:"
              f" test {test}; trainable {c['trainable_params']:,} ({c['trainable_pct']:.3f}%),"
              f" {c['step_time_ms']:.1f} ms/step")
    else:
        err = record["error"]
        print(f"[lorabench] FAILED {record['run_id']}: {err['type']}: {err['message']}", file=sys.stderr)


# An absolute path: the same config whether run as `python -m experiments.train` or as the console script.
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    container = OmegaConf.to_container(cfg, resolve=True)
    multirun = _is_multirun()
    try:
        record = run(container)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        if multirun:
            _note_job({"status": "invalid", "error": str(e)})
            return None
        sys.exit(2)
    _print_result(record)
    if multirun:
        status = "skipped" if record.get("skipped") else record["status"]
        err = record.get("error") or {}
        _note_job({"status": status, "run_id": record["run_id"],
                   "error": f"{err.get('type')}: {err.get('message')}" if err else None})
    if record["status"] != "ok" and not multirun and not record.get("skipped"):
        sys.exit(1)
    test = (record.get("metrics") or {}).get("test") or {}
    return next(iter(test.values()), None)  # for sweepers that optimise a returned value


def _note_job(entry: dict) -> None:
    from hydra.core.hydra_config import HydraConfig

    from experiments.callbacks import note_job

    hc = HydraConfig.get()
    note_job(hc.sweep.dir, {"overrides": " ".join(hc.overrides.task), **entry})


def _is_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:
        return False


def cli_problem(argv: list[str]) -> str | None:
    """A bad command line as one line, before Hydra's multi-line report: ``variant=nope``,
    ``-m variant=lora,nope``, ``task.nope=1``. Sweeps are checked value by value for config groups and
    by their first value otherwise; anything this cannot judge is left to Hydra."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType

    try:
        overrides = OverridesParser.create().parse_overrides([a for a in argv if "=" in a and a[0] != "-"])
    except Exception as e:  # noqa: BLE001 - a malformed override: Hydra's parser says where, in one line here
        bad = next((a for a in argv if "=" in a and a[0] != "-" and not _parses(a)), None)
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        return f"malformed override {bad!r}: {first}" if bad else f"malformed override: {first}"
    single = []
    for o in overrides:
        if o.key_or_group.startswith("hydra"):
            continue
        values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.value()]
        group = Path(CONF_DIR) / o.key_or_group
        if group.is_dir() and o.package is None and not o.is_delete():
            for v in values:
                if v is not None and not (group / f"{v}.yaml").exists():
                    options = ", ".join(sorted(p.stem for p in group.glob("*.yaml")))
                    return f"unknown {o.key_or_group} {v!r} (available: {options})"
        prefix = {OverrideType.ADD: "+", OverrideType.FORCE_ADD: "++", OverrideType.DEL: "~"}.get(o.type, "")
        single.append(o.input_line if not o.is_sweep_override() else f"{prefix}{o.key_or_group}={values[0]}")
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            compose("train", overrides=single)
    except Exception as e:  # noqa: BLE001 - report the composition error in one line
        cause = e.__cause__ or e
        lines = [ln.strip().rstrip(".") for ln in f"{e}\n{cause}".splitlines() if ln.strip() and "full_key" not in ln
                 and "object_type" not in ln and "append to your config" not in ln]
        text = ": ".join(dict.fromkeys(lines)) or type(e).__name__
        return re.sub(r"Key '(\w+)' not in '\w+Node'", r"no such option (docs/configuration.md lists them)", text)
    return None


def _parses(arg: str) -> bool:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        OverridesParser.create().parse_overrides([arg])
    except Exception:  # noqa: BLE001
        return False
    return True


def cli() -> None:
    """``lorabench-train`` and ``python -m experiments.train``."""
    from experiments.callbacks import LAST_SWEEP

    problem = cli_problem(sys.argv[1:])
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    LAST_SWEEP.clear()
    os.environ[SWEEP_PID] = f"{platform.node()} {os.getpid()}"
    try:
        main()
    except resume.Interrupted as e:
        print(f"[lorabench] {e}: no finished record for the run; the same command runs it again"
              + (" from its latest checkpoint" if e.step else ""), file=sys.stderr)
        sys.exit(128 + e.signum)
    if LAST_SWEEP.get("failed") or LAST_SWEEP.get("invalid"):  # every job ran; the summary said which failed
        sys.exit(1)


if __name__ == "__main__":
    cli()
