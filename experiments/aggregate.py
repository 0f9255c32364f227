"""Run records -> one tidy table -> statistics over seeds -> markdown / LaTeX / CSV.

    python -m experiments.aggregate [--results-dir results] [--metric accuracy] [--baseline lora]
                                    [--select-lr] [--task sentiment]

Reads records only (no torch, no model code), so tables can be built anywhere the JSON files are.

- One row per run (``load``); failed runs are counted and listed, never silently dropped.
- A setting is the config without its seed: the ``IDENTITY`` columns plus every other config key that takes
  more than one value within a variant in these records (a ``cfg.`` column, e.g. ``cfg.variant.ratio`` in a
  LoRA+ ratio sweep), so runs that differ in anything but the seed are never averaged together.
- ``summarize``: per setting, mean ± std, n and a 95 % bootstrap CI of the
  test metric (``scipy.stats.bootstrap``), plus the cost columns.
- ``select_lr``: the fair-comparison protocol: per (task, variant, everything but lr and seed) keep the
  learning rate with the best *validation* mean; report its test metric.
- ``paired_tests``: every variant against a baseline variant on matched seeds (same task and rank):
  ``ttest_rel`` (and ``wilcoxon`` for n >= 6), Holm-corrected across the comparisons.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from experiments import records

IDENTITY = ["task", "model", "variant", "rank", "alpha", "scaling", "targets", "lr"]  # a setting, minus seed
# config keys that IDENTITY already covers (resolved: the record's rank, targets...), or that name the run
_COVERED = {"seed", "optim.lr", "task.name", "variant.name", "variant.rank", "variant.alpha", "variant.scaling",
            "variant.targets", "experiment"}
COST = ["trainable_params", "trainable_pct", "optimizer_state_bytes", "peak_memory_bytes", "step_time_ms",
        "train_time_s"]


def load(results_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(ok runs, failed runs): one row per record with ``val_<m>``/``test_<m>`` and cost columns."""
    rows, failed = [], []
    for path in sorted(Path(results_dir, "runs").glob("*.json")):
        try:
            r = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            failed.append({"run_id": path.stem, "variant": None, "task": None, "error": f"unreadable record: {e}"})
            continue
        base = {k: r.get(k) for k in ["run_id", "group_id", "status", *IDENTITY, "seed"]}
        base["targets"] = _targets(base["targets"])
        base.update({f"cfg.{k}": v for k, v in _flat(records.semantic_config(r.get("config") or {})).items()
                     if k not in _COVERED})
        if r.get("status") != "ok":
            err = r.get("error") or {}
            failed.append({**base, "error": f"{err.get('type')}: {err.get('message')} (step {err.get('step')})"})
            continue
        for split, metrics in (r.get("metrics") or {}).items():
            base.update({f"{split}_{k}": v for k, v in metrics.items()})
        base.update({k: (r.get("cost") or {}).get(k) for k in COST})
        base["main_metric"], base["higher_is_better"] = r.get("main_metric"), r.get("higher_is_better", True)
        rows.append(base)
    ok, failed = pd.DataFrame(rows), pd.DataFrame(failed)
    return ok.drop(columns=[c for c in ok.columns if c.startswith("cfg.") and not _varies(ok, c)]), failed


def _flat(cfg: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in cfg.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v) if isinstance(v, list) else v  # hashable, for grouping
    return out


def _varies(df: pd.DataFrame, column: str) -> bool:
    """Takes two or more values among one variant's runs (a key only some variants have is not a setting)."""
    return bool((df.groupby("variant")[column].nunique() > 1).any())


def identity(df: pd.DataFrame) -> list[str]:
    """The columns that name a setting in ``df``: IDENTITY plus the config keys that vary."""
    return IDENTITY + [c for c in df.columns if c.startswith("cfg.")]


def _targets(t) -> str | None:
    if t is None:
        return None
    names = sorted({n.rsplit(".", 1)[-1] for n in t}) if isinstance(t, list) else [str(t)]
    return ",".join(names)


