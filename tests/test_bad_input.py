"""Bad input, table-driven: every case prints one ``error:`` line naming the option, exits 2 and writes
nothing (no results folder, no record). Run in-process through the real command-line entry point
(``experiments.train.cli``: the one-line pre-check, Hydra's composition, then ``run``'s checks)."""

from __future__ import annotations

import sys

import pytest

import variants
from experiments import train

CASES = [  # (arguments, a fragment of the one line)
    # optim
    (["optim.lr=abc"], "optim.lr='abc'"), (["optim.lr=null"], "optim.lr=None"), (["optim.lr=-1"], "optim.lr=-1"),
    (["optim.lr=0"], "optim.lr=0"), (["optim.max_steps=1.5"], "optim.max_steps=1.5"),
    (["optim.max_steps=-1"], "optim.max_steps=-1"), (["optim.batch_size=1.5"], "optim.batch_size=1.5"),
    (["optim.batch_size=0"], "optim.batch_size=0"), (["optim.eval_batch_size=0"], "optim.eval_batch_size=0"),
    (["optim.betas=[2,3]"], "optim.betas"), (["optim.betas=[0.9]"], "optim.betas"), (["optim.eps=-1"], "optim.eps"),
    (["optim.eps=0"], "optim.eps"), (["optim.weight_decay=-1"], "optim.weight_decay"),
    (["optim.warmup_ratio=1"], "optim.warmup_ratio"), (["optim.warmup_ratio=abc"], "optim.warmup_ratio"),
    (["optim.grad_clip=-1"], "optim.grad_clip"), (["optim.grad_accum=0"], "optim.grad_accum"),
    (["optim.schedule=nope"], "optim.schedule"), (["optim.epochs=-1"], "optim.epochs"),
    (["optim.eval_every=-1"], "optim.eval_every"), (["optim.log_every=0"], "optim.log_every"),
    (["optim.select_best=abc"], "optim.select_best"), (["optim.nope=1"], "optim.nope"),
    # task
    (["task.n_train=0"], "task.n_train=0"), (["task.n_val=0"], "task.n_val=0"), (["task.n_test=0"], "task.n_test=0"),
    (["task.true_rank=abc"], "task.true_rank"), (["task.true_rank=0"], "task.true_rank=0"),
    (["task.true_rank=100"], "task.true_rank=100"), (["task.d_in=0"], "task.d_in=0"), (["task.nope=1"], "task.nope"),
    (["task=nope"], "unknown task 'nope'"),
    # top level
    (["seed=-1"], "seed=-1"), (["seed=abc"], "seed='abc'"), (["seed=1.5"], "seed=1.5"),
    (["device=foo"], "device='foo'"), (["device=cuda:7"], "device='cuda:7'"), (["bf16=abc"], "bf16='abc'"),
    (["results_dir="], "results_dir=''"), (["results_dir=/proc/lorabench"], "results_dir='/proc/lorabench'"),
    (["cache_dir=/proc/lorabench"], "cache_dir='/proc/lorabench'"), (["experiment=nope"], "unknown experiment"),
    (["checkpoint_every=-1"], "checkpoint_every=-1"), (["checkpoint_every=abc"], "checkpoint_every='abc'"),
    (["snapshot_steps=[-1]"], "snapshot_steps=[-1]"), (["snapshot_steps=abc"], "snapshot_steps='abc'"),
    (["snapshot_steps=[100000]"], "step 100000 is beyond"),
    (["profile_memory=-1"], "profile_memory=-1"), (["profile_memory=true"], "profile_memory=True"),
    (["profile_memory=100000"], "profile_memory=100000: step beyond"),
    (["snapshot_steps=[1]", "snapshot_targets=nope"], "snapshot_targets='nope'"),
    (["model.quantize=nf4"], "model.quantize=nf4: task 'synthetic'"), (["model.quantize=nope"], "model.quantize"),
    # variant
    (["variant=nope"], "unknown variant 'nope'"), (["variant.rank=0"], "rank=0"), (["variant.rank=1.5"], "rank=1.5"),
    (["variant.rank=["], "malformed override 'variant.rank=['"), (["variant.alpha=-1"], "alpha=-1"),
    (["variant.dropout=1"], "dropout=1"), (["variant.scaling=nope"], "scaling='nope'"),
    (["variant.targets=nope"], "nope"), (["variant.init=nope"], "init='nope'"), (["variant.nope=1"], "variant.nope"),
    (["variant=adalora", "variant.tinit=30", "variant.tfinal=20", "optim.max_steps=40"], "tinit=30"),
    (["variant=lora_plus", "variant.ratio=0"], "ratio=0"), (["variant=galore", "variant.rank=1000"], "rank=1000"),
    (["variant=galore", "variant.proj_type=nope"], "proj_type"),
    (["variant=galore", "variant.layerwise=true", "optim.grad_clip=1"], "galore: layerwise=true updates each weight"),
    (["variant=galore", "variant.svd=nope"], "svd='nope'"), (["-m", "variant=lora,nope"], "unknown variant"),
]


