"""Weights & Biases mirror of a run (the JSON record stays the source of truth).

``logger=wandb`` (default, offline unless WANDB_MODE says otherwise) or ``logger=none``. If W&B cannot
start (no login, no network, not installed) the run goes on with a one-line warning.
"""

from __future__ import annotations

import os
import sys

from experiments import records


class WandbRun:
    def __init__(self, cfg: dict):
        self.cfg, self.run = cfg, None
        opts = dict(cfg.get("logger") or {})
        if opts.pop("name", "none") != "wandb" or os.environ.get("WANDB_MODE") == "disabled":
            return
        try:
            import wandb

            mode = os.environ.get("WANDB_MODE") or opts.pop("mode", "offline")
            opts.pop("mode", None)
            quiet = opts.pop("quiet", True)  # W&B's per-run banner and history print drown a sweep's output
            variant, task = cfg["variant"]["name"], cfg["task"]["name"]
            wandb_dir = os.path.join(cfg["results_dir"], "wandb")
            os.makedirs(wandb_dir, exist_ok=True)
            self.run = wandb.init(
                mode=mode, dir=wandb_dir, config=records.semantic_config(cfg), group=records.group_id(cfg),
                name=f"{variant}-{task}-r{cfg['variant'].get('rank', '')}-s{cfg['seed']}",
                tags=[variant, task], reinit="finish_previous", settings=wandb.Settings(silent=quiet), **opts)
        except Exception as e:  # noqa: BLE001 - any failure to start W&B must not stop the run
            print(f"[lorabench] warning: W&B disabled for this run ({type(e).__name__}: {e})".splitlines()[0],
                  file=sys.stderr)
            self.run = None

    def log(self, metrics: dict, step: int) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)

    def finish_with(self, record: dict) -> None:
        if self.run is None:
            return
        self.run.tags = tuple(self.run.tags) + (record.get("model") or "",)
        summary = {"status": record["status"], "run_id": record["run_id"]}
        for split, metrics in (record.get("metrics") or {}).items():
            summary.update({f"{split}/{k}": v for k, v in metrics.items()})
        summary.update({f"cost/{k}": v for k, v in (record.get("cost") or {}).items() if v is not None})
        self.run.summary.update(summary)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.run is not None:
            self.run.finish(exit_code=1 if exc[0] else 0)
        return False
