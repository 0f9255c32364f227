"""``make demo``: the fair-comparison protocol, end to end, on the real sentiment task, offline, in minutes.

Two stages of plain commands (each printed before it runs, so the output doubles as a recipe):

1. **lr probe**: every method at seed 0, rank 8, over its own three learning rates (``GRID``: one lr map per
   grid point, ``optim.lr={lora:1e-3,...}``, so one sweep runs every method at its own lrs), into
   ``<results-dir>/probe``; ``aggregate --select-lr`` keeps, per method, the lr with the best *validation*
   accuracy in this very budget (never one borrowed from another budget);
2. **comparison**: every method at its chosen lr (one lr map again), seeds 0, 1, 2, at rank 8, and LoRA also
   at ranks 2 and 32 (``RANK_SWEPT``: the rank-vs-quality plot), into ``<results-dir>``; then the
   plots and the table (Student-t intervals over the 3 seeds, paired t-tests vs LoRA, runs no better than the
   majority class flagged).

Sweeps that take different ``variant.rank`` values are separate commands (the rank-less baselines, full
fine-tuning and head-only, take none). A probe run that stage 2 repeats (seed 0, rank 8, the chosen lr) has
the same config and so the same run id: its record is copied and the sweep skips it. The whole comparison
fits the ten minutes of ``make demo`` on 2 cores only so: every low-rank method across three ranks would
double stage 2 (``--rank-sweep lora,dora,...`` asks for more).

Finished runs are skipped, so an interrupted demo resumes where it stopped.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from experiments.aggregate import lr_map_text

LOW_RANK = ("lora", "lora_plus", "dora", "galore", "adalora")
BASELINES = ("full", "head")
# Per method, three lrs a factor ~3 apart around where it works at this budget (50 steps of 8): LoRA+ trains
# B at 16x its lr; GaLore and full fine-tuning move every weight; head-only is a linear probe.
GRID = {"lora": (1e-3, 3e-3, 1e-2), "dora": (1e-3, 3e-3, 1e-2), "lora_plus": (2e-4, 6e-4, 2e-3),
        "galore": (1e-4, 3e-4, 1e-3), "adalora": (1e-2, 3e-2, 1e-1), "full": (3e-5, 1e-4, 3e-4),
        "head": (3e-3, 1e-2, 3e-2)}
PROBE_RANK, RANKS, SEEDS = 8, (2, 8, 32), (0, 1, 2)
RANK_SWEPT = ("lora",)  # across RANKS in stage 2; the other low-rank methods at PROBE_RANK


def train_cmd(results_dir: str | Path, jobs: int, *overrides: str) -> list[str]:
    cmd = [sys.executable, "-m", "experiments.train", "-m", "experiment=demo", f"results_dir={results_dir}",
           "logger=none"]
    if jobs > 1:
        cmd += ["launcher=joblib", f"hydra.launcher.n_jobs={jobs}"]
    return cmd + list(overrides)


# slowest first within a sweep: two workers then finish together instead of one waiting on a late GaLore run
SLOWEST_FIRST = ("galore", "full", "dora", "adalora", "lora", "lora_plus", "head")


def _sweeps(methods: list[str], ranks: dict[str, tuple[int, ...]]) -> list[tuple[list[str], list[str]]]:
    """The methods grouped by the ``variant.rank`` override they take (none for the baselines), slowest first."""
    groups: dict[tuple[int, ...], list[str]] = {}
    for m in sorted(methods, key=SLOWEST_FIRST.index):
        groups.setdefault(ranks.get(m, ()), []).append(m)
    return [(members, [f"variant.rank={','.join(map(str, r))}"] if r else [])
            for r, members in sorted(groups.items(), key=lambda kv: (not kv[0], -len(kv[0])))]


def probe_cmds(probe_dir: str | Path, methods: list[str], jobs: int) -> list[list[str]]:
    """Seed 0, rank 8: one sweep per rank override over the three per-method lr maps of ``GRID``."""
    ranks = {m: (PROBE_RANK,) for m in LOW_RANK}
    return [train_cmd(probe_dir, jobs, f"variant={','.join(members)}", *rank, "seed=0",
                      "optim.lr=" + ",".join(lr_map_text({m: GRID[m][i] for m in members}) for i in range(3)))
            for members, rank in _sweeps(methods, ranks)]


def compare_cmds(results_dir: str | Path, lrs: dict[str, float], jobs: int,
                 rank_swept: tuple[str, ...] = RANK_SWEPT) -> list[list[str]]:
    """Each method at its chosen lr, every seed; ``rank_swept`` across RANKS, the other low-rank ones at 8."""
    ranks = {m: RANKS if m in rank_swept else (PROBE_RANK,) for m in LOW_RANK}
    return [train_cmd(results_dir, jobs, f"variant={','.join(members)}", *rank, f"seed={','.join(map(str, SEEDS))}",
                      f"optim.lr={lr_map_text({m: lrs[m] for m in members})}")
            for members, rank in _sweeps(list(lrs), ranks)]


def chosen_lrs(probe_dir: str | Path) -> dict[str, float]:
    """{method: lr} from the probe's table (``aggregate --select-lr``: the val-best lr per method)."""
    with open(Path(probe_dir) / "tables" / "summary_accuracy.csv") as f:
        return {row["variant"]: float(row["lr"]) for row in csv.DictReader(f)}


