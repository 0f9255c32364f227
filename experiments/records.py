"""Run records: one JSON file per run, the source of truth (W&B is a view of it).

``run_id`` is a stable hash of the resolved config without the keys that do not change the result
(where outputs go, logging, ``force``), so re-running a finished config is detected and skipped.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import subprocess
from collections.abc import Iterator
from pathlib import Path

from experiments.files import atomic_write

SCHEMA = 1
# the record's fields that name a setting -> the config key each one resolves (the record's rank is the
# rank in use, its targets the module names matched...); aggregation reads the field, not the config key
IDENTITY_KEYS = {"task": "task.name", "variant": "variant.name", "rank": "variant.rank", "alpha": "variant.alpha",
                 "scaling": "variant.scaling", "targets": "variant.targets", "lr": "optim.lr", "seed": "seed"}
# where things go, how they are shown, how fast they run: none of it changes a run's result
NON_SEMANTIC = ("results_dir", "cache_dir", "assets_dir", "logger", "force", "save_adapter", "progress", "hydra",
                "threads_per_job", "checkpoint_every", "task.cache_dir", "task.assets_dir",
                "eval_merged", "compile",  # merged weights, compiled kernels: the same math, float rounding aside
                "snapshot_steps", "snapshot_targets",  # weights saved on the way: the run is unchanged
                "profile_memory",  # one step measured by the memory profiler: the same step, only watched
                "model.gradient_checkpointing")  # recomputes activations: same result, less memory


def semantic_config(cfg: dict, drop: tuple[str, ...] = NON_SEMANTIC) -> dict:
    """``cfg`` without the ``drop`` keys (dotted keys reach into nested groups: ``task.cache_dir``)."""
    out = {}
    for k, v in cfg.items():
        if k in drop:
            continue
        nested = tuple(d[len(k) + 1:] for d in drop if d.startswith(f"{k}."))
        out[k] = semantic_config(v, nested) if nested and isinstance(v, dict) else v
    return out


# nodes left out of the hash while they hold these (default) values, so that the ids of runs made before
# the node existed stay the same: the top-level model node (an unquantized base) came in after 445b5a6
OMITTED_AT_DEFAULT = {"model": {"quantize": "none"}}


def run_id(cfg: dict) -> str:
    semantic = semantic_config(cfg)
    semantic = {k: v for k, v in semantic.items() if OMITTED_AT_DEFAULT.get(k, object()) != v}
    blob = json.dumps(semantic, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def group_id(cfg: dict) -> str:
    """The run id without the seed: seeds of one setting share it (W&B group, aggregation)."""
    return run_id({k: v for k, v in cfg.items() if k != "seed"})


def record_path(results_dir: str | os.PathLike, rid: str) -> Path:
    return Path(results_dir) / "runs" / f"{rid}.json"


def load(path: str | os.PathLike) -> dict:
    with open(path) as f:
        return json.load(f)


@contextlib.contextmanager
def claimed(results_dir, rid: str, force: bool = False) -> Iterator[bool]:
    """Hold ``runs/<run_id>.lock`` while a run trains, so that two workers of a sweep (or two sweeps) never
    train one config twice. Created exclusively (``O_EXCL``); yields False when another live process holds
    it. A lock whose process is gone (killed, the machine rebooted) is taken over; so is any lock with
    ``force``. A lock of another host cannot be checked and counts as held (``force=true`` takes it)."""
    path = record_path(results_dir, rid).with_suffix(".lock")
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            if not force and _held(path):
                yield False
                return
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{platform.node()} {os.getpid()}\n")
        try:
            yield True
        finally:
            path.unlink(missing_ok=True)
        return
    yield False


def _held(lock: Path) -> bool:
    try:
        host, pid = lock.read_text().split()
        pid = int(pid)
    except (OSError, ValueError):
        return False  # unreadable or half-written: a crashed claim
    if host != platform.node():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class NewerRecord(ValueError):
    """A record written by a newer lorabench (a schema this version does not know)."""


def finished(results_dir, rid: str) -> bool:
    """A finished (``ok``) record of this schema exists. A missing, corrupt or non-object record is
    unfinished (the run goes again and replaces it); a record of a newer schema is a NewerRecord error."""
    path = record_path(results_dir, rid)
    try:
        record = load(path)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        if path.exists():
            print(f"[lorabench] note: {path} is not valid JSON: treated as unfinished, the run goes again")
        return False
    if not isinstance(record, dict):
        print(f"[lorabench] note: {path} is not a run record: treated as unfinished, the run goes again")
        return False
    schema = record.get("schema")
    if isinstance(schema, int) and schema > SCHEMA:
        raise NewerRecord(f"{path} has record schema {schema}, newer than this lorabench reads ({SCHEMA}): "
                          "update lorabench, or use another results_dir")
    return record.get("status") == "ok"


def write(results_dir, record: dict) -> Path:
    """Atomic: a reader (or a resumed sweep) never sees half a record."""
    def dump(tmp: Path) -> None:
        tmp.write_text(json.dumps(record, indent=1, default=_jsonable) + "\n")

    return atomic_write(record_path(results_dir, record["run_id"]), dump)


def _jsonable(x):
    if hasattr(x, "tolist"):
        return x.tolist()
    return str(x)


def environment(device: str) -> dict:
    from importlib import metadata

    import torch
    import transformers

    try:  # not imported: peft is only a test oracle, and importing it pulls bitsandbytes
        peft_version = metadata.version("peft")
    except metadata.PackageNotFoundError:
        peft_version = None
    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft_version,
            "python": platform.python_version(), "git": _git_commit(), "device": device,
            "threads": torch.get_num_threads()}


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
