"""Run records -> one tidy table per task -> statistics over seeds -> markdown / LaTeX / CSV.

    python -m experiments.aggregate [--results-dir results] [--metric accuracy] [--baseline lora]
                                    [--select-lr] [--task sentiment]

Reads records only (no torch, no model code), so tables can be built anywhere the JSON files are.

- One row per run (``load``). Failed runs, unreadable records and ok runs without the chosen metric are
  counted and listed, never silently dropped.
- A setting is the config without its seed: the ``IDENTITY`` columns plus every other config key that takes
  more than one value within a variant in these records (a ``cfg.`` column, e.g. ``cfg.variant.ratio`` in a
  LoRA+ ratio sweep), so runs that differ in anything but the seed are never averaged together.
- One table per task, in the task's main metric (or ``--metric``, for the tasks that report it).
- ``direction``: a metric is "max" (higher is better) or "min", as the records' ``directions`` declare; older
  records declare only the main metric's (``higher_is_better``). Where a direction is needed (lr selection,
  Δ vs the baseline, a Pareto front) and unknown, that is an error, never a guess.
- ``summarize``: per setting, mean ± std, n, a 95 % CI of the mean test metric that fits n (``mean_ci``: none
  for one seed, Student t below 10, BCa bootstrap from 10), how many seeds are no better than the task's
  trivial baseline (``n_trivial``), and the median cost columns.
- ``select_lr``: the fair-comparison protocol: per (task, variant, everything but lr and seed) keep the
  learning rate with the best *validation* mean in the metric's direction; report its test metric.
- ``paired_tests``: every variant against a baseline variant on matched seeds (same task and rank):
  ``ttest_rel`` from 3 pairs (and ``wilcoxon`` from 6), Holm-corrected across the tests run; with fewer
  pairs, or a constant difference, the table says why there is no p-value.

Files: ``<out>/summary_<metric>.{md,tex,csv}`` when the results folder holds one task,
``summary_<task>_<metric>.{md,tex,csv}`` per task when it holds several.
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
from experiments.costs import COSTS
from experiments.costs import NAMES as COST

IDENTITY = ["task", "model", "variant", "rank", "alpha", "scaling", "targets", "lr"]  # a setting, minus seed
# config keys a record field already holds, resolved (its rank, its targets...), or that name the run
_COVERED = set(records.IDENTITY_KEYS.values()) | {"experiment"}
BCA_FROM = 10  # seeds from which the CI is a BCa bootstrap; below, a Student-t interval (none for one seed)
TEST_FROM = 3  # matched seeds from which a paired t-test is run (Wilcoxon: from 6)
# CI method -> (what it is, the rule when no setting used it)
CI_TEXT = {"t": ("Student-t interval of the mean over seeds", f"Student-t where 2 ≤ n < {BCA_FROM}"),
           "BCa": ("BCa bootstrap of the mean over seeds (9,999 resamples)", f"BCa bootstrap where n ≥ {BCA_FROM}"),
           "none": ("no interval", None)}


def read(path: str | Path) -> tuple[dict | None, str | None]:
    """(the record, None), or (None, why the file is not one: unreadable, not JSON, not a JSON object)."""
    try:
        r = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"unreadable record: {e}"
    if not isinstance(r, dict):
        return None, f"not a run record: the file holds {json.dumps(r)[:40]}"
    schema = r.get("schema")
    if isinstance(schema, int) and schema > records.SCHEMA:
        return None, f"record schema {schema} is newer than this lorabench reads ({records.SCHEMA})"
    return r, None


def load(results_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(ok runs, the rest). One row per ok run: ``val_<m>``/``test_<m>``, ``trivial_test_<m>`` (the task's
    trivial baseline), ``trivial_name``, ``directions`` and the cost columns. The rest: failed runs and
    unreadable records (``status`` "unreadable"), each with its ``error``."""
    rows, failed = [], []
    for path in sorted(Path(results_dir, "runs").glob("*.json")):
        r, why = read(path)
        if r is None:
            failed.append({"run_id": path.stem, "status": "unreadable", "variant": None, "task": None, "error": why})
            continue
        base = {k: r.get(k) for k in ["run_id", "group_id", "status", *IDENTITY, "seed"]}
        base["targets"] = _targets(base["targets"])
        base.update({f"cfg.{k}": v for k, v in _flat(records.semantic_config(_dict(r.get("config")))).items()
                     if k not in _COVERED})
        if r.get("status") != "ok":
            err = _dict(r.get("error"))
            failed.append({**base, "error": f"{err.get('type')}: {err.get('message')} (step {err.get('step')})"})
            continue
        for split, metrics in _dict(r.get("metrics")).items():
            base.update({f"{split}_{k}": v for k, v in _dict(metrics).items()})
        trivial = _dict(r.get("trivial"))
        base.update({f"trivial_test_{k}": v for k, v in _dict(trivial.get("test")).items()})
        base.update(trivial_name=trivial.get("name"), directions=_dict(r.get("directions")),
                    main_metric=r.get("main_metric"), higher_is_better=r.get("higher_is_better"))
        base.update({k: _dict(r.get("cost")).get(k) for k in COST})
        rows.append(base)
    ok, failed = pd.DataFrame(rows), pd.DataFrame(failed)
    return ok.drop(columns=[c for c in ok.columns if c.startswith("cfg.") and not _varies(ok, c)]), failed


