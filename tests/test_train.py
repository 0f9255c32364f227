"""The Hydra entry point, the shared trainer and the run records, on the seconds-long synthetic task."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CONF, compose_config
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import variants
from experiments import records, tasks
from experiments.costs import NAMES as COST_NAMES
from experiments.train import ConfigError, run

ROOT = Path(__file__).resolve().parents[1]
VARIANT_CONFIGS = sorted(p.stem for p in (ROOT / "conf" / "variant").glob("*.yaml"))
TASK_CONFIGS = sorted(p.stem for p in (ROOT / "conf" / "task").glob("*.yaml"))
FAST = ["optim.max_steps=30", "task.n_train=256", "task.n_val=64", "task.n_test=64", "logger=none"]
HUB_TASKS = {t for t in TASK_CONFIGS if tasks.get(t).hub}  # need the Hugging Face hub: composition only
OFFLINE_TASKS = [t for t in TASK_CONFIGS if t not in HUB_TASKS]


def build_task(cfg: dict) -> tasks.Task:
    return tasks.build(cfg["task"]["name"], **{k: v for k, v in cfg["task"].items() if k != "name"})


def config(tmp_path, *overrides) -> dict:
    return compose_config(*overrides, results_dir=tmp_path)


def test_every_registered_variant_has_a_config():
    assert VARIANT_CONFIGS == variants.available()


def test_every_registered_task_has_a_config_and_declares_a_smoke_size_if_offline():
    assert TASK_CONFIGS == tasks.available()
    assert HUB_TASKS == {"glue_sst2", "glue_mrpc", "lm_gsm8k"}
    for name in TASK_CONFIGS:
        spec = tasks.get(name)
        assert set(spec.smoke) <= set(spec.options), name
        assert spec.main_metric in spec.metrics


def _pairs():
    """Every variant x task; lm_file loads the same model as lm, so beyond lora its builds are slow tests."""
    for variant in VARIANT_CONFIGS:
        for task in TASK_CONFIGS:
            slow = task == "lm_file" and variant != "lora"
            yield pytest.param(variant, task, id=f"{variant}-{task}", marks=[pytest.mark.slow] if slow else [])


@pytest.mark.parametrize(("variant", "task"), list(_pairs()))
def test_every_variant_composes_with_every_task_and_builds(variant, task, tmp_path):
    # the session's cache: each task's tokenised data and base scores are computed once, not once per variant
    cfg = compose_config(f"variant={variant}", results_dir=tmp_path, task=task, smoke=True)
    assert cfg["variant"]["name"] == variant and cfg["task"]["name"] == task
    from experiments.train import _variant, check

    check(cfg)
    if task in HUB_TASKS:
        return
    t = build_task(cfg)

    v = _variant(cfg, t.spec)
    if variant == "head" and not t.spec.head:  # the synthetic teacher has no head to probe
        with pytest.raises(variants.VariantError, match="no such module"):
            v.apply(t.model)
        return
    model = v.apply(t.model)
    assert v.cost(model)["trainable_params"] > 0


@pytest.mark.parametrize("variant", [v for v in VARIANT_CONFIGS if v != "head"])  # no head to probe
def test_end_to_end_on_synthetic_writes_an_ok_record(variant, tmp_path):
    record = run(config(tmp_path, f"variant={variant}", *FAST))
    assert record["status"] == "ok", record["error"]
    on_disk = records.load(records.record_path(tmp_path, record["run_id"]))
    assert on_disk["schema"] == 1 and on_disk["variant"] == variant and on_disk["task"] == "synthetic"
    assert set(on_disk["metrics"]) == {"val", "test"} and "fit" in on_disk["metrics"]["test"]
    assert sorted(on_disk["cost"]) == sorted(COST_NAMES)  # every cost a record carries is defined once, in costs.py
    for key in ("trainable_params", "total_params", "trainable_pct", "optimizer_state_bytes",
                "peak_memory_bytes", "train_time_s", "step_time_ms", "adapter_bytes"):
        assert on_disk["cost"][key] is not None, key
    assert on_disk["history"][-1]["step"] == 30 and on_disk["env"]["torch"]


def test_rank_at_least_true_rank_fits_the_teacher_and_lower_rank_cannot(tmp_path):
    fit = {r: run(config(tmp_path, "variant=lora", f"variant.rank={r}", f"variant.alpha={r}", "logger=none",
                         "variant.dropout=0", "task.true_rank=4"))["metrics"]["test"]["fit"] for r in (2, 4)}
    assert fit[4] > 0.99  # the rank-4 update is representable
    assert fit[2] < 0.55  # Eckart-Young: at most 2/4 of an equal-spectrum rank-4 update


def test_rerun_skips_and_force_reruns(tmp_path, capsys):
    first = run(config(tmp_path, *FAST))
    assert run(config(tmp_path, *FAST)).get("skipped")
    assert "skip" in capsys.readouterr().out
    assert not run(config(tmp_path, *FAST, "force=true")).get("skipped")
    assert first["run_id"] == records.run_id(config(tmp_path / "elsewhere", *FAST, "logger=wandb"))


def test_same_config_and_seed_give_identical_metrics(tmp_path):
    a = run(config(tmp_path / "a", "variant=dora", *FAST))
    b = run(config(tmp_path / "b", "variant=dora", *FAST))
    c = run(config(tmp_path / "c", "variant=dora", *FAST, "seed=1"))
    assert a["metrics"] == b["metrics"] and a["history"] == b["history"]
    assert a["metrics"] != c["metrics"]


def test_non_finite_loss_writes_a_failed_record_naming_the_step(tmp_path):
    record = run(config(tmp_path, *FAST, "optim.lr=1e30"))
    assert record["status"] == "failed" and record["error"]["type"] == "NonFiniteLoss"
    assert record["error"]["step"] >= 1 and f"step {record['error']['step']}" in record["error"]["message"]
    assert records.load(records.record_path(tmp_path, record["run_id"]))["status"] == "failed"
    assert not records.finished(tmp_path, record["run_id"])  # a failed run is retried next time


def test_reading_the_loss_every_few_steps_as_on_cuda_changes_nothing_and_still_names_the_bad_step(tmp_path,
                                                                                                 monkeypatch):
    """On CUDA the trainer reads losses (and times steps) once per ``log_every`` steps instead of every
    step; the same bookkeeping, forced on CPU, gives the same record, and a non-finite loss still fails
    the run naming its own step, not the step at which it was read."""
    from experiments import trainer

    common = ["variant=adalora", "variant.tinit=2", "variant.tfinal=2", "optim.log_every=4", *FAST]
    every_step = run(config(tmp_path / "a", *common))
    monkeypatch.setattr(trainer, "SYNC_EVERY_CPU", 4)
    deferred = run(config(tmp_path / "b", *common))
    assert deferred["metrics"] == every_step["metrics"] and deferred["history"] == every_step["history"]
    assert len(deferred["cost"]) == len(every_step["cost"]) and deferred["cost"]["steps"] == 30

    cls, calls = variants.get("lora"), []
    monkeypatch.setattr(cls, "extra_loss", lambda self, model: calls.append(1) or (float("nan") if len(calls) == 7
                                                                                   else 0.0))
    failed = run(config(tmp_path / "c", *FAST))
    assert failed["status"] == "failed" and failed["error"]["step"] == 7, failed["error"]


@pytest.mark.parametrize("override, fragment", [
    ("variant.rank=0", "rank=0"),
    ("optim.lr=0", "optim.lr=0"),
    ("variant.targets=[nothing]", "matched no module"),
    ("+optim.momentum=0.9", "optim.momentum"),
    ("task.true_rank=1000", "task.true_rank=1000"),
    ("+task.bogus=1", "bogus"),
])
def test_bad_input_raises_one_line_and_writes_nothing(override, fragment, tmp_path):
    with pytest.raises(ConfigError) as err:
        run(config(tmp_path, override))
    assert fragment in str(err.value) and "\n" not in str(err.value)
    assert not any(tmp_path.iterdir())


def _cli(tmp_path, *args):
    env = {**os.environ, "WANDB_MODE": "disabled", "LORABENCH_NO_PROGRESS": "1"}
    return subprocess.run([sys.executable, "-m", "experiments.train", *args, f"results_dir={tmp_path}", *FAST],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


def test_cli_bad_input_is_one_error_line_and_exit_2(tmp_path):
    out = _cli(tmp_path, "variant.rank=-2")
    assert out.returncode == 2 and out.stderr.strip().splitlines()[-1] == (
        "error: invalid option rank=-2: expected a positive integer")
    assert "Traceback" not in out.stderr and not any(tmp_path.iterdir())


def test_multirun_2x2_writes_4_records_and_a_failure_does_not_stop_the_sweep(tmp_path):
    out = _cli(tmp_path, "-m", "variant=lora,dora", "variant.rank=2,4")
    assert out.returncode == 0, out.stderr
    runs = [json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*.json")]
    assert len(runs) == 4 and {r["status"] for r in runs} == {"ok"}
    assert {(r["variant"], r["rank"]) for r in runs} == {(v, r) for v in ("lora", "dora") for r in (2, 4)}

    out = _cli(tmp_path, "-m", "variant=lora", "optim.lr=1e30,0.02", "variant.rank=3")
    assert out.returncode == 1, out.stderr  # every job ran; the exit code says one failed
    assert "1 ok, 0 skipped, 1 failed" in out.stdout
    statuses = sorted(json.loads(p.read_text())["status"] for p in (tmp_path / "runs").glob("*.json"))
    assert statuses == ["failed"] + ["ok"] * 5


def test_a_per_variant_lr_map_runs_each_variant_at_its_own_lr_with_the_plain_run_id(tmp_path):
    plain = [run(config(tmp_path, f"variant={v}", f"optim.lr={lr}", *FAST)) for v, lr in (("lora", 3e-3),
                                                                                           ("full", 1e-4))]
    # a sweep over two maps is a per-variant grid; the jobs at the plain runs' lrs are those runs: skipped
    out = _cli(tmp_path, "-m", "variant=lora,full", "optim.lr={lora:1e-3,full:3e-5},{lora:3e-3,full:1e-4}")
    assert out.returncode == 0 and "4 jobs: 2 ok, 2 skipped" in out.stdout, out.stdout
    done = [json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*.json")]
    assert sorted((r["variant"], r["lr"]) for r in done) == [("full", 3e-5), ("full", 1e-4), ("lora", 1e-3),
                                                             ("lora", 3e-3)]
    assert all(r["config"]["optim"]["lr"] == r["lr"] for r in done)  # the record holds the run's own lr
    assert {r["run_id"] for r in plain} < {r["run_id"] for r in done}


def test_a_lr_map_without_the_variant_is_one_error_line(tmp_path):
    with pytest.raises(ConfigError, match=r"optim.lr=\{full:0.0001\}: no learning rate for variant 'lora'"):
        run(config(tmp_path, "variant=lora", "optim.lr={full:1e-4}", *FAST))
    out = _cli(tmp_path, "variant=dora", "optim.lr={lora:1e-3}")
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        "error: invalid option optim.lr={lora:0.001}: no learning rate for variant 'dora'"]
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("task", OFFLINE_TASKS)
def test_building_a_task_does_not_reseed_the_global_rng(task, tmp_path):
    """Else the seed would not reach the adapter's init (a task that reseeds fixes every run's A)."""
    cfg = compose_config(results_dir=tmp_path, cache_dir=tmp_path, task=task, smoke=True)
    after = []
    for seed in (5, 6):
        torch.manual_seed(seed)
        build_task(cfg)
        after.append(torch.rand(4))
    assert not torch.equal(*after)


@pytest.mark.parametrize("args, message", [
    (["variant=nope"], "unknown variant 'nope' (available: adalora, dora, full, galore, head, lora, lora_plus, peft, "
                       "peft_dora, peft_lora, peft_lora_fa, peft_miss, peft_vera)"),
    (["-m", "variant=lora,nope"], "unknown variant 'nope'"),
    (["experiment=nope"], "unknown experiment 'nope'"),
    (["task.nope=1"], "Could not override 'task.nope': no such option (docs/configuration.md lists them)"),
    (["-m", "variant=lora,dora", "optim.nope=1,2"], "Could not override 'optim.nope'"),
])
def test_cli_catches_bad_groups_and_keys_before_hydra_in_one_line(args, message):
    from experiments.train import cli_problem

    problem = cli_problem(args)
    assert problem is not None and problem.startswith(message) and "\n" not in problem


@pytest.mark.parametrize("args", [[], ["-m", "variant=lora,dora", "variant.rank=2,4"], ["experiment=digits_weak_class"],
                                  ["+task.bogus=1"], ["--cfg", "job"], ["hydra.verbose=true"]])
def test_cli_leaves_good_command_lines_alone(args):
    from experiments.train import cli_problem

    assert cli_problem(args) is None  # (+task.bogus is the task's to reject, with its own one-line error)


def test_console_script_is_the_cli():
    from importlib.metadata import entry_points

    from experiments.train import cli

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "lorabench-train"]
    assert script.load() is cli


EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_every_swept_value_is_a_valid_run(experiment, tmp_path):
    from experiments.train import check

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={experiment}"], return_hydra_config=True)
    params = {k: str(v).split(",") for k, v in OmegaConf.to_container(cfg.hydra.sweeper.params).items()}
    assert params, "an experiment should say what it sweeps"
    for variant in params.pop("variant", [cfg.variant.name]):
        check(config(tmp_path, f"experiment={experiment}", f"variant={variant}"))
        for key, values in params.items():
            for value in values:  # each value with each swept variant (e.g. variant.ratio only on lora_plus)
                check(config(tmp_path, f"experiment={experiment}", f"variant={variant}", f"{key}={value}"))


def test_digits_experiment_multirun_writes_one_record_per_job(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "experiments.train", "-m", "experiment=digits_weak_class",
         "variant=head,lora", "seed=0,1", f"results_dir={tmp_path}",  # the command line wins over the experiment
         f"cache_dir={tmp_path / 'cache'}", "logger=none"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
        env={**os.environ, "WANDB_MODE": "disabled", "LORABENCH_NO_PROGRESS": "1"})
    assert out.returncode == 0, out.stderr
    assert "4 jobs: 4 ok, 0 skipped, 0 failed, 0 invalid" in out.stdout
    runs = [json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*.json")]
    assert sorted((r["variant"], r["seed"], r["task"]) for r in runs) == [
        ("head", 0, "digits"), ("head", 1, "digits"), ("lora", 0, "digits"), ("lora", 1, "digits")]
    assert len(list((tmp_path / "cache" / "digits").glob("*.safetensors"))) == 1  # pretrained once


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux's resettable peak RSS")
def test_cpu_peak_memory_is_per_run_not_the_process_lifetime_peak():
    from experiments.trainer import peak_memory_bytes, reset_peak_memory

    cpu = torch.device("cpu")
    big = torch.ones(100_000_000)  # 400 MB
    lifetime = peak_memory_bytes(cpu)
    del big
    reset_peak_memory(cpu)
    assert peak_memory_bytes(cpu) < lifetime - 300 * 2**20


LAUNCHERS = sorted(p.stem for p in (ROOT / "conf" / "launcher").glob("*.yaml"))


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_every_launcher_composes(launcher, tmp_path):
    import importlib.util

    from hydra.core.config_store import ConfigStore

    if launcher == "ray" and importlib.util.find_spec("hydra_plugins.hydra_ray_launcher") is None:
        # hydra-ray-launcher is not in the dev extras (it pins cloudpickle<3, breaking joblib); check our
        # YAML against the shape of its RayLauncherConf (1.2.2: _target_, ray.init, ray.remote) instead
        ConfigStore.instance().store(group="hydra/launcher", name="ray", provider="ray_launcher", node={
            "_target_": "hydra_plugins.hydra_ray_launcher.ray_launcher.RayLauncher",
            "ray": {"init": {"address": None}, "remote": {}}})
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", overrides=[f"launcher={launcher}", f"results_dir={tmp_path}"],
                      return_hydra_config=True)
    target = cfg.hydra.launcher._target_
    expected = {"basic": "BasicLauncher", "joblib": "JoblibLauncher", "submitit_slurm": "SlurmLauncher",
                "submitit_local": "LocalLauncher", "ray": "RayLauncher"}[launcher]
    assert target.endswith(expected)
    if launcher == "submitit_slurm":
        assert cfg.hydra.launcher.cpus_per_task == 8 and cfg.hydra.launcher.submitit_folder


# --- what a record promises: training-only memory, the cost breakdown, the variant's state, the task loss ------

def _synthetic(**options):
    return tasks.build("synthetic", n_train=256, n_val=64, n_test=64, **options)


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux's resettable peak RSS")
def test_peak_memory_is_the_training_loop_only_evaluation_peaks_apart():
    from experiments.trainer import OptimConfig, fit

    task = _synthetic()
    plain = task.evaluate

    def hungry(model, loader):  # an evaluation that touches 600 MB (think full-vocabulary logits)
        big = torch.ones(150_000_000)
        big.add_(1)
        del big
        return plain(model, loader)

    task.evaluate = hungry
    v = variants.create("lora", rank=4, targets=["fc1"], train_head=False)
    cost = fit(v.apply(task.model), v, task, OptimConfig(max_steps=6, eval_every=2, batch_size=32),
               device="cpu")["cost"]
    # evaluations ran mid-run (steps 2, 4) and at the end, yet the training peak never saw their 600 MB
    assert cost["eval_peak_memory_bytes"] > cost["peak_memory_bytes"] + 500 * 2**20
    assert cost["peak_memory_bytes"] > 0


def test_cost_has_the_static_memory_breakdown(tmp_path):
    lora = run(config(tmp_path, "variant=lora", *FAST))["cost"]
    n, total = lora["trainable_params"], lora["total_params"]
    assert lora["weight_bytes"] == 4 * total and lora["trainable_bytes"] == 4 * n  # float32
    assert lora["gradient_bytes"] == lora["trainable_bytes"]
    assert lora["optimizer_state_bytes"] == 2 * 4 * n + 4 * 2  # AdamW: m and v, plus a float32 step per tensor (A, B)
    galore = run(config(tmp_path, "variant=galore", "variant.rank=2", *FAST))["cost"]
    # GaLore materialises full gradients; its Adam moments live in the rank-2 projection (plus the projector)
    assert galore["gradient_bytes"] == galore["trainable_bytes"] == galore["weight_bytes"]
    assert galore["optimizer_state_bytes"] < galore["trainable_bytes"]


def test_adalora_record_carries_its_rank_pattern_and_schedule(tmp_path):
    record = run(config(tmp_path, "variant=adalora", "variant.rank=2", "variant.init_r=4", *FAST))
    state = record["variant_state"]
    assert state["final"] and state["target_budget"] == 2 * len(state["ranks"])
    assert sum(state["ranks"].values()) == state["target_budget"]
    assert {n: sum(k) for n, k in state["rank_pattern"].items()} == state["ranks"]
    sched = state["schedule"]
    assert sched["total_steps"] == 30 and (sched["tinit"], sched["tfinal"]) == (3, 15)
    assert sched["budgets"][-1] == [15, state["target_budget"]]  # the final allocation, at step T - tfinal
    assert "variant_state" not in run(config(tmp_path, "variant=lora", *FAST))  # nothing to report


def test_history_logs_the_task_loss_and_the_variant_penalty_apart(tmp_path):
    ada = run(config(tmp_path, "variant=adalora", *FAST))["history"]
    lora = run(config(tmp_path, "variant=lora", *FAST))["history"]
    # both start at the base model (B = 0, Λ = 0) on the same first batch: the same task loss
    assert ada[0]["loss"] == pytest.approx(lora[0]["loss"], rel=1e-6)
    assert ada[0]["extra_loss"] > 0.1 and all("extra_loss" not in h for h in lora)


def test_history_logs_the_gradient_norm_before_clipping_each_step(tmp_path, monkeypatch):
    """Each entry's grad_norm is the total norm before clipping, recomputed here from the gradients clipping
    receives (2 micro-batches per step and AdaLoRA's penalty beside the task loss, so the packed values are
    unpacked right). No head trains on this task: no adapter_grad_norm (it would equal grad_norm). Without
    clipping: neither. (The adapter's own norm: tests/test_text_tasks.py.)"""
    from experiments import trainer

    seen, clip = [], torch.nn.utils.clip_grads_with_norm_

    def clipping(params, max_norm, total):
        seen.append((norm_of_grads(params), float(total)))
        return clip(params, max_norm, total)

    monkeypatch.setattr(trainer.torch.nn.utils, "clip_grads_with_norm_", clipping)
    hist = run(config(tmp_path, "variant=adalora", "optim.grad_accum=2", "optim.grad_clip=0.5", *FAST))["history"]
    assert len(seen) == 30 and len({round(t, 6) for t, _ in seen}) > 10  # a norm per step, and they vary
    for h in hist:
        total, given = seen[h["step"] - 1]
        assert h["grad_norm"] == pytest.approx(total, rel=1e-5) == pytest.approx(given, rel=1e-5)
        assert h["extra_loss"] > 0 and h["loss"] > 0 and "adapter_grad_norm" not in h
    assert max(t for t, _ in seen) > 0.5  # some steps were clipped: the norm logged is the one from before
    none = run(config(tmp_path, "variant=lora", "optim.grad_clip=0", *FAST))["history"]
    assert all("grad_norm" not in h for h in none)


def norm_of_grads(params) -> float:
    return float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params if p.grad is not None)))


