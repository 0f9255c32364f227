"""Tasks: each knows its data, its model and its metric, and nothing about variants.

``build(name, **options) -> Task`` where a task bundles the model, the ``TaskData`` the trainer consumes,
and what the variant needs to know about the model (its head, whether the head is new and must train).
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field

from torch import nn

from experiments.trainer import TaskData

_TEXT, _LM = "experiments.tasks.text_classification", "experiments.tasks.causal_lm"
TASKS = {"synthetic": "experiments.tasks.synthetic", "digits": "experiments.tasks.digits",
         "sentiment": _TEXT, "reviews": _TEXT, "glue_sst2": _TEXT, "glue_mrpc": _TEXT,  # offline / hub
         "lm": _LM, "lm_gsm8k": _LM}


class TaskError(ValueError):
    """Unknown task, bad task option or a missing asset (one-line message)."""


@dataclass
class Task:
    name: str
    model_name: str
    model: nn.Module
    data: TaskData
    head: tuple[str, ...] = ()  # module names forming the task head
    train_head: bool = True  # a newly initialised head must train; a pretrained/tied one need not
    default_targets: object = "all-linear"
    info: dict = field(default_factory=dict)


def check_name(name: str) -> None:
    if name not in TASKS:
        raise TaskError(f"unknown task {name!r} (available: {', '.join(sorted(TASKS))})")


def build(name: str, **options) -> Task:
    check_name(name)
    module = importlib.import_module(TASKS[name])
    known = inspect.signature(module.build).parameters
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise TaskError(f"unknown option task.{unknown[0]} for task {name!r} (options: {', '.join(known)})")
    task = module.build(**options)
    task.name = name  # one module may serve several configs (sentiment, reviews, glue_sst2, ...)
    return task
