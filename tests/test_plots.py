"""Plots render from records, with one line per variant and the baselines as references."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from test_aggregate import CLS, LM, record

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


def _capture(monkeypatch) -> dict:
    """stem -> (title, y label, {line label: (x, y)}) of each figure the plots save (nothing written)."""
    captured = {}

    def keep(fig, out_dir, stem):
        ax = fig.axes[0]
        captured[stem] = (ax.get_title(), ax.get_ylabel(),
                          {ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata())) for ln in ax.get_lines()})
        plots.plt.close(fig)
        return []

    monkeypatch.setattr(plots, "_save", keep)
    return captured


def test_each_task_is_drawn_in_its_own_direction_with_its_trivial_baseline(tmp_path, monkeypatch):
    for seed in range(3):
        for rank, trainable in ((2, 100), (8, 400)):
            record(tmp_path, "lora", seed, 1e-3, val=0.8, test=0.70 + rank / 100, rank=rank, trainable=trainable,
                   **CLS)
            # perplexity: rank 8 is better (lower) and dearer; dora rank 2 is dominated by lora rank 2
            record(tmp_path, "lora", seed, 1e-3, val=20, test=22 - rank / 2, rank=rank, trainable=trainable, **LM)
            record(tmp_path, "dora", seed, 1e-3, val=20, test=25.0, rank=rank, trainable=trainable + 10, **LM)
    (tmp_path / "runs" / "null.json").write_text("null")  # aggregate lists it; the loss curves skip it
    captured = _capture(monkeypatch)
    plots.make_all(tmp_path)
    title, ylabel, lines = captured["rank_vs_accuracy_toy"]
    assert ylabel == "test accuracy" and "95% CI (t, n=3)" in title
    assert lines["trivial: majority class (label 1)"][1] == [0.5775, 0.5775]
    title, ylabel, lines = captured["rank_vs_perplexity_lm"]
    assert ylabel == "test perplexity (lower is better)" and lines["trivial: the untouched model"][1] == [31.0, 31.0]
    _, ylabel, lines = captured["pareto_trainable_params_lm"]
    assert ylabel == "test perplexity (lower is better)"
    assert lines["Pareto front"] == ([100.0, 400.0], [21.0, 18.0])  # the lowest perplexity at each cost
    assert captured["pareto_trainable_params_toy"][2]["Pareto front"] == ([100.0, 400.0], pytest.approx([0.72, 0.78]))


def test_a_metric_without_a_direction_is_one_error_line(tmp_path, capsys):
    for seed in range(2):  # older records: no "directions", so macro_f1's is unknown
        metrics = {split: {"accuracy": 0.8, "macro_f1": 0.6 + seed / 10} for split in ("val", "test")}
        record(tmp_path, "lora", seed, 1e-3, val=0, test=0, metrics=metrics)
    assert plots.main(["--results-dir", str(tmp_path), "--metric", "macro_f1", "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: metric 'macro_f1' has no declared direction") and err.count("\n") == 1