def test_adalora_select_best_restores_only_states_within_the_final_budget():
    from experiments.trainer import OptimConfig, fit
    from variants.adalora import AdaLoRALinear
    from variants.lora import adapter_layers

    task = _synthetic()
    v = variants.create("adalora", rank=2, init_r=4, targets=["fc1"], train_head=False)
    model = v.apply(task.model)
    seen = []
    evaluate = task.evaluate

    def watch(m, loader):  # note, at every evaluation, whether the weights were a restorable state
        seen.append(v.can_restore())
        return evaluate(m, loader)

    task.evaluate = watch
    fit(model, v, task, OptimConfig(max_steps=30, eval_every=3, select_best=True), device="cpu")
    assert seen[:3] == [False] * 3 and seen[-1]  # early evaluations: over budget, never candidates
    for name, layer in adapter_layers(model, AdaLoRALinear):  # whatever was restored keeps the final budget
        assert int((layer.lora_E != 0).sum()) <= sum(v.rank_pattern[name])


def test_records_declare_metric_directions_and_the_trivial_baseline(tmp_path):
    record = run(config(tmp_path, *FAST))
    assert record["directions"] == {"mse": "min", "fit": "max"}
    trivial = record["trivial"]
    assert trivial["test"]["fit"] == 0.0 and trivial["test"]["mse"] > record["metrics"]["test"]["mse"]