def reuse_probe_runs(probe_dir: str | Path, results_dir: str | Path, lrs: dict[str, float]) -> int:
    """Copy the probe records that stage 2 would repeat (seed 0, rank 8 or none, the chosen lr: the same
    config, so the same run id); returns how many were copied."""
    out = Path(results_dir) / "runs"
    out.mkdir(parents=True, exist_ok=True)
    n = 0
    for path in sorted(Path(probe_dir, "runs").glob("*.json")):
        r = json.loads(path.read_text())
        if r.get("status") == "ok" and r.get("lr") == lrs.get(r.get("variant")) and not (out / path.name).exists():
            shutil.copy2(path, out / path.name)
            n += 1
    return n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results-dir", default="results/demo")
    ap.add_argument("--variants", default=",".join(GRID), help="the methods to compare (default: all seven)")
    ap.add_argument("--rank-sweep", default=",".join(RANK_SWEPT),
                    help=f"low-rank methods to compare across ranks {RANKS} (default: lora; the rest at rank 8)")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                    help="parallel runs (joblib), 1 torch thread each (default: 2; 1 = one process, all threads)")
    args = ap.parse_args(argv)
    methods = args.variants.split(",")
    swept = tuple(m for m in args.rank_sweep.split(",") if m)
    unknown = [m for m in methods if m not in GRID]
    if unknown:
        print(f"error: --variants takes {', '.join(GRID)} (not {unknown[0]!r})", file=sys.stderr)
        return 2
    if set(swept) - set(LOW_RANK):
        print(f"error: --rank-sweep takes {', '.join(LOW_RANK)} (not {sorted(set(swept) - set(LOW_RANK))[0]!r})",
              file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    probe_dir = Path(args.results_dir) / "probe"

    def sh(cmd: list[str]) -> bool:
        shown = " ".join(["python", *cmd[1:]])
        print(f"\n[demo] $ {shown}", flush=True)
        if subprocess.run(cmd, env=env).returncode != 0:
            print(f"[demo] failed: {shown}", file=sys.stderr)
            return False
        return True

    aggregate = [sys.executable, "-m", "experiments.aggregate"]
    print(f"[demo] stage 1: lr probe at seed 0, three lrs per method -> {probe_dir}", flush=True)
    if not all(sh(c) for c in probe_cmds(probe_dir, methods, args.jobs)) \
            or not sh([*aggregate, "--results-dir", str(probe_dir), "--select-lr"]):
        return 1
    lrs = chosen_lrs(probe_dir)
    reused = reuse_probe_runs(probe_dir, args.results_dir, lrs)
    print(f"\n[demo] stage 1 done in {time.perf_counter() - t0:.0f} s; stage 2: each method at its val-best lr "
          f"({', '.join(f'{m} {lr:g}' for m, lr in lrs.items())}), seeds {','.join(map(str, SEEDS))} -> "
          f"{args.results_dir} ({reused} probe runs reused)", flush=True)
    plots = [sys.executable, "-m", "experiments.plots", "--results-dir", str(args.results_dir)]
    if not all(sh(c) for c in compare_cmds(args.results_dir, lrs, args.jobs, swept)) or not sh(plots) \
            or not sh([*aggregate, "--results-dir", str(args.results_dir), "--wandb"]):
        return 1
    print(f"\n[demo] done in {time.perf_counter() - t0:.0f} s: tables in {args.results_dir}/tables, "
          f"plots in {args.results_dir}/plots", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