def _dict(x) -> dict:
    return x if isinstance(x, dict) else {}


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


def floats(df: pd.DataFrame, column: str) -> pd.Series:
    """``df[column]`` as floats; NaN where a record lacks it (older records, a metric only some runs report)."""
    return pd.to_numeric(df[column], errors="coerce") if column in df else pd.Series(math.nan, index=df.index)


def direction(df: pd.DataFrame, metric: str) -> str | None:
    """"max" (higher is better) or "min" for ``metric``, as these records' ``directions`` declare it; records
    without them (older ones) tell only their main metric's, by ``higher_is_better``. None where no record
    says; a ValueError where they disagree."""
    said = {d.get(metric) or ({True: "max", False: "min"}.get(h) if metric == m else None)
            for d, m, h in zip(df["directions"], df["main_metric"], df["higher_is_better"], strict=True)} - {None}
    if len(said) > 1:
        raise ValueError(f"the records disagree on the direction of metric {metric!r}: {sorted(said)}")
    return said.pop() if said else None


def higher_better(summary: pd.DataFrame, use: str) -> bool:
    """Whether higher is better for a summary's metric (its ``direction``); a ValueError, naming ``use``, when
    the records do not say."""
    d = summary["direction"].iloc[0] if len(summary) else None
    if pd.isna(d):
        raise ValueError(f"metric {summary['metric'].iloc[0]!r} has no declared direction in these records "
                         f"(records without 'directions' give only their main metric's), and {use} needs one")
    return d == "max"


def at_trivial(df: pd.DataFrame, metric: str, direction: str | None) -> pd.Series:
    """Per run: 1.0 when its test ``metric`` is no better than the task's trivial baseline (majority class,
    untouched model...) in the metric's direction, 0.0 when better, NaN when that baseline is unknown."""
    trivial = floats(df, f"trivial_test_{metric}")
    if direction is None:
        return trivial * math.nan
    sign = 1 if direction == "max" else -1
    return (sign * (floats(df, f"test_{metric}") - trivial) <= 1e-9).astype(float).where(trivial.notna())


def mean_ci(values, confidence: float = 0.95, seed: int = 0) -> tuple[float, float, str]:
    """(low, high, method): a CI of the mean that fits n. None ("none", NaNs) for one value; a Student-t
    interval for 2 <= n < BCA_FROM (a bootstrap of a few values has too few distinct resamples); a seeded BCa
    bootstrap (``scipy.stats.bootstrap``) from BCA_FROM on. All values equal: [v, v]."""
    v = np.asarray(values, dtype=float)
    if len(v) < 2:
        return math.nan, math.nan, "none"
    method = "t" if len(v) < BCA_FROM else "BCa"
    if np.all(v == v[0]):
        return float(v[0]), float(v[0]), method
    if method == "t":
        lo, hi = stats.t.interval(confidence, len(v) - 1, loc=v.mean(), scale=v.std(ddof=1) / math.sqrt(len(v)))
    else:
        ci = stats.bootstrap((v,), np.mean, confidence_level=confidence, n_resamples=9999,
                             random_state=np.random.default_rng(seed), method="BCa").confidence_interval
        lo, hi = ci.low, ci.high
    return float(lo), float(hi), method


