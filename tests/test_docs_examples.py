"""The extension recipes in docs/ work as written: the example task of docs/tasks.md registers, builds
and trains through the shared trainer, and the example plot of docs/metrics_and_plots.md registers."""

from __future__ import annotations

import re
import types
from pathlib import Path

import yaml

import variants
from experiments import tasks
from experiments.trainer import OptimConfig, fit

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _block(doc: str, lang: str, first_line: str) -> str:
    for code in re.findall(rf"```{lang}\n(.*?)```", (DOCS / doc).read_text(), flags=re.S):
        if code.startswith(first_line):
            return code
    raise AssertionError(f"no ```{lang} block starting with {first_line!r} in docs/{doc}")


def test_the_example_task_registers_builds_and_trains():
    module = types.ModuleType("parity_example")
    try:
        exec(compile(_block("tasks.md", "python", "# experiments/tasks/parity.py"), "parity.py", "exec"),
             module.__dict__)
        spec = tasks.get("parity")
        assert spec.head == ("fc2",) and spec.smoke == {"n_train": 64, "n_val": 32, "n_test": 32}
        task = tasks.build("parity", **spec.smoke)
        v = variants.create("lora", rank=2, targets=spec.default_targets, head=spec.head,
                            train_head=spec.train_head)
        result = fit(v.apply(task.model), v, task, OptimConfig(lr=1e-2, max_steps=20, batch_size=16),
                     device="cpu", progress=False)
        assert 0 <= result["metrics"]["test"]["accuracy"] <= 1
        config = yaml.safe_load(_block("tasks.md", "yaml", "# @package _global_\n# Parity"))
        assert config["defaults"][0] == "/schema/task/parity@task" and "optim" in config
    finally:
        tasks._REGISTRY.pop("parity", None)  # the registry is global: leave it as the other tests expect


def test_the_example_plot_registers():
    from experiments import plots

    code = _block("metrics_and_plots.md", "python", "# experiments/plots.py")
    namespace = {**vars(plots)}
    try:
        exec(compile(code.replace("...;", "").replace("; ...", ""), "plots_example.py", "exec"), namespace)
        assert "val_vs_test" in plots.PLOTS
    finally:
        plots.PLOTS.pop("val_vs_test", None)
