import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# cached pretrained bases (digits) go to a per-session temporary directory, never the user's cache
os.environ.setdefault("LORABENCH_CACHE", tempfile.mkdtemp(prefix="lorabench-cache-"))
sys.path.insert(0, os.path.dirname(__file__))  # tests/tiny.py

import torch  # noqa: E402

# Tiny models gain nothing from intra-op threads, and pytest-xdist already runs one worker per core.
torch.set_num_threads(1)

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def compose_config(*overrides: str, results_dir, cache_dir=None, task: str | None = None,
                   smoke: bool = False) -> dict:
    """The resolved run config exactly as ``experiments.train`` composes it, writing under ``results_dir``
    (and ``cache_dir`` when given; else the session's temporary cache). ``task`` picks the task group;
    ``smoke=True`` adds the task's declared smoke size (``register_task(smoke=...)``) before ``overrides``."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import experiments.schema  # noqa: F401  (stores the structured configs the YAMLs start from)

    pre = [f"results_dir={results_dir}", *([f"cache_dir={cache_dir}"] if cache_dir is not None else [])]
    if task is not None:
        pre.append(f"task={task}")
    if smoke:
        pre += smoke_overrides(task or _task_of(overrides))
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", overrides=[*pre, *overrides])
    return OmegaConf.to_container(cfg, resolve=True)


def smoke_overrides(task: str) -> list[str]:
    """``task.<option>=<value>`` for the task's smoke size: it builds in seconds."""
    from experiments import tasks

    return [f"task.{k}={v}" for k, v in tasks.get(task).smoke.items()]


def _task_of(overrides) -> str:
    return next((o.split("=", 1)[1] for o in overrides if o.startswith("task=")), "synthetic")
