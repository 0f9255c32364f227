"""Faults: signals, kill -9 at random points, a sweep whose parent dies; checkpoints resume exactly.

The promise under test: whatever stops a run, ``results/runs`` holds only whole files (a record that
parses, an adapter folder that loads, a checkpoint that loads), a stopped run never has an ``ok``
record, and the same command afterwards completes it, from its latest checkpoint, with the final
metrics of a run that was never stopped (CPU: bit for bit).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import compose_config

import variants
from experiments import records, resume, train

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "WANDB_MODE": "disabled", "LORABENCH_NO_PROGRESS": "1"}
DIGITS = ["task=digits", "optim.max_steps=30", "optim.eval_every=10", "logger=none"]


def _cfg(results, cache, *more):
    return compose_config(*DIGITS, *more, results_dir=results, cache_dir=cache)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))  # one pretrained digits base for the module


def _signal_at(monkeypatch, name: str, at_step: int, signum=signal.SIGTERM):
    """Send this process ``signum`` from inside training step ``at_step`` (0-based), i.e. mid-step."""
    cls = variants.get(name)
    original = cls.after_step

    def after_step(self, model, step, total):
        original(self, model, step, total)
        if step == at_step:
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(cls, "after_step", after_step)


@pytest.mark.parametrize(("variant", "every", "at"), [
    ("lora", 7, 16),  # stopped between checkpoints: resumes from the signal's own checkpoint
    ("adalora", 10, 19),  # importance averages and the rank pattern are part of the state
    ("galore", 4, 5),  # the projector lives in the optimizer state
    ("dora", 30, 29),  # the signal in the last step: only the final evaluation is left
])
def test_a_signal_mid_step_checkpoints_and_the_next_run_ends_with_identical_metrics(variant, every, at, tmp_path,
                                                                                    cache, monkeypatch):
    extra = [f"variant={variant}", *(["variant.tinit=5", "variant.tfinal=5"] if variant == "adalora" else []),
             *(["optim.select_best=true"] if variant == "lora" else [])]
    reference = train.run(_cfg(tmp_path / "ref", cache, *extra))
    cfg = _cfg(tmp_path / "res", cache, *extra, f"checkpoint_every={every}")
    with monkeypatch.context() as m:
        _signal_at(m, variant, at)
        with pytest.raises(resume.Interrupted) as stopped:
            train.run(cfg)
    assert stopped.value.step == at + 1  # the step the signal arrived in was completed, not cut
    rid = reference["run_id"]
    assert records.run_id(cfg) == rid  # checkpointing does not change what the run is
    interrupted = records.load(records.record_path(cfg["results_dir"], rid))
    assert interrupted["status"] == "interrupted" and interrupted["error"]["step"] == at + 1
    assert not records.finished(cfg["results_dir"], rid)
    ckpt = records.record_path(cfg["results_dir"], rid).with_suffix(".ckpt")
    assert torch.load(ckpt, weights_only=True)["step"] == at + 1

    resumed = train.run(cfg)
    assert resumed["status"] == "ok" and resumed["resumed_from"] == at + 1 and not ckpt.exists()
    assert resumed["metrics"] == reference["metrics"]
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in reference["history"]]
    assert resumed.get("variant_state") == reference.get("variant_state")  # AdaLoRA: the same rank pattern


def test_a_corrupt_checkpoint_is_ignored_with_a_note_and_the_run_starts_over(tmp_path, cache, capsys):
    cfg = _cfg(tmp_path, cache, "checkpoint_every=5")
    ckpt = records.record_path(tmp_path, records.run_id(cfg)).with_suffix(".ckpt")
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"not a checkpoint")
    record = train.run(cfg)
    assert record["status"] == "ok" and record["resumed_from"] is None and not ckpt.exists()
    assert f"checkpoint {ckpt} is unreadable" in capsys.readouterr().out


def test_force_ignores_a_checkpoint(tmp_path, cache, monkeypatch):
    cfg = _cfg(tmp_path, cache, "checkpoint_every=5")
    with monkeypatch.context() as m:
        _signal_at(m, "lora", 12)
        with pytest.raises(resume.Interrupted):
            train.run(cfg)
    assert train.run({**cfg, "force": True})["resumed_from"] is None


def test_without_checkpoints_a_signal_leaves_an_interrupted_record_and_the_run_goes_again(tmp_path, cache,
                                                                                       monkeypatch):
    cfg = _cfg(tmp_path, cache)
    with monkeypatch.context() as m:
        _signal_at(m, "lora", 3, signal.SIGINT)
        with pytest.raises(resume.Interrupted):
            train.run(cfg)
    assert records.load(records.record_path(tmp_path, records.run_id(cfg)))["status"] == "interrupted"
    assert not list((tmp_path / "runs").glob("*.ckpt"))
    again = train.run(cfg)
    assert again["status"] == "ok" and not again.get("skipped") and again["resumed_from"] is None


# ------------------------------------------------------------------------------------------- processes


def _train_process(results, cache, *more) -> subprocess.Popen:
    args = [sys.executable, "-m", "experiments.train", *DIGITS, f"results_dir={results}", f"cache_dir={cache}", *more]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)


def _wait_for(predicate, timeout=120.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def _assert_only_whole_files(runs: Path) -> None:
    """Every record parses (and is never ``ok`` without its metrics), every adapter folder loads, every
    checkpoint loads; a temporary file of an interrupted write is hidden (never read as a record)."""
    from safetensors.torch import load_file

    for path in runs.iterdir():
        if path.name.startswith("."):  # a write cut short by kill -9: ignored by every reader
            continue
        if path.suffix == ".json":
            record = json.loads(path.read_text())
            assert record["status"] != "ok" or record["metrics"]["test"], path
        elif path.suffix == ".ckpt":
            assert torch.load(path, weights_only=True)["step"] > 0
        elif path.suffix == ".lock":
            assert path.read_text().split()[0]  # a stale lock: taken over by the next run
        else:
            assert path.is_dir(), path
            assert load_file(path / "adapter_model.safetensors")
            assert json.loads((path / "lorabench_variant.json").read_text())


@pytest.mark.parametrize("trials", [pytest.param(1, id="1 trial"),
                                    pytest.param(8, id="8 trials", marks=pytest.mark.slow)])
def test_kill_9_at_random_points_leaves_only_whole_files_and_the_rerun_completes_identically(trials, tmp_path, cache):
    more = ["save_adapter=true", "checkpoint_every=3"]
    start = time.monotonic()
    proc = _train_process(tmp_path / "reference", cache, *more)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()[-2000:]
    duration = time.monotonic() - start
    (reference,) = (tmp_path / "reference" / "runs").glob("*.json")
    reference = json.loads(reference.read_text())
    rng = random.Random(14 + trials)
    for trial in range(trials):
        results = tmp_path / f"trial{trial}"
        proc = _train_process(results, cache, *more)
        time.sleep(rng.uniform(0.3, 1.0) * duration)  # anywhere from start-up to the final writes
        proc.kill()
        proc.wait()
        if (results / "runs").exists():
            _assert_only_whole_files(results / "runs")
        rerun = _train_process(results, cache, *more)
        out, err = rerun.communicate(timeout=300)
        assert rerun.returncode == 0, err[-2000:]
        record = records.load(records.record_path(results, reference["run_id"]))
        assert record["status"] == "ok" and record["metrics"] == reference["metrics"], (trial, out)
        _assert_only_whole_files(results / "runs")
        assert not list((results / "runs").glob("*.ckpt")) and not list((results / "runs").glob("*.lock"))


@pytest.mark.parametrize("signum", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)])
def test_a_signalled_process_exits_128_plus_signal_with_no_ok_record(signum, tmp_path, cache):
    proc = _train_process(tmp_path, cache, "checkpoint_every=2", "optim.max_steps=400")
    assert _wait_for(lambda: list((tmp_path / "runs").glob("*.ckpt"))), proc.communicate()
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, err[-2000:]
    assert "the same command runs it again from its latest checkpoint" in err
    (record,) = (tmp_path / "runs").glob("*.json")
    record = json.loads(record.read_text())
    assert record["status"] == "interrupted" and record["error"]["checkpoint"]
    assert "Traceback" not in err


def test_killing_a_joblib_sweeps_parent_stops_its_workers(tmp_path, cache):
    args = [sys.executable, "-m", "experiments.train", "-m", "launcher=joblib", *DIGITS, "optim.max_steps=100000",
            "seed=0,1", f"results_dir={tmp_path}", f"cache_dir={cache}", "checkpoint_every=50"]
    sweep = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV, cwd=ROOT)
    runs = tmp_path / "runs"
    assert _wait_for(lambda: len(list(runs.glob("*.lock"))) == 2, timeout=180)
    workers = [int(p.read_text().split()[1]) for p in runs.glob("*.lock")]
    assert sweep.pid not in workers
    sweep.kill()
    sweep.wait()
    assert _wait_for(lambda: not any(_alive(pid) for pid in workers), timeout=60), workers
    for path in runs.glob("*.json"):  # each worker stopped cleanly: an interrupted record, never ok
        assert json.loads(path.read_text())["status"] == "interrupted"
    assert not list(runs.glob("*.lock"))


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "State:\tZ" not in state  # a zombie has exited; only its parent has not collected it


def test_submitits_time_limit_signal_checkpoints_then_goes_on_to_submitits_handler(tmp_path, cache, monkeypatch):
    """SIGUSR2 where a launcher handles it (submitit: the time limit is near): the run stops at the end of
    the step with a checkpoint and an interrupted record, and only then does the launcher's handler run
    (submitit's requeues the job, which resumes from that checkpoint)."""
    cfg = _cfg(tmp_path, cache, "checkpoint_every=100")
    seen = []

    def launchers_handler(signum, frame):  # what submitit's would do: requeue, then leave
        ckpt = records.record_path(tmp_path, records.run_id(cfg)).with_suffix(".ckpt")
        seen.append((signum, ckpt.exists(), records.load(ckpt.with_suffix(".json"))["status"]))
        raise SystemExit(0)

    previous = signal.signal(signal.SIGUSR2, launchers_handler)
    try:
        with monkeypatch.context() as m:
            _signal_at(m, "lora", 8, signal.SIGUSR2)
            with pytest.raises(SystemExit):
                train.run(cfg)
        assert signal.getsignal(signal.SIGUSR2) is launchers_handler  # handed back after the run
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert seen == [(signal.SIGUSR2, True, "interrupted")]
    assert train.run(cfg)["resumed_from"] == 9