def summarize(df: pd.DataFrame, metric: str, keys: list[str] | None = None) -> pd.DataFrame:
    """Per setting: n, mean/std/CI (``ci_method``) of ``test_<metric>``, mean ``val_<metric>``, the metric and
    its ``direction``, ``n_trivial`` (seeds no better than the ``trivial`` baseline's test value, named
    ``trivial_name``; NaN when unknown) and the median cost columns."""
    keys = keys or identity(df)
    d = direction(df, metric)
    out = []
    for setting, g in df.groupby(keys, dropna=False, sort=True):
        test = g.sort_values("seed")[f"test_{metric}"].astype(float)  # the bootstrap: not the files' order
        lo, hi, method = mean_ci(test.to_numpy())
        row = dict(zip(keys, setting, strict=True))
        row.update(metric=metric, direction=d, n=len(g), mean=test.mean(),
                   std=test.std(ddof=1) if len(g) > 1 else math.nan, ci_low=lo, ci_high=hi, ci_method=method,
                   val_mean=floats(g, f"val_{metric}").mean(), n_trivial=at_trivial(g, metric, d).sum(min_count=1),
                   trivial=floats(g, f"trivial_test_{metric}").median(),
                   trivial_name=next(iter(g.get("trivial_name", pd.Series()).dropna()), None),
                   seeds=sorted(int(s) for s in g["seed"]))
        row.update({c: floats(g, c).median() for c in COST if c in g})
        out.append(row)
    return pd.DataFrame(out)


def select_lr(summary: pd.DataFrame, higher_is_better: bool | None = None) -> pd.DataFrame:
    """Per setting without lr, the row whose validation mean is best in the metric's direction (the summary's
    ``direction`` unless ``higher_is_better`` is given; unknown: a ValueError). Ties: the smaller lr."""
    keys = [k for k in identity(summary) if k != "lr"]
    higher = higher_better(summary, "--select-lr") if higher_is_better is None else higher_is_better
    ordered = summary.assign(_by=_val_loss(summary, higher)).sort_values(["_by", "lr"])
    groups = ordered.groupby(keys, dropna=False, sort=False)
    best = groups.head(1).drop(columns="_by")
    tried = groups["lr"].agg(["min", "max", "count"]).reset_index()
    best = best.merge(tried, on=keys, how="left")
    # a pick at the end of the grid: the best lr may lie beyond what was tried
    best["lr_edge"] = np.where(best["count"] < 2, "", np.where(best["lr"] == best["min"], "lowest",
                                                               np.where(best["lr"] == best["max"], "highest", "")))
    best = best.rename(columns={"count": "lrs_tried"}).drop(columns=["min", "max"])
    return best.sort_values(keys).reset_index(drop=True)


def _val_loss(summary: pd.DataFrame, higher: bool) -> pd.Series:
    """The validation mean signed so that lower is better: what lr selection and the baseline pick minimise."""
    return summary["val_mean"] * (-1 if higher else 1)


def lr_map_text(lrs: dict[str, float]) -> str:
    """{variant: lr} as the Hydra dict value ``train``'s ``optim.lr`` takes: ``{lora:0.003,full:5e-05}``."""
    return "{" + ",".join(f"{v}:{lr:g}" for v, lr in lrs.items()) + "}"


