"""Plots render from records, with one line per variant and the baselines as references."""

from __future__ import annotations

import numpy as np
import pandas as pd
from test_aggregate import record

from experiments import aggregate, plots


def test_rank_plot_has_one_line_per_variant_and_reference_lines(tmp_path, monkeypatch):
    for seed in range(3):
        for rank in (1, 2, 4):
            record(tmp_path, "lora", seed, 1e-3, val=0.5, test=0.5 + 0.1 * rank + 0.01 * seed, rank=rank)
            record(tmp_path, "dora", seed, 1e-3, val=0.5, test=0.6 + 0.1 * rank + 0.01 * seed, rank=rank)
        record(tmp_path, "full", seed, 1e-3, val=0.5, test=0.9, rank=None)
    captured = {}
    real_save = plots._save

    def keep(fig, out_dir, stem):
        captured[stem] = [(ln.get_label(), list(ln.get_xdata())) for ln in fig.axes[0].get_lines()]
        return real_save(fig, out_dir, stem)

    monkeypatch.setattr(plots, "_save", keep)
    paths = plots.make_all(tmp_path)
    assert {p.suffix for p in paths} == {".png", ".svg"} and all(p.stat().st_size > 1000 for p in paths)
    lines = dict(captured["rank_vs_accuracy_toy"])
    assert lines["lora"] == [1, 2, 4] and lines["dora"] == [1, 2, 4] and "full (no rank)" in lines
    assert len(lines) == 3
    assert "loss_toy" not in captured  # hand-built records carry no history: no empty plot


def test_a_variant_with_two_settings_gets_two_rank_lines(tmp_path, monkeypatch):
    for seed in range(2):
        for rank in (2, 8):
            for scale in (0.25, 4.0):
                cfg = {"seed": seed, "variant": {"name": "galore", "scale": scale}}
                record(tmp_path, "galore", seed, 1e-3, val=0.5, test=scale / 10 + rank / 100, rank=rank, config=cfg)
    captured = {}
    monkeypatch.setattr(plots, "_save", lambda fig, out_dir, stem: captured.setdefault(
        stem, {ln.get_label(): list(ln.get_ydata()) for ln in fig.axes[0].get_lines()}) and [])
    plots.make_all(tmp_path)
    lines = captured["rank_vs_accuracy_toy"]
    assert lines.keys() == {"galore scale=0.25", "galore scale=4.0"}
    assert np.allclose(lines["galore scale=4.0"], [0.42, 0.48])


def test_pareto_front_keeps_only_undominated_points():
    x = np.array([1.0, 2.0, 3.0, 4.0, 2.5])
    y = np.array([0.5, 0.7, 0.6, 0.9, 0.7])
    assert plots.pareto_front(x, y, higher_is_better=True).tolist() == [0, 1, 3]
    assert plots.pareto_front(x, -y, higher_is_better=False).tolist() == [0, 1, 3]


def test_summary_columns_feed_the_plots(tmp_path):
    record(tmp_path, "lora", 0, 1e-3, val=0.5, test=0.5)
    df, _ = aggregate.load(tmp_path)
    s = aggregate.summarize(df, "accuracy")
    assert isinstance(s, pd.DataFrame) and {"mean", "ci_low", "ci_high", "rank", "trainable_params"} <= set(s)