def cli(args: list[str], monkeypatch) -> int:
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    monkeypatch.setattr(sys, "argv", ["lorabench-train", *args])
    with pytest.raises(SystemExit) as e:
        train.cli()
    GlobalHydra.instance().clear()
    return e.value.code


@pytest.mark.parametrize(("args", "fragment"), CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_input_is_one_error_line_exit_2_and_nothing_written(args, fragment, tmp_path, monkeypatch, capsys):
    results = tmp_path / "results"
    out = [f"results_dir={results}" if not any(a.startswith("results_dir=") for a in args) else None,
           "logger=none", f"cache_dir={tmp_path / 'cache'}" if not any(a.startswith("cache_dir=") for a in args)
           else None]
    code = cli([a for a in [*args, *out] if a is not None], monkeypatch)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], err
    assert not results.exists() or not any(results.rglob("*.json")), sorted(results.rglob("*"))


@pytest.mark.parametrize("where", ["a file", "below a file", "cache below a file"])
def test_a_directory_option_that_is_a_file_or_lies_below_one_is_one_line(where, tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    option, path, why = {"a file": ("results_dir", blocker, "(it is a file)"),
                         "below a file": ("results_dir", blocker / "results", f"(it lies below the file {blocker})"),
                         "cache below a file": ("cache_dir", blocker / "cache", f"(it lies below the file {blocker})")
                         }[where]
    results = tmp_path / "results" if option == "cache_dir" else path
    code = cli([f"{option}={path}", *([f"results_dir={results}"] if option == "cache_dir" else []),
                "logger=none"], monkeypatch)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: invalid option {option}=") and why in err[0], err
    assert not any(tmp_path.rglob("*.json"))


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda_is_one_line(tmp_path, monkeypatch, capsys):
    code = cli(["device=cuda", f"results_dir={tmp_path}", "logger=none"], monkeypatch)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["error: invalid option device='cuda': this machine has no CUDA device "
                                 "(device=auto or cpu)"]
    assert not any(tmp_path.rglob("*"))


def test_tilde_and_variables_in_the_results_dir_are_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LORABENCH_RESULTS", "~/res")
    monkeypatch.setenv("SUB", "sub")
    cfg = _synthetic_cfg(tmp_path)
    record = train.run({**cfg, "cache_dir": "$HOME/cache/${SUB}"})
    assert record["status"] == "ok"
    assert (tmp_path / "home" / "res" / "runs" / f"{record['run_id']}.json").exists()
    assert (tmp_path / "home" / "cache" / "sub").is_dir() and not (tmp_path / "~").exists()


def _synthetic_cfg(tmp_path):
    from conftest import CONF
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):  # results_dir from LORABENCH_RESULTS
        return OmegaConf.to_container(compose("train", overrides=["logger=none", "optim.max_steps=3"]), resolve=True)


def test_there_are_at_least_forty_cases():
    assert len(CASES) >= 40


@pytest.mark.parametrize(("name", "options", "fragment"), [
    ("lora", {"rank": 0}, "rank=0"), ("lora", {"alpha": float("nan")}, "alpha=nan"),
    ("dora", {"init": "pissa_niter_0"}, "init='pissa_niter_0'"), ("adalora", {"init_r": 4, "rank": 8}, "init_r=4"),
    ("galore", {"scale": -1}, "scale"), ("head", {"train_head": False}, None),
])
def test_variants_create_rejects_bad_options_in_one_line(name, options, fragment):
    if fragment is None:  # the head probe with nothing to train: refused when applied
        from tiny import tiny_bert

        with pytest.raises(variants.VariantError, match="needs train_head=True"):
            variants.create(name, **options).apply(tiny_bert())
        return
    with pytest.raises(variants.VariantError) as e:
        variants.create(name, **options)
    assert fragment in str(e.value) and "\n" not in str(e.value)


# --- faults in the results folder and in sweeps ---------------------------------------------------------

def _synthetic(tmp_path, *more):
    from conftest import compose_config

    return compose_config("logger=none", "optim.max_steps=5", *more, results_dir=tmp_path / "results")