def lr_map(chosen: pd.DataFrame) -> str | None:
    """The chosen lrs as the per-variant map ``train`` takes (``lr_map_text``), when every variant has one;
    None when a variant's settings chose different lrs (e.g. per rank)."""
    lrs = chosen.groupby("variant", sort=False)["lr"].unique()
    if lrs.map(len).max() != 1:
        return None
    return lr_map_text({v: lr[0] for v, lr in lrs.items()})


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
    one), on the seeds both have. ``mean_diff`` is the raw difference (setting minus baseline; ``direction``
    says which sign is better). ``p_ttest`` from TEST_FROM pairs whose differences vary, ``p_wilcoxon`` from 6,
    ``p_holm``: the t-tests run, Holm-adjusted; ``p_note`` says why a comparison has no p-value."""
    rows = []
    for _, s in chosen.iterrows():
        if s["variant"] == baseline:
            continue
        base = chosen[(chosen["variant"] == baseline) & (chosen["task"] == s["task"])]
        if not pd.isna(s["rank"]) and (base["rank"] == s["rank"]).any():
            base = base[base["rank"] == s["rank"]]
        if base.empty:
            continue
        # several baseline settings left (a rank-less method vs a rank sweep): the baseline at its val-best
        b = base.loc[_val_loss(base, base["direction"].iloc[0] != "min").idxmin()] if len(base) > 1 else base.iloc[0]
        x = _by_seed(df, s, metric)
        y = _by_seed(df, b, metric)
        seeds = sorted(set(x) & set(y))
        diff = np.array([x[k] - y[k] for k in seeds])
        p_t = p_w = math.nan
        if len(seeds) < TEST_FROM:
            note = f"n/a ({len(seeds)} pair{'' if len(seeds) == 1 else 's'})"
        elif np.all(diff == diff[0]):
            note = "n/a (constant diff)"  # zero variance: the t statistic is undefined
        else:
            note, p_t = "", float(stats.ttest_rel([x[k] for k in seeds], [y[k] for k in seeds]).pvalue)
        if len(seeds) >= 6 and np.any(diff != 0):
            p_w = float(stats.wilcoxon(diff).pvalue)
        rows.append({"task": s["task"], "variant": s["variant"], "rank": s["rank"], "lr": s["lr"],
                     **{c: s[c] for c in s.index if c.startswith("cfg.")}, "baseline": baseline,
                     "baseline_lr": b["lr"], "baseline_rank": b["rank"], "n_pairs": len(seeds),
                     "direction": s["direction"],
                     "mean_diff": float(diff.mean()) if len(seeds) else math.nan, "p_ttest": p_t,
                     "p_wilcoxon": p_w, "p_note": note})
    out = pd.DataFrame(rows)
    if not out.empty:
        higher_better(chosen, f"the difference to {baseline}")  # a ValueError where the sign means nothing
        tested = out["p_ttest"].notna()
        out["p_holm"] = math.nan
        out.loc[tested, "p_holm"] = holm(out.loc[tested, "p_ttest"])
    return out


def setting_rows(df: pd.DataFrame, setting: pd.Series) -> pd.DataFrame:
    """The runs of ``df`` in the setting ``setting`` names (its values of the identity columns it has)."""
    mask = np.ones(len(df), dtype=bool)
    for k in identity(df):
        if k in setting.index:
            v = setting[k]
            mask &= df[k].isna().to_numpy() if pd.isna(v) else (df[k] == v).to_numpy()
    return df[mask]


def _by_seed(df: pd.DataFrame, setting: pd.Series, metric: str) -> dict[int, float]:
    return {int(r["seed"]): float(r[f"test_{metric}"]) for _, r in setting_rows(df, setting).iterrows()}


def table(summary: pd.DataFrame, tests: pd.DataFrame | None, metric: str) -> pd.DataFrame:
    """The paper table: one row per setting, formatted columns (``at trivial`` where the baseline is known)."""
    t = summary.copy()
    if tests is not None and not tests.empty:
        keys = ["task", "variant", "rank", "lr", *[c for c in tests.columns if c.startswith("cfg.")]]
        t = t.merge(tests[[*keys, "mean_diff", "p_holm", "p_note"]], on=keys, how="left")
        t["p_note"] = t["p_note"].fillna("")
    d = t["direction"].dropna().iloc[0] if "direction" in t and t["direction"].notna().any() else None
    delta = "Δ vs baseline" + (f" ({'higher' if d == 'max' else 'lower'} is better)" if d else "")
    trivial = "n_trivial" in t and t["n_trivial"].notna().any()
    rows = []
    for _, r in t.iterrows():
        ci = f"[{r.ci_low:.3f}, {r.ci_high:.3f}]" if not pd.isna(r.ci_low) else "–"
        p = r.get("p_holm", math.nan)
        rows.append({
            "task": r["task"], "variant": r["variant"], "rank": "–" if pd.isna(r["rank"]) else int(r["rank"]),
            "lr": f"{r['lr']:.0e}",
            **{c[4:]: _shown(r[c]) for c in t.columns if c.startswith("cfg.")},
            f"test {metric}": f"{r['mean']:.4f} ± {0 if pd.isna(r['std']) else r['std']:.4f}",
            "95% CI": ci, "n": int(r["n"]),
            **({"at trivial": _flagged(r["n_trivial"], int(r["n"]))} if trivial else {}),
            delta: "" if pd.isna(r.get("mean_diff", math.nan)) else f"{r['mean_diff']:+.4f}",
            "p (Holm)": r.get("p_note", "") if pd.isna(p) else f"{p:.3g}",
            **{c.column: c.format(r.get(c.name)) for c in COSTS if c.column},
        })
    return pd.DataFrame(rows)


def _flagged(k, n: int) -> str:
    """The "at trivial" cell: "2/3"; empty when no seed is; "–" when the trivial baseline is unknown."""
    return "–" if pd.isna(k) else f"{k:.0f}/{n}" if k else ""


def _shown(v):
    """A config value for the table: "–" where the variant has no such key, 16 rather than 16.0."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return int(v) if isinstance(v, float) and v.is_integer() else v


