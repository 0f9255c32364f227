"""Weights & Biases mirror of a run (the JSON record stays the source of truth).

``logger=wandb`` (default, offline unless WANDB_MODE says otherwise) or ``logger=none``. If W&B cannot
start (no login, no network, not installed) the run goes on with a one-line warning.
"""

from __future__ import annotations

import os
import sys

from experiments import records


def _start(results_dir, mode: str, quiet: bool, **init):
    """A W&B run under ``<results_dir>/wandb``, or None with a one-line warning if W&B cannot start (no
    login, no network, not installed): W&B mirrors what is on disk, so it never stops the work."""
    try:
        import wandb

        wandb_dir = os.path.join(results_dir, "wandb")
        os.makedirs(wandb_dir, exist_ok=True)
        return wandb.init(mode=mode, dir=wandb_dir, reinit="finish_previous", settings=wandb.Settings(silent=quiet),
                          **init)
    except Exception as e:  # noqa: BLE001
        print(f"[lorabench] warning: W&B disabled ({type(e).__name__}: {e})".splitlines()[0], file=sys.stderr)
        return None


class WandbRun:
    def __init__(self, cfg: dict):
        self.cfg, self.run = cfg, None
        opts = dict(cfg.get("logger") or {})
        if opts.pop("name", "none") != "wandb" or os.environ.get("WANDB_MODE") == "disabled":
            return
        mode = os.environ.get("WANDB_MODE") or opts.pop("mode", "offline")
        opts.pop("mode", None)
        quiet = opts.pop("quiet", True)  # W&B's per-run banner and history print drown a sweep's output
        variant, task = cfg["variant"]["name"], cfg["task"]["name"]
        self.run = _start(cfg["results_dir"], mode, quiet, config=records.semantic_config(cfg),
                          group=records.group_id(cfg), tags=[variant, task],
                          name=f"{variant}-{task}-r{cfg['variant'].get('rank', '')}-s{cfg['seed']}", **opts)

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


def log_summary(results_dir, tables: dict, images: list, project: str = "lorabench") -> str | None:
    """One W&B run (job_type ``summary``) holding a sweep's tables (``wandb.Table``) and plots
    (``wandb.Image``), next to the per-run mirrors in ``<results_dir>/wandb``. Offline unless WANDB_MODE
    says otherwise; WANDB_MODE=disabled logs nothing. Returns the run's local folder, or None."""
    mode = os.environ.get("WANDB_MODE") or "offline"
    if mode == "disabled":
        return None
    name = os.path.basename(os.path.abspath(results_dir))
    run = _start(results_dir, mode, True, project=project, job_type="summary", name=f"summary-{name}",
                 tags=["summary"])
    if run is None:
        return None
    try:
        import wandb

        for key, df in ((k, v) for k, v in tables.items() if not v.empty):
            flat = df.reset_index(drop=True).astype({c: str for c in df.columns if df[c].dtype == object})
            run.log({f"table/{key}": wandb.Table(dataframe=flat)})
        run.log({f"plot/{os.path.splitext(os.path.basename(p))[0]}": wandb.Image(str(p)) for p in images})
        folder = run.dir
        run.finish()
        return os.path.dirname(folder)
    except Exception as e:  # noqa: BLE001 - the tables are already on disk; W&B is a mirror
        print(f"[lorabench] warning: W&B summary not logged ({type(e).__name__}: {e})".splitlines()[0],
              file=sys.stderr)
        return None
