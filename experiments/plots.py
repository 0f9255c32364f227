"""Plots from run records (matplotlib, PNG + SVG): rank vs quality, Pareto fronts, loss curves.

    python -m experiments.plots [--results-dir results] [--metric accuracy] [--task sentiment]

Reads records only (through ``experiments.aggregate``), never a model. Per task, in its main metric (or
``--metric``) and that metric's direction (lower-is-better metrics say so on the axis), every plot
registered with ``@register_plot`` (``PLOTS``) is drawn; the Pareto fronts follow ``experiments.costs``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from experiments import aggregate  # noqa: E402
from experiments.costs import BY_NAME, COSTS  # noqa: E402

REFERENCES = ("full", "head")  # rank-less baselines: horizontal lines on rank plots
def _save(fig, out_dir: Path, stem: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.png", out_dir / f"{stem}.svg"]
    for p in paths:
        fig.savefig(p, dpi=150, bbox_inches="tight")
    plt.close(fig)
    return paths


def series(chosen: pd.DataFrame) -> pd.Series:
    """A line label per setting: the variant, plus whatever else tells its settings apart other than rank
    and lr (alpha, targets, a swept config key such as ``variant.ratio=16``)."""
    keys = [k for k in aggregate.identity(chosen) if k not in ("task", "model", "variant", "rank", "lr")]
    labels = chosen["variant"].astype(str)
    for _, g in chosen.groupby("variant"):
        for k in keys:
            if g[k].nunique() > 1:
                labels[g.index] += " " + k.removeprefix("cfg.").removeprefix("variant.") + "=" + g[k].astype(str)
    return labels


def _quality(chosen: pd.DataFrame, metric: str) -> str:
    """The y label: the test metric, and "(lower is better)" where it is."""
    return f"test {metric}" + (" (lower is better)" if (chosen["direction"] == "min").any() else "")


def rank_vs_quality(chosen: pd.DataFrame, metric: str, out_dir: Path, task: str) -> list[Path]:
    """log2 rank on x, mean test metric with its 95 % CI band, one line per low-rank variant (per setting,
    when a variant has several); full fine-tuning and head-only as horizontal references, the task's trivial
    baseline (majority class, untouched model...) as a grey dash-dot one."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ranked = chosen[chosen["rank"].notna()]
    for variant, g in ranked.groupby(series(ranked), sort=True):
        g = g.sort_values("rank")
        line, = ax.plot(g["rank"], g["mean"], marker="o", label=variant)
        if g["ci_low"].notna().any() and len(g) > 1:
            ax.fill_between(g["rank"], g["ci_low"], g["ci_high"], color=line.get_color(), alpha=0.15, lw=0)
        elif g["ci_low"].notna().any():  # one rank only: its CI as an error bar (a band needs two points)
            ax.errorbar(g["rank"], g["mean"], yerr=[g["mean"] - g["ci_low"], g["ci_high"] - g["mean"]],
                        color=line.get_color(), capsize=3, lw=1)
    for i, ref in enumerate(REFERENCES):
        r = chosen[(chosen["variant"] == ref) & chosen["rank"].isna()]
        if not r.empty:
            ax.axhline(r["mean"].iloc[0], ls="--" if i == 0 else ":", color="0.3", lw=1, label=f"{ref} (no rank)")
    trivial = chosen.dropna(subset=["trivial"])
    if not trivial.empty:
        ax.axhline(trivial["trivial"].iloc[0], ls="-.", color="0.55", lw=1,
                   label=f"trivial: {next(iter(trivial['trivial_name'].dropna()), 'baseline')}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("rank r")
    ax.set_ylabel(_quality(chosen, metric))
    ax.set_title(f"{task}: rank vs {metric}, mean over seeds and {aggregate.ci_label(chosen)}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out_dir, f"rank_vs_{metric}_{task}")


def pareto_front(x: np.ndarray, y: np.ndarray, higher_is_better: bool) -> np.ndarray:
    """Indices of the points no other point beats on both cost (lower x) and quality (y)."""
    sign = 1 if higher_is_better else -1
    keep = []
    for i in range(len(x)):
        dominated = np.any((x <= x[i]) & (sign * y >= sign * y[i]) & ((x < x[i]) | (sign * y > sign * y[i])))
        if not dominated:
            keep.append(i)
    return np.array(sorted(keep, key=lambda i: x[i]), dtype=int)


def pareto(chosen: pd.DataFrame, metric: str, cost: str, out_dir: Path, task: str,
           higher_is_better: bool | None = None) -> list[Path]:
    """Mean test metric against a cost column, with the front in the metric's direction (the summary's,
    unless ``higher_is_better`` is given; unknown: a ValueError)."""
    if higher_is_better is None:
        higher_is_better = aggregate.higher_better(chosen, "the Pareto front")
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    data = chosen[chosen[cost].notna()]
    for variant, g in data.groupby("variant", sort=True):
        ax.scatter(g[cost], g["mean"], label=variant, s=28)
    x, y = data[cost].to_numpy(float), data["mean"].to_numpy(float)
    front = pareto_front(x, y, higher_is_better)
    ax.plot(x[front], y[front], color="k", lw=1, ls="--", label="Pareto front")
    ax.set_xscale("log")
    label = BY_NAME[cost].label if cost in BY_NAME else cost.replace("_", " ")
    ax.set_xlabel(label)
    ax.set_ylabel(_quality(chosen, metric))
    ax.set_title(f"{task}: {metric} vs {label}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out_dir, f"pareto_{cost}_{task}")


def loss_curves(results_dir: Path, out_dir: Path, task: str) -> list[Path]:
    """Training loss against step, one line per variant (its first record in run-id order)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    seen = set()
    for path in sorted(Path(results_dir, "runs").glob("*.json")):
        r, _ = aggregate.read(path)  # an unreadable record: aggregate lists it
        if (r is None or r.get("status") != "ok" or r.get("task") != task or r.get("variant") in seen
                or not r.get("history")):
            continue
        seen.add(r["variant"])
        h = pd.DataFrame(r["history"])
        ax.plot(h["step"], h["loss"].rolling(5, min_periods=1).mean(), label=f"{r['variant']} r={r['rank']}")
    if not seen:  # records without a history: nothing to draw
        plt.close(fig)
        return []
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (moving mean of 5)")
    ax.set_title(f"{task}: training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out_dir, f"loss_{task}")


# --- the plots `make_all` draws per task: name -> fn(chosen, metric, out_dir, task, results_dir) -> paths

PLOTS: dict[str, Callable[..., list[Path]]] = {}


def register_plot(name: str):
    """Decorator: draw ``fn(chosen, metric, out_dir, task, results_dir) -> list[Path]`` for every task.
    ``chosen`` is the task's summary (one row per setting, each method at its val-best lr: ``mean``,
    ``ci_low``/``ci_high``, ``n``, the identity and cost columns); ``metric`` the task's main metric."""

    def deco(fn):
        PLOTS[name] = fn
        return fn

    return deco


@register_plot("rank_vs_quality")
def _rank_plot(chosen, metric, out_dir, task, results_dir):
    return rank_vs_quality(chosen, metric, out_dir, task)


@register_plot("pareto")
def _pareto_plots(chosen, metric, out_dir, task, results_dir):
    """One front per cost that asks for one (``experiments.costs``, ``pareto=True``)."""
    return [p for c in COSTS if c.pareto for p in pareto(chosen, metric, c.name, out_dir, task)]


@register_plot("loss")
def _loss_plot(chosen, metric, out_dir, task, results_dir):
    return loss_curves(results_dir, out_dir, task)


def make_all(results_dir: str | Path, out_dir: str | Path | None = None, metric: str | None = None,
             task: str | None = None, select_lr: bool = True) -> list[Path]:
    results_dir = Path(results_dir)
    out_dir = Path(out_dir or results_dir / "plots")
    df, _ = aggregate.load(results_dir)
    if df.empty:
        raise ValueError(f"no finished runs under {results_dir / 'runs'}")
    paths = []
    for t, g in df.groupby("task"):
        if task is not None and t != task:
            continue
        m = metric or g["main_metric"].dropna().iloc[0]
        has = aggregate.floats(g, f"test_{m}").notna()
        if not has.any():
            print(f"note: no plots for task {t}: its runs report no test {m}", file=sys.stderr)
            continue
        summary = aggregate.summarize(g[has], m)  # the metric's direction: this task's records
        chosen = aggregate.select_lr(summary) if select_lr else summary
        for draw in PLOTS.values():
            paths += draw(chosen, m, out_dir, t, results_dir)
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results-dir", default="results")
    ap.add_argument("--out", default=None)
    ap.add_argument("--metric", default=None)
    ap.add_argument("--task", default=None)
    args = ap.parse_args(argv)
    try:
        paths = make_all(args.results_dir, args.out, args.metric, args.task)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
