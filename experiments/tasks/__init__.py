"""Tasks: each knows its data, its model and its metrics, and nothing about variants.

A task is a builder function registered under a name, with what can be known before anything is built::

    @register_task("parity", head=("fc2",), train_head=True, default_targets=["fc1"],
                   metrics={"accuracy": "max"}, main_metric="accuracy", smoke={"n_train": 64})
    def build(n_train: int = 2048, ...) -> Task:
        ...
        return Task(model=..., model_name=..., train=..., val=..., test=..., loss=..., evaluate=...)

The spec (``tasks.get(name)``) tells the entry point the task's head, whether it trains and its default
targets, so the variant is created once, before the model exists. ``tasks.build(name, **options)`` checks
the options against the builder's signature, builds the ``Task`` and attaches its spec. One builder may be
registered under several names (stacked decorators: ``sentiment``, ``reviews``, ``glue_sst2`` ...); the
YAML of each name sets the options that tell them apart.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


class TaskError(ValueError):
    """Unknown task, bad task option or a missing asset (one-line message)."""


@dataclass(frozen=True)
class TaskSpec:
    """What a registered task declares up front."""

    name: str
    build: Callable[..., Task]
    metrics: dict[str, str]  # every metric ``evaluate`` returns -> "max" (higher is better) or "min"
    main_metric: str  # the metric lr selection, tables and plots use
    head: tuple[str, ...] = ()  # module names forming the task head (never wrapped by an adapter)
    train_head: bool = True  # a newly initialised head must train; a pretrained or tied one need not
    default_targets: Any = "all-linear"  # the variant's targets when the config leaves them null
    hub: bool = False  # needs the Hugging Face hub (tests compose it but never build it)
    smoke: dict = field(default_factory=dict)  # task options that build in seconds (the tests' size)
    defaults: dict = field(default_factory=dict)  # this name's option values where they differ from the builder's

    @property
    def options(self) -> list[str]:
        return list(inspect.signature(self.build).parameters)


_REGISTRY: dict[str, TaskSpec] = {}


def register_task(name: str, *, metrics: dict[str, str], main_metric: str, head: tuple[str, ...] = (),
                  train_head: bool = True, default_targets: Any = "all-linear", hub: bool = False,
                  smoke: dict | None = None, defaults: dict | None = None):
    """Decorator: register ``build(**options) -> Task`` as task ``name`` (stackable: several names, each
    with its ``defaults``: the options that make it that task, e.g. ``{"dataset": "fine_foods"}``)."""
    bad = {m: d for m, d in metrics.items() if d not in ("max", "min")}
    if main_metric not in metrics or bad:
        raise ValueError(f"task {name!r}: every metric needs a direction ('max' or 'min'), the main metric "
                         f"{main_metric!r} included; declared {metrics}")

    def deco(build: Callable[..., Task]) -> Callable[..., Task]:
        params = inspect.signature(build).parameters
        for option in [*(defaults or {}), *(smoke or {})]:
            if option not in params:
                raise ValueError(f"task {name!r}: {option!r} is not an option of {build.__qualname__}")
        _REGISTRY[name] = TaskSpec(name=name, build=build, metrics=dict(metrics), main_metric=main_metric,
                                   head=tuple(head), train_head=train_head, default_targets=default_targets,
                                   hub=hub, smoke=dict(smoke or {}), defaults=dict(defaults or {}))
        return build

    return deco


def available() -> list[str]:
    return sorted(_REGISTRY)


def get(name: str) -> TaskSpec:
    if name not in _REGISTRY:
        raise TaskError(f"unknown task {name!r} (available: {', '.join(available())})")
    return _REGISTRY[name]


def check_options(name: str, options: dict) -> TaskSpec:
    """The spec of task ``name``, once every option is known to its builder."""
    spec = get(name)
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        raise TaskError(f"unknown option task.{unknown[0]} for task {name!r} (options: {', '.join(spec.options)})")
    return spec


def build(name: str, **options) -> Task:
    spec = check_options(name, options)
    task = spec.build(**{**spec.defaults, **options})
    task.spec = spec
    return task


@dataclass
class Task:
    """A built task: the model, the splits, the loss and the metrics. Its spec is attached by ``build``."""

    model: nn.Module
    model_name: str
    train: torch.utils.data.Dataset
    val: torch.utils.data.Dataset
    test: torch.utils.data.Dataset
    loss: Callable[[nn.Module, dict], torch.Tensor]
    evaluate: Callable[[nn.Module, Any], dict]  # a DataLoader of batches -> {"accuracy": ..., ...}
    # the metrics of the task's trivial solution ({"name": ..., "val": {...}, "test": {...}}): the majority
    # class, the untouched model... A run no better than it did not train (aggregate flags it)
    trivial: dict | None = None
    collate: Callable | None = None
    info: dict = field(default_factory=dict)  # data fingerprints, split sizes... (the record's task_info)
    spec: TaskSpec | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def head(self) -> tuple[str, ...]:
        return self.spec.head

    @property
    def directions(self) -> dict[str, str]:
        return self.spec.metrics

    @property
    def main_metric(self) -> str:
        return self.spec.main_metric

    @property
    def higher_is_better(self) -> bool:
        return self.directions[self.main_metric] == "max"


from . import causal_lm, custom, digits, synthetic, text_classification  # noqa: E402,F401  (importing registers)
