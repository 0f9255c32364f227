"""The config schema: Hydra structured configs made from the library's own dataclasses and signatures.

Every default lives once, in Python: a variant's options in its ``Config`` dataclass (``variants/``), the
optimisation budget in ``OptimConfig`` (``experiments/trainer.py``), a task's options in its builder's
signature plus the defaults its registration sets (``experiments/tasks/``), how a pretrained base is loaded
(quantized, gradient checkpointing) in ``ModelOptions`` (``experiments/hub.py``). ``register()`` stores one
schema node per variant, per task, for ``optim`` and for ``model`` in Hydra's ConfigStore
(``schema/variant/<name>``, ``schema/task/<name>``, ``schema/optim``, ``schema/model``); each YAML under
``conf/`` starts from its node and sets only what it deliberately changes (a task's optimisation budget,
an experiment's sweep; ``conf/train.yaml`` takes ``schema/model`` as it is). Hydra then checks every
option's type while composing (``optim.lr=abc``, ``variant.rank=1.5`` fail before anything runs) and
rejects unknown keys. ``variants.create(x)`` and ``variant=x`` build the same variant, by construction.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from typing import Any

from hydra.core.config_store import ConfigStore

import variants
from experiments import tasks
from experiments.hub import ModelOptions
from experiments.trainer import OptimConfig

# task options that follow a top-level key (one cache and one assets directory for every task)
FROM_TOP_LEVEL = {"cache_dir": "${cache_dir}", "assets_dir": "${assets_dir}"}


def variant_node(name: str) -> type:
    """``Config`` of variant ``name`` plus its ``name`` key."""
    config = variants.get(name).Config
    return dataclasses.make_dataclass(f"{config.__name__}Node", [("name", str, dataclasses.field(default=name))],
                                      bases=(config,))


def task_node(name: str) -> type:
    """The options of task ``name``: its builder's parameters, with the builder's defaults overridden by the
    registration's, and the cache and assets directories following the top-level keys. Keyword-only
    parameters are not options: the entry point fills them (``loading``: the top-level ``model`` node)."""
    spec = tasks.get(name)
    hints = typing.get_type_hints(spec.build)
    fields = [("name", str, dataclasses.field(default=name))]
    for p in inspect.signature(spec.build).parameters.values():
        if p.kind is inspect.Parameter.KEYWORD_ONLY:
            continue
        default = FROM_TOP_LEVEL.get(p.name, spec.defaults.get(p.name, p.default))
        fields.append((p.name, hints.get(p.name, Any), dataclasses.field(default=default)))
    return dataclasses.make_dataclass(f"{name.title().replace('_', '')}TaskNode", fields)


def optim_node() -> type:
    """``OptimConfig``, with ``lr`` open to a per-variant map (``optim.lr={lora:3e-3,full:5e-5}``; the entry
    point picks the run's value and checks it is a positive number)."""
    return dataclasses.make_dataclass("OptimNode", [("lr", Any, dataclasses.field(default=OptimConfig.lr))],
                                      bases=(OptimConfig,))


def model_node() -> type:
    """``ModelOptions``: the top-level ``model`` node (``model.quantize=nf4``, ``model.gradient_checkpointing``)."""
    return dataclasses.make_dataclass("ModelNode", [], bases=(ModelOptions,))


def register() -> None:
    """Store every schema node (idempotent; called on import)."""
    cs = ConfigStore.instance()
    for name in variants.available():
        cs.store(group="schema/variant", name=name, node=variant_node(name))
    for name in tasks.available():
        cs.store(group="schema/task", name=name, node=task_node(name))
    cs.store(group="schema", name="optim", node=optim_node())
    cs.store(group="schema", name="model", node=model_node())


register()
