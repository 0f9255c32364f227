"""``make demo``: a small real sweep on the sentiment task -> table -> plots, offline, ~10 min on 2 cores.

It runs exactly what a user would type (printed before each step), so the demo doubles as a recipe:

    python -m experiments.train -m experiment=demo variant=lora,lora_plus,dora,galore,adalora variant.rank=2,8,32
    python -m experiments.train -m experiment=demo variant=head
    python -m experiments.train -m experiment=demo variant=full optim.lr=5e-5
    python -m experiments.aggregate --results-dir results/demo
    python -m experiments.plots --results-dir results/demo

Finished runs are skipped, so an interrupted demo resumes where it stopped.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

LOW_RANK = "lora,lora_plus,dora,galore,adalora"


def steps(results_dir: str, variants: str, ranks: str, jobs: int) -> list[list[str]]:
    sweep = ["-m", "experiment=demo", f"results_dir={results_dir}", "logger=none"]
    if jobs > 1:
        sweep += ["launcher=joblib", f"hydra.launcher.n_jobs={jobs}"]
    train = [sys.executable, "-m", "experiments.train"]
    return [
        [*train, *sweep, f"variant={variants}", f"variant.rank={ranks}"],
        [*train, *sweep, "variant=head"],
        [*train, *sweep, "variant=full", "optim.lr=5e-5"],  # the adapters' lr (4e-3) wrecks full fine-tuning
        [sys.executable, "-m", "experiments.aggregate", "--results-dir", results_dir],
        [sys.executable, "-m", "experiments.plots", "--results-dir", results_dir],
    ]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results-dir", default="results/demo")
    ap.add_argument("--variants", default=LOW_RANK)
    ap.add_argument("--ranks", default="2,8,32")
    ap.add_argument("--jobs", type=int, default=1, help="parallel runs (joblib), 1 torch thread each")
    args = ap.parse_args(argv)
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
