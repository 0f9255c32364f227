"""``make demo``: a small real sweep on the sentiment task -> plots -> table, offline, ~10 min on 2 cores.

It runs exactly what a user would type (each command is printed before it runs), so the demo doubles as a
recipe. Each method trains at its own learning rate (``LRS``: one shared lr would wreck full fine-tuning and
GaLore, or starve the adapters), so the low-rank variants run as one sweep per lr:

    python -m experiments.train -m experiment=demo variant=lora,dora variant.rank=2,8,32 optim.lr=4e-3
    ...
    python -m experiments.train -m experiment=demo variant=full optim.lr=5e-5
    python -m experiments.plots --results-dir results/demo
    python -m experiments.aggregate --results-dir results/demo --wandb

Finished runs are skipped, so an interrupted demo resumes where it stopped.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

LOW_RANK = ("lora", "lora_plus", "dora", "galore", "adalora")
# Per method, the lr with the best validation accuracy on the full sentiment task (3,000 training examples,
# seed 0, two or three lrs tried per method; README "Tasks"). GaLore at its config's update scale 4.
LRS = {"lora": "4e-3", "dora": "4e-3", "lora_plus": "5e-4", "adalora": "3e-2", "galore": "3e-4",
       "full": "5e-5", "head": "3e-2"}


def steps(results_dir: str, variants: str, ranks: str, jobs: int) -> list[list[str]]:
    sweep = ["-m", "experiment=demo", f"results_dir={results_dir}", "logger=none"]
    if jobs > 1:
        sweep += ["launcher=joblib", f"hydra.launcher.n_jobs={jobs}"]
    train = [sys.executable, "-m", "experiments.train", *sweep]
    by_lr: dict[str, list[str]] = {}
    for name in variants.split(","):
        by_lr.setdefault(LRS[name], []).append(name)
    cmds = [[*train, f"variant={','.join(names)}", f"variant.rank={ranks}", f"optim.lr={lr}"]
            for lr, names in by_lr.items()]
    cmds += [[*train, f"variant={name}", f"optim.lr={LRS[name]}"] for name in ("full", "head")]
    return cmds + [[sys.executable, "-m", "experiments.plots", "--results-dir", results_dir],
                   [sys.executable, "-m", "experiments.aggregate", "--results-dir", results_dir, "--wandb"]]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results-dir", default="results/demo")
    ap.add_argument("--variants", default=",".join(LOW_RANK), help="the low-rank variants to sweep over rank")
    ap.add_argument("--ranks", default="2,8,32")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                    help="parallel runs (joblib), 1 torch thread each (default: 2; 1 = one process, all threads)")
    args = ap.parse_args(argv)
    unknown = sorted(set(args.variants.split(",")) - set(LOW_RANK))
    if unknown:
        print(f"error: --variants takes {', '.join(LOW_RANK)} (not {unknown[0]})", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for cmd in steps(args.results_dir, args.variants, args.ranks, args.jobs):
        shown = " ".join(["python", *cmd[1:]])
        print(f"\n[demo] $ {shown}", flush=True)
        if subprocess.run(cmd, env=env).returncode != 0:
            print(f"[demo] failed: {shown}", file=sys.stderr)
            return 1
    print(f"\n[demo] done in {time.perf_counter() - t0:.0f} s: tables in {args.results_dir}/tables, "
          f"plots in {args.results_dir}/plots", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
