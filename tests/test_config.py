"""One source of truth for every default: the library's dataclasses and task registrations are the schema,
the YAMLs under conf/ change only what they say they change, and docs/configuration.md lists every option."""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path

import pytest
import torch
from conftest import CONF, compose_config
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from tiny import tiny_bert

import variants
from experiments import schema, tasks
from experiments.train import _optim, _variant
from experiments.trainer import OptimConfig

ROOT = Path(CONF).parent
VARIANTS = sorted(p.stem for p in (ROOT / "conf" / "variant").glob("*.yaml"))
TASKS = sorted(p.stem for p in (ROOT / "conf" / "task").glob("*.yaml"))

# (group, option, key) -> why the YAML deliberately differs from the library default. Empty: every YAML
# composes to exactly the library's defaults. A task's or an experiment's settings of *other* groups (a
# task's optim budget, an experiment's sweep) are what those files are for and are not listed here.
DELIBERATE: dict[tuple[str, str, str], str] = {}


def _group(path: str) -> dict:
    """A group's YAML composed on its own (its schema node plus what the file sets)."""
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return OmegaConf.to_container(compose(path), resolve=False)[path.split("/")[0]]


def _differences(group: str, option: str, composed: dict, library: dict) -> list[str]:
    return [f"{group}/{option}.yaml: {k}={composed.get(k)!r}, library default {v!r}" for k, v in library.items()
            if composed.get(k) != v and (group, option, k) not in DELIBERATE] + \
           [f"{group}/{option}.yaml sets {k!r}, which the library does not know" for k in composed if k not in library]


def _plain(x):
    return list(x) if isinstance(x, tuple) else x


@pytest.mark.parametrize("name", VARIANTS)
def test_a_variant_yaml_composes_to_the_library_defaults(name):
    library = {"name": name, **{k: _plain(v) for k, v in dataclasses.asdict(variants.get(name).Config()).items()}}
    assert not _differences("variant", name, _group(f"variant/{name}"), library)


def test_the_optim_yaml_composes_to_the_trainer_defaults():
    library = {k: _plain(v) for k, v in dataclasses.asdict(OptimConfig()).items()}
    assert not _differences("optim", "adamw", _group("optim/adamw"), library)


@pytest.mark.parametrize("name", TASKS)
def test_a_task_yaml_composes_to_its_registered_defaults(name, tmp_path):
    spec = tasks.get(name)
    library = {"name": name, **{p.name: spec.defaults.get(p.name, p.default)
                                for p in inspect.signature(spec.build).parameters.values()}}
    composed = compose_config(results_dir=tmp_path, task=name)["task"]
    for key in schema.FROM_TOP_LEVEL:  # the top-level directories, by design
        if key in library:
            library[key] = compose_config(results_dir=tmp_path)[key]
    assert not _differences("task", name, composed, library)


def test_a_library_default_change_is_seen_by_the_config(monkeypatch):
    """The guard above can fail: a dataclass default the YAML does not follow is a difference."""
    composed = _group("variant/lora")
    library = {"name": "lora", **dataclasses.asdict(variants.get("lora").Config(rank=4))}
    assert _differences("variant", "lora", composed, library) == [
        "variant/lora.yaml: rank=8, library default 4"]


@pytest.mark.parametrize("name", VARIANTS)
def test_create_and_the_config_build_the_same_variant_and_optimizer(name, tmp_path):
    """``variants.create(x, <the task's head and targets>)`` and ``variant=x`` train identically."""
    cfg = compose_config(f"variant={name}", results_dir=tmp_path, task="sentiment")
    spec = tasks.get("sentiment")
    from_config = _variant(cfg, spec)
    task_resolved = {"head": spec.head, "train_head": spec.train_head, "targets": spec.default_targets}
    library = variants.create(name, **{k: v for k, v in task_resolved.items()
                                       if getattr(variants.get(name).Config(), k, "") is None})
    assert from_config.cfg == library.cfg
    optim = _optim(cfg)
    groups = []
    for v in (from_config, library):
        torch.manual_seed(0)
        model = v.apply(tiny_bert())
        opt = v.optimizer(model, lr=optim.lr, weight_decay=optim.weight_decay, betas=optim.betas, eps=optim.eps)
        groups.append((type(opt), [({k: val for k, val in g.items() if k != "params"},
                                    [tuple(p.shape) for p in g["params"]]) for g in opt.param_groups]))
    assert groups[0] == groups[1]


@pytest.mark.parametrize(("override", "message"), [
    ("variant.rank=1.5", "could not be converted to Integer"),
    ("optim.batch_size=abc", "could not be converted to Integer"),
    ("optim.warmup_ratio=abc", "could not be converted to Float"),
    ("task.n_train=abc", "could not be converted to Integer"),
    ("variant.nope=1", "Could not override 'variant.nope'"),
])
def test_option_types_are_checked_at_composition(override, message, tmp_path):
    with pytest.raises(Exception) as e:
        compose_config(override, results_dir=tmp_path, task="synthetic")
    assert message in f"{e.value} {e.value.__cause__}"


# --- docs/configuration.md -----------------------------------------------------------------------

DOC = ROOT / "docs" / "configuration.md"


def _documented() -> set[str]:
    keys = set()
    for line in DOC.read_text().splitlines():
        m = re.match(r"\|\s*`([^`]+)`", line)
        if m:
            keys.add(m.group(1))
    return keys


def _leaves(cfg: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in cfg.items():
        if isinstance(v, dict) and v and k != "betas":
            out |= _leaves(v, f"{prefix}{k}.")
        else:
            out.add(f"{prefix}{k}")
    return out


def test_every_option_of_every_group_is_in_the_configuration_docs(tmp_path):
    documented, missing = _documented(), set()
    top = compose_config(results_dir=tmp_path)
    missing |= {k for k in top if not isinstance(top[k], dict) and k not in documented}
    missing |= {f"optim.{k}" for k in top["optim"]} - documented
    for name in VARIANTS:
        missing |= {f"variant.{k}" for k in compose_config(f"variant={name}", results_dir=tmp_path)["variant"]}
    for name in TASKS:
        missing |= {f"task.{k}" for k in compose_config(results_dir=tmp_path, task=name)["task"]}
    assert not missing - documented, sorted(missing - documented)
    text = DOC.read_text()
    for group in ("variant", "task", "optim", "logger", "launcher", "experiment"):
        for option in sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml")):
            assert f"`{option}`" in text, f"conf/{group}/{option}.yaml is not in docs/configuration.md"