def bootstrap_ci(values, confidence: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile-free BCa bootstrap CI of the mean (scipy); (nan, nan) when it is undefined (n < 2)."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return math.nan, math.nan
    if np.all(values == values[0]):
        return float(values[0]), float(values[0])
    res = stats.bootstrap((values,), np.mean, confidence_level=confidence, n_resamples=9999,
                          random_state=np.random.default_rng(seed), method="BCa")
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def summarize(df: pd.DataFrame, metric: str, keys: list[str] | None = None) -> pd.DataFrame:
    """Per setting: n, mean/std/CI of ``test_<metric>``, mean ``val_<metric>``, median cost columns."""
    keys = keys or identity(df)
    out = []
    for setting, g in df.groupby(keys, dropna=False, sort=True):
        test = g[f"test_{metric}"].astype(float)
        lo, hi = bootstrap_ci(test.to_numpy())
        row = dict(zip(keys, setting, strict=True))
        row.update(n=len(g), mean=test.mean(), std=test.std(ddof=1) if len(g) > 1 else math.nan, ci_low=lo,
                   ci_high=hi, val_mean=g[f"val_{metric}"].astype(float).mean(),
                   seeds=sorted(int(s) for s in g["seed"]))
        row.update({c: g[c].median() for c in COST if c in g})
        out.append(row)
    return pd.DataFrame(out)


def select_lr(summary: pd.DataFrame, higher_is_better: bool = True) -> pd.DataFrame:
    """Per setting without lr, the row whose validation mean is best (ties: the smaller lr)."""
    keys = [k for k in identity(summary) if k != "lr"]
    ordered = summary.sort_values(["val_mean", "lr"], ascending=[not higher_is_better, True])
    best = ordered.groupby(keys, dropna=False, sort=False).head(1)
    return best.sort_values(keys).reset_index(drop=True)


def holm(pvalues) -> list[float]:
    """Holm–Bonferroni adjusted p-values (step-down, monotone), in the input order."""
    p = np.asarray(pvalues, dtype=float)
    order = np.argsort(p)
    adjusted = np.empty_like(p)
    running = 0.0
    for i, idx in enumerate(order):
        running = max(running, min(1.0, (len(p) - i) * p[idx]))
        adjusted[idx] = running
    return adjusted.tolist()


def paired_tests(df: pd.DataFrame, chosen: pd.DataFrame, metric: str, baseline: str = "lora") -> pd.DataFrame:
    """Each chosen setting vs the chosen ``baseline`` setting of the same task (and rank, when both have
    one), on the seeds both have. Adds ``p_ttest``, ``p_wilcoxon``, ``p_holm`` (ttest, Holm-adjusted)."""
    rows = []
    for _, s in chosen.iterrows():
        if s["variant"] == baseline:
            continue
        base = chosen[(chosen["variant"] == baseline) & (chosen["task"] == s["task"])]
        if not pd.isna(s["rank"]) and (base["rank"] == s["rank"]).any():
            base = base[base["rank"] == s["rank"]]
        if base.empty:
            continue
        b = base.iloc[0]
        x = _by_seed(df, s, metric)
        y = _by_seed(df, b, metric)
        seeds = sorted(set(x) & set(y))
        diff = np.array([x[k] - y[k] for k in seeds])
        p_t = p_w = math.nan
        if len(seeds) >= 2 and np.any(diff != diff[0]):
            p_t = float(stats.ttest_rel([x[k] for k in seeds], [y[k] for k in seeds]).pvalue)
        if len(seeds) >= 6 and np.any(diff != 0):
            p_w = float(stats.wilcoxon(diff).pvalue)
        rows.append({"task": s["task"], "variant": s["variant"], "rank": s["rank"], "lr": s["lr"],
                     **{c: s[c] for c in s.index if c.startswith("cfg.")}, "baseline": baseline,
                     "baseline_lr": b["lr"], "n_pairs": len(seeds),
                     "mean_diff": float(diff.mean()) if len(seeds) else math.nan, "p_ttest": p_t,
                     "p_wilcoxon": p_w})
    out = pd.DataFrame(rows)
    if not out.empty:
        tested = out["p_ttest"].notna()
        out["p_holm"] = math.nan
        out.loc[tested, "p_holm"] = holm(out.loc[tested, "p_ttest"])
    return out


def _by_seed(df: pd.DataFrame, setting: pd.Series, metric: str) -> dict[int, float]:
    mask = np.ones(len(df), dtype=bool)
    for k in identity(df):
        v = setting[k]
        mask &= df[k].isna().to_numpy() if pd.isna(v) else (df[k] == v).to_numpy()
    return {int(r["seed"]): float(r[f"test_{metric}"]) for _, r in df[mask].iterrows()}


def table(summary: pd.DataFrame, tests: pd.DataFrame | None, metric: str) -> pd.DataFrame:
    """The paper table: one row per setting, formatted columns."""
    t = summary.copy()
    if tests is not None and not tests.empty:
        keys = ["task", "variant", "rank", "lr", *[c for c in tests.columns if c.startswith("cfg.")]]
        t = t.merge(tests[[*keys, "mean_diff", "p_ttest", "p_holm"]], on=keys, how="left")
    rows = []
    for _, r in t.iterrows():
        ci = f"[{r.ci_low:.3f}, {r.ci_high:.3f}]" if not pd.isna(r.ci_low) else "–"
        rows.append({
            "task": r["task"], "variant": r["variant"], "rank": "–" if pd.isna(r["rank"]) else int(r["rank"]),
            "lr": f"{r['lr']:.0e}",
            **{c[4:]: _shown(r[c]) for c in t.columns if c.startswith("cfg.")},
            f"test {metric}": f"{r['mean']:.4f} ± {0 if pd.isna(r['std']) else r['std']:.4f}",
            "95% CI": ci, "n": int(r["n"]),
            "Δ vs baseline": "" if pd.isna(r.get("mean_diff", math.nan)) else f"{r['mean_diff']:+.4f}",
            "p (Holm)": "" if pd.isna(r.get("p_holm", math.nan)) else f"{r['p_holm']:.3g}",
            "trainable": f"{int(r['trainable_params']):,}",
            "peak MiB": f"{r['peak_memory_bytes'] / 2**20:.0f}", "ms/step": f"{r['step_time_ms']:.1f}",
        })
    return pd.DataFrame(rows)


def _shown(v):
    """A config value for the table: "–" where the variant has no such key, 16 rather than 16.0."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return int(v) if isinstance(v, float) and v.is_integer() else v


def markdown(tab: pd.DataFrame) -> str:
    """A GitHub markdown table (pandas' to_markdown needs the optional tabulate package)."""
    lines = ["| " + " | ".join(map(str, tab.columns)) + " |", "|" + "---|" * len(tab.columns)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in tab.itertuples(index=False)]
    return "\n".join(lines)


def write(tab: pd.DataFrame, raw: pd.DataFrame, out_dir: str | Path, stem: str) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / f"{stem}.md", "tex": out / f"{stem}.tex", "csv": out / f"{stem}.csv"}
    paths["md"].write_text(markdown(tab) + "\n")
    latex = tab.to_latex(index=False, escape=True, column_format="l" * len(tab.columns))
    paths["tex"].write_text(latex.replace("\\toprule", "\\toprule").replace("±", "$\\pm$"))
    raw.drop(columns=["seeds"], errors="ignore").to_csv(paths["csv"], index=False)
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results-dir", default="results")
    ap.add_argument("--out", default=None, help="default: <results-dir>/tables")
    ap.add_argument("--metric", default=None, help="default: the records' main metric")
    ap.add_argument("--task", default=None)
    ap.add_argument("--baseline", default="lora")
    ap.add_argument("--select-lr", action="store_true", help="keep the val-best lr per variant (fair protocol)")
    ap.add_argument("--wandb", action="store_true",
                    help="also log the tables and <results-dir>/plots/*.png to a W&B summary run (WANDB_MODE)")
    ap.add_argument("--wandb-project", default="lorabench")
    args = ap.parse_args(argv)
    df, failed = load(args.results_dir)
    if args.task is not None and not df.empty:
        df = df[df["task"] == args.task]
    if df.empty:
        print(f"error: no finished runs under {Path(args.results_dir) / 'runs'}", file=sys.stderr)
        return 2
    metric = args.metric or df["main_metric"].dropna().iloc[0]
    higher = bool(df["higher_is_better"].dropna().iloc[0]) if metric == df["main_metric"].iloc[0] else True
    if f"test_{metric}" not in df:
        print(f"error: no test metric {metric!r} in the records", file=sys.stderr)
        return 2
    df = df[df[f"test_{metric}"].notna()]
    summary = summarize(df, metric)
    chosen = select_lr(summary, higher) if args.select_lr else summary
    tests = paired_tests(df, chosen, metric, args.baseline)
    tab = table(chosen, tests, metric)
    paths = write(tab, chosen, args.out or Path(args.results_dir) / "tables", f"summary_{metric}")
    print(markdown(tab))
    print(f"\n{len(df)} ok runs, {len(failed)} failed; tables: {', '.join(str(p) for p in paths.values())}")
    for _, f in failed.iterrows():
        print(f"  failed {f['run_id']} {f.get('variant')} {f.get('task')}: {f['error']}")
    if args.wandb:
        from experiments.wandb_log import log_summary

        images = sorted((Path(args.results_dir) / "plots").glob("*.png"))
        logged = log_summary(args.results_dir, {f"summary_{metric}": chosen.drop(columns=["seeds"], errors="ignore"),
                                                "failed": failed}, images, args.wandb_project)
        if logged:
            print(f"W&B summary run ({len(images)} plots): {logged}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