@pytest.mark.parametrize("content", ["{not json", "[]", "null"])
def test_a_corrupt_or_non_object_record_is_unfinished_and_the_run_goes_again(content, tmp_path, capsys):
    from experiments import records

    cfg = _synthetic(tmp_path)
    path = records.record_path(cfg["results_dir"], records.run_id(train.expand_paths(cfg)))
    path.parent.mkdir(parents=True)
    path.write_text(content)
    record = train.run(cfg)
    assert record["status"] == "ok" and not record.get("skipped")
    assert "treated as unfinished" in capsys.readouterr().out
    assert records.load(path)["status"] == "ok"  # replaced by the finished run


def test_a_record_of_a_newer_schema_is_one_line_not_a_crash(tmp_path):
    import json

    from experiments import aggregate, records

    cfg = _synthetic(tmp_path)
    path = records.record_path(cfg["results_dir"], records.run_id(train.expand_paths(cfg)))
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"schema": 99, "status": "ok"}))
    with pytest.raises(train.ConfigError, match="record schema 99, newer than this lorabench reads"):
        train.run(cfg)
    ok, rest = aggregate.load(cfg["results_dir"])
    assert ok.empty and "newer than this lorabench reads" in rest.iloc[0]["error"]


def test_a_sweep_with_a_failed_job_runs_every_job_and_exits_1(tmp_path):
    import os
    import subprocess
    from pathlib import Path

    env = {**os.environ, "WANDB_MODE": "disabled", "LORABENCH_NO_PROGRESS": "1"}
    out = subprocess.run([sys.executable, "-m", "experiments.train", "-m", "optim.lr=1e-2,1e9", "optim.max_steps=30",
                          "logger=none", f"results_dir={tmp_path}"], capture_output=True, text=True, env=env,
                         cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert out.returncode == 1, out.stderr[-1500:]
    assert "2 jobs: 1 ok, 0 skipped, 1 failed" in out.stdout and "non-finite loss" in out.stdout
    assert len(list((tmp_path / "runs").glob("*.json"))) == 2  # the failed run has its failed record


def test_two_sweeps_in_the_same_second_get_their_own_folders(tmp_path):
    from conftest import CONF
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    dirs = set()
    for _ in range(2):
        with initialize_config_dir(config_dir=CONF, version_base="1.3"):
            cfg = compose("train", overrides=[f"results_dir={tmp_path}"], return_hydra_config=True)
        dirs.add(OmegaConf.select(cfg, "hydra.sweep.dir"))  # resolves ${now:...} at this moment
    assert len(dirs) == 2


def _lock_of(cfg):
    from experiments import records

    path = records.record_path(cfg["results_dir"], records.run_id(train.expand_paths(cfg))).with_suffix(".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def test_a_run_another_live_process_holds_is_skipped_and_a_stale_lock_is_taken_over(tmp_path, capsys):
    import platform
    import subprocess

    cfg = _synthetic(tmp_path)
    lock = _lock_of(cfg)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(f"{platform.node()} {sleeper.pid}\n")
        record = train.run(cfg)
        assert record["skipped"] and "another process is training it" in capsys.readouterr().out
        assert not list(lock.parent.glob("*.json"))
    finally:
        sleeper.kill()
        sleeper.wait()
    record = train.run(cfg)  # its process is gone: the lock is stale
    assert record["status"] == "ok" and not record.get("skipped") and not lock.exists()


def test_two_processes_on_one_config_train_it_once(tmp_path):
    import json
    import os
    import subprocess
    from pathlib import Path

    env = {**os.environ, "WANDB_MODE": "disabled", "LORABENCH_NO_PROGRESS": "1"}
    args = [sys.executable, "-m", "experiments.train", "optim.max_steps=300", "logger=none", f"results_dir={tmp_path}"]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                              cwd=Path(__file__).resolve().parents[1]) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-500:] for o in outs]
    trained = sum("[lorabench] ok" in o[0] for o in outs)
    assert trained == 1, [o[0] for o in outs]
    (path,) = (tmp_path / "runs").glob("*")  # one record, no lock left
    assert json.loads(path.read_text())["status"] == "ok"


@pytest.mark.parametrize("damage", ["weights", "facts"])
def test_a_corrupt_cached_digits_base_is_rebuilt_with_a_warning_naming_it(damage, tmp_path):
    from experiments.tasks import digits

    cache = tmp_path / "cache"
    digits.build(cache_dir=str(cache))
    (target,) = (cache / "digits").glob(f"base-*.{'safetensors' if damage == 'weights' else 'json'}")
    target.write_bytes(target.read_bytes()[: len(target.read_bytes()) // 2])  # truncated
    with pytest.warns(UserWarning, match=rf"corrupt cached digits base .*{target.parent}.*rebuilding it"):
        task = digits.build(cache_dir=str(cache))
    assert task.info["weak_class"] in range(10)
    digits.build(cache_dir=str(cache))  # rebuilt: loads cleanly again
