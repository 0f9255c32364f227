"""``make demo``: a small real sweep, then a table. Until the real tasks land (issues 5-6) it runs on the
seconds-long ``synthetic`` task: every low-rank variant x rank {1, 2, 4, 8} against a rank-4 teacher,
plus full fine-tuning, into ``results/demo/``; finished runs are skipped on a re-run.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from experiments.train import run

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--results-dir", default="results/demo")
    ap.add_argument("--ranks", default="1,2,4,8")
    ap.add_argument("--variants", default="lora,lora_plus,dora,adalora,galore")
    args = ap.parse_args(argv)
    jobs = [(v, int(r)) for v in args.variants.split(",") for r in args.ranks.split(",")] + [("full", None)]
    rows, t0 = [], time.perf_counter()
    for i, (variant, rank) in enumerate(jobs, 1):
        overrides = [f"variant={variant}", f"results_dir={args.results_dir}", "logger=none", "progress=false"]
        if rank is not None:
            overrides += [f"variant.rank={rank}"]
        with initialize_config_dir(config_dir=CONF, version_base="1.3"):
            cfg = OmegaConf.to_container(compose("train", overrides=overrides), resolve=True)
        rec = run(cfg)
        print(f"[{i}/{len(jobs)}] {variant} rank={rank}: {rec['status']}", flush=True)
        if rec["status"] == "ok":
            c = rec["cost"]
            rows.append((variant, rank or "-", rec["metrics"]["test"]["fit"], c["trainable_params"],
                         c["optimizer_state_bytes"], c["step_time_ms"]))
    print(f"\nsynthetic task (teacher update of rank {cfg['task']['true_rank']}), "
          f"{time.perf_counter() - t0:.0f} s\n")
    print("| variant | rank | test fit | trainable params | optimizer state (bytes) | ms/step |")
    print("|---|---|---|---|---|---|")
    for v, r, fit, n, ob, ms in rows:
        print(f"| {v} | {r} | {fit:.4f} | {n:,} | {ob:,} | {ms:.2f} |")


if __name__ == "__main__":
    main()
