"""Hydra callback: after a multirun, one summary of what each job did (failures never abort a sweep)."""

from __future__ import annotations

import json
from pathlib import Path

from hydra.experimental.callback import Callback

JOBS_FILE = "jobs.jsonl"
LAST_SWEEP: dict[str, int] = {}  # the counts of the last multirun in this process (the CLI's exit code)


def note_job(sweep_dir: str, entry: dict) -> None:
    """Append one job's outcome (a single short line: appends of it do not interleave)."""
    path = Path(sweep_dir) / JOBS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(entry) + "\n")


class SweepSummary(Callback):
    def on_multirun_start(self, config, **kwargs) -> None:
        (Path(config.hydra.sweep.dir) / JOBS_FILE).unlink(missing_ok=True)  # a reused sweep dir: this sweep's only

    def on_multirun_end(self, config, **kwargs) -> None:
        path = Path(config.hydra.sweep.dir) / JOBS_FILE
        jobs = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        counts = {s: sum(j["status"] == s for j in jobs) for s in ("ok", "skipped", "failed", "invalid")}
        LAST_SWEEP.clear()
        LAST_SWEEP.update(counts)
        print(f"[lorabench] sweep done: {len(jobs)} jobs: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
        for j in jobs:
            if j["status"] in ("failed", "invalid"):
                print(f"[lorabench]   {j['status']}: {j.get('run_id') or j['overrides']}: {j['error']}")