def _ci_ns(summary: pd.DataFrame) -> dict[str, str]:
    """CI method -> the n of the settings that used it ("3", or "2–5")."""
    out = {}
    for method in CI_TEXT:
        ns = sorted({int(n) for n in summary.loc[summary["ci_method"] == method, "n"]})
        if ns:
            out[method] = str(ns[0]) if len(ns) == 1 else f"{ns[0]}–{ns[-1]}"
    return out


def ci_label(summary: pd.DataFrame) -> str:
    """A short legend/title form: "95% CI (t, n=3)"."""
    return "95% CI (" + "; ".join(f"{m}, n={n}" for m, n in _ci_ns(summary).items()) + ")"


def notes(summary: pd.DataFrame, tests: pd.DataFrame | None, metric: str, baseline: str) -> list[str]:
    """The footnote lines under a table: the CI method and n; how to read Δ and p; what "at trivial" means."""
    used = _ci_ns(summary)
    ci = [f"{CI_TEXT[m][0]} (n = {n} per setting)" for m, n in used.items()]
    out = ["95% CI: " + "; ".join(ci + [rule for m, (_, rule) in CI_TEXT.items() if m not in used and rule]) + "."]
    if tests is not None and not tests.empty:
        better = "higher" if tests["direction"].iloc[0] == "max" else "lower"
        out.append(f"Δ: test {metric} minus {baseline}'s (same task and rank, matched seeds; a rank-less method vs "
                   f"{baseline}'s val-best setting); {better} is better. "
                   f"p: paired t-test where both have ≥ {TEST_FROM} matched seeds and the difference varies, "
                   f"Holm-corrected over the t-tests run ({int(tests['p_ttest'].notna().sum())}).")
    if "n_trivial" in summary and summary["n_trivial"].notna().any():
        known = summary.dropna(subset=["trivial"]).drop_duplicates(["trivial_name", "trivial"])
        what = "; ".join(f"{r.trivial_name if pd.notna(r.trivial_name) else 'unnamed'}: test {metric} "
                         f"{r.trivial:.4g}" for r in known.itertuples())
        unknown = int(summary["n_trivial"].isna().sum())
        out.append(f"at trivial: seeds no better than the task's trivial baseline ({what})"
                   + (f"; unknown for {unknown} settings" if unknown else "") + ".")
    return out


def markdown(tab: pd.DataFrame, footnotes: list[str] = ()) -> str:
    """A GitHub markdown table (pandas' to_markdown needs the optional tabulate package), then its notes."""
    lines = ["| " + " | ".join(map(str, tab.columns)) + " |", "|" + "---|" * len(tab.columns)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in tab.itertuples(index=False)]
    return "\n".join(lines + ([""] + list(footnotes) if footnotes else []))


