"""Launchers that really run: a sweep through hydra-submitit-launcher's local executor (the SLURM launcher's
job wrapper, without SLURM) and, where hydra-ray-launcher is installed, through a local Ray instance.

Each job is its own process that imports torch, so the budgets here are the smallest that train at all.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["optim.max_steps=5", "task.n_train=64", "task.n_val=32", "task.n_test=32", "logger=none"]
SEEDS = "seed=0,1,2,3"

needs_submitit = pytest.mark.skipif(importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None,
                                    reason="hydra-submitit-launcher is not installed (the dev extra has it)")


def sweep(tmp_path: Path, sweep_dir: str, *args: str) -> subprocess.CompletedProcess:
    """``python -m experiments.train -m ...`` writing records under tmp_path/results, Hydra's sweep folder
    (jobs.jsonl, submitit's logs) under tmp_path/<sweep_dir>."""
    env = {**os.environ, "WANDB_MODE": "disabled", "LORABENCH_NO_PROGRESS": "1"}
    cmd = [sys.executable, "-m", "experiments.train", "-m", *args, *TINY, f"results_dir={tmp_path / 'results'}",
           f"cache_dir={tmp_path / 'cache'}", f"hydra.sweep.dir={tmp_path / sweep_dir}"]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=400)


def records(tmp_path: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (tmp_path / "results" / "runs").glob("*.json")}


def summary(out: subprocess.CompletedProcess, ok: int, skipped: int, failed: int, jobs: int = 4) -> None:
    line = f"[lorabench] sweep done: {jobs} jobs: {ok} ok, {skipped} skipped, {failed} failed, 0 invalid"
    assert line in out.stdout.splitlines(), out.stdout + out.stderr


@needs_submitit
def test_submitit_local_sweep_writes_4_records_and_a_rerun_trains_only_the_missing_one(tmp_path):
    out = sweep(tmp_path, "sweep1", "launcher=submitit_local", SEEDS)
    assert out.returncode == 0, out.stderr
    summary(out, ok=4, skipped=0, failed=0)
    done = records(tmp_path)
    assert sorted(r["seed"] for r in done.values()) == [0, 1, 2, 3]
    assert {r["status"] for r in done.values()} == {"ok"} and all(r["env"]["threads"] == 1 for r in done.values())
    assert not list((tmp_path / "results" / "runs").glob("*.lock"))  # every claim released
    # each run was a submitit job: its own log says it trained that run
    jobs = tmp_path / "sweep1" / ".submitit"
    logs = sorted(jobs.glob("*/*_0_log.out"))
    assert len(logs) == 4 and len(list(jobs.glob("*/*_0_log.err"))) == 4
    trained = {line.split()[2] for log in logs for line in log.read_text().splitlines()
               if line.startswith("[lorabench] ok ")}
    assert trained == set(done)

    # the same command again after losing one record (one sweep instead of two, to stay fast): the three
    # finished runs are skipped, only the missing one trains
    gone = sorted(done)[0]
    (tmp_path / "results" / "runs" / f"{gone}.json").unlink()
    out = sweep(tmp_path, "sweep2", "launcher=submitit_local", SEEDS)
    assert out.returncode == 0, out.stderr
    summary(out, ok=1, skipped=3, failed=0)
    again = records(tmp_path)
    assert set(again) == set(done) and again[gone]["status"] == "ok"
    assert all(again[k] == done[k] for k in done if k != gone)  # the finished records are untouched
    skipped = {line.split()[2].rstrip(":") for log in (tmp_path / "sweep2" / ".submitit").glob("*/*_0_log.out")
               for line in log.read_text().splitlines() if line.startswith("[lorabench] skip ")}
    assert skipped == set(done) - {gone}


@needs_submitit
def test_a_failing_submitit_job_exits_1_names_it_and_the_other_job_still_finishes(tmp_path):
    out = sweep(tmp_path, "sweep", "launcher=submitit_local", "optim.lr=0.01,1e30")  # 1e30: a non-finite loss
    assert out.returncode == 1, out.stderr
    summary(out, ok=1, skipped=0, failed=1, jobs=2)
    by_lr = {r["lr"]: r for r in records(tmp_path).values()}
    assert by_lr[0.01]["status"] == "ok" and by_lr[1e30]["status"] == "failed"
    failed = by_lr[1e30]
    assert failed["error"]["type"] == "NonFiniteLoss"
    assert f"[lorabench]   failed: {failed['run_id']}: NonFiniteLoss: " in out.stdout


@pytest.mark.slow  # a local Ray instance takes ~20 s to start, twice
@pytest.mark.skipif(importlib.util.find_spec("hydra_plugins.hydra_ray_launcher") is None,
                    reason="hydra-ray-launcher is not installed (its own environment: docs/launchers.md)")
def test_ray_sweep_on_a_local_instance_writes_4_records_then_skips_them(tmp_path):
    ray = ["launcher=ray", "hydra.launcher.ray.remote.num_cpus=1", "threads_per_job=1", SEEDS]
    out = sweep(tmp_path, "sweep1", *ray)
    assert out.returncode == 0, out.stderr
    summary(out, ok=4, skipped=0, failed=0)
    done = records(tmp_path)
    assert sorted(r["seed"] for r in done.values()) == [0, 1, 2, 3] and {r["status"] for r in done.values()} == {"ok"}

    out = sweep(tmp_path, "sweep2", *ray)
    assert out.returncode == 0, out.stderr
    summary(out, ok=0, skipped=4, failed=0)
    assert records(tmp_path) == done