def write(tab: pd.DataFrame, raw: pd.DataFrame, out_dir: str | Path, stem: str,
          footnotes: list[str] = ()) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / f"{stem}.md", "tex": out / f"{stem}.tex", "csv": out / f"{stem}.csv"}
    paths["md"].write_text(markdown(tab, footnotes) + "\n")
    latex = tab.to_latex(index=False, escape=True, column_format="l" * len(tab.columns))
    paths["tex"].write_text("".join(f"% {n}\n" for n in footnotes) + latex.replace("±", "$\\pm$"))
    raw.drop(columns=["seeds"], errors="ignore").to_csv(paths["csv"], index=False)
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results-dir", default="results")
    ap.add_argument("--out", default=None, help="default: <results-dir>/tables")
    ap.add_argument("--metric", default=None, help="default: each task's main metric")
    ap.add_argument("--task", default=None)
    ap.add_argument("--baseline", default="lora")
    ap.add_argument("--select-lr", action="store_true", help="keep the val-best lr per variant (fair protocol)")
    ap.add_argument("--wandb", action="store_true",
                    help="also log the tables and <results-dir>/plots/*.png to a W&B summary run (WANDB_MODE)")
    ap.add_argument("--wandb-project", default="lorabench")
    args = ap.parse_args(argv)
    df, failed = load(args.results_dir)
    several = not df.empty and df["task"].nunique(dropna=False) > 1  # then one file set per task
    if args.task is not None and not df.empty:
        df = df[df["task"] == args.task]
    if df.empty:
        print(f"error: no finished runs under {Path(args.results_dir) / 'runs'}", file=sys.stderr)
        return 2
    done, listed, flat, n_ok, n_dropped, unknown = [], [], [], 0, 0, 0
    try:
        for task, g in df.groupby("task", dropna=False, sort=True):
            metric = args.metric or g["main_metric"].dropna().iloc[0]
            has = floats(g, f"test_{metric}").notna()
            if not has.any():
                listed.append(f"  skipped task {task}: its runs report no test {metric}")
                continue
            listed += [f"  dropped {r.run_id} {r.variant} {task}: ok, but no test {metric}"
                       for r in g[~has].itertuples()]
            g, n_dropped = g[has], n_dropped + int((~has).sum())
            summary = summarize(g, metric)
            chosen = select_lr(summary) if args.select_lr else summary
            tests = paired_tests(g, chosen, metric, args.baseline)
            stem = f"summary_{task}_{metric}" if several else f"summary_{metric}"
            done.append((stem, chosen, table(chosen, tests, metric), notes(chosen, tests, metric, args.baseline)))
            at = at_trivial(g, metric, summary["direction"].iloc[0])
            n_ok, unknown = n_ok + len(g), unknown + int(at.isna().sum())
            flat += [f"  at trivial {r['run_id']} {r['variant']} r={_shown(r['rank'])} lr={r['lr']:.0e} "
                     f"seed={r['seed']} {task}: test {metric} {r[f'test_{metric}']:.4g}"
                     for _, r in g[at == 1].iterrows()]
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not done:
        print(f"error: no test metric {args.metric!r} in the records", file=sys.stderr)
        return 2
    out, paths = args.out or Path(args.results_dir) / "tables", []
    for stem, chosen, tab, footnotes in done:
        paths += write(tab, chosen, out, stem, footnotes).values()
        print(markdown(tab, footnotes) + "\n")
        if args.select_lr and (chosen_map := lr_map(chosen)):
            print(f"val-best lr per variant, for the next sweep: optim.lr={chosen_map}\n")
        for r in chosen[chosen.get("lr_edge", pd.Series("", index=chosen.index)).astype(bool)].itertuples():
            print(f"note: {r.variant} r={_shown(r.rank)}: lr {r.lr:g} is the {r.lr_edge} of the {r.lrs_tried} tried; "
                  "the best lr may lie beyond the grid")
    unreadable = int((failed["status"] == "unreadable").sum()) if not failed.empty else 0
    print(f"{n_ok} ok runs, {len(failed) - unreadable} failed" + (f", {unreadable} unreadable" if unreadable else "")
          + (f", {n_dropped} without the metric" if n_dropped else "")
          + f"; tables: {', '.join(str(p) for p in paths)}")
    for _, f in failed.iterrows():
        print(f"  {f['status']} {f['run_id']}" + "".join(f" {f[k]}" for k in ("variant", "task") if pd.notna(f.get(k)))
              + f": {f['error']}")
    for line in listed:
        print(line)
    if n_ok > unknown:
        print(f"{len(flat)} of {n_ok - unknown} runs did not beat the trivial baseline" + (":" if flat else ""))
        for line in flat:
            print(line)
    if unknown:
        print(f"trivial baseline unknown for {unknown} runs (records without 'trivial')")
    if args.wandb:
        from experiments.wandb_log import log_summary

        images = sorted((Path(args.results_dir) / "plots").glob("*.png"))
        tables = {stem: chosen.drop(columns=["seeds"], errors="ignore") for stem, chosen, _, _ in done}
        logged = log_summary(args.results_dir, {**tables, "failed": failed}, images, args.wandb_project)
        if logged:
            print(f"W&B summary run ({len(images)} plots): {logged}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
