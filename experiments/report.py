"""Paper reproductions: our numbers beside the paper's, the plots, and a verdict per finding.

    python -m experiments.report paper/<name> [--out results/paper]     # one experiment's report
    python -m experiments.report paper/<name>/paper                     # its paper size (records from a GPU)
    python -m experiments.report --all                                 # every paper/* experiment
    make paper                                                         # run every cpu sweep, then --all

An experiment is ``conf/experiment/paper/<name>.yaml``; its sweep says which runs it consists of. The report
composes each job of that sweep exactly as ``experiments.train`` does and takes the records with those run
ids from the experiment's ``results_dir`` (other runs sharing the folder are ignored; missing ones are
counted), so a report never mixes in a run the experiment does not define. Then, per finding:

- each compared setting at its own validation-best lr (``aggregate.select_lr``), its test mean and a
  Student-t interval over seeds (``aggregate.mean_ci``), beside the paper's number
  (``results/paper/paper_numbers.yaml``);
- a check of the *kind* of result, since the model and data are far smaller than the paper's: the sign of a
  difference with its 95 % interval (paired by seed), or the rank correlation of an ordering;
- a verdict: **reproduced in kind**, **not reproduced** (the interval contradicts the claim, or does not
  support it: the reason says which) or **not comparable** (the setting cannot test the claim).

Reads records, snapshots and saved adapters only (no torch): ``experiments.analysis`` does the weight maths.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from scipy import stats

from experiments import aggregate, records

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
NUMBERS = ROOT / "results" / "paper" / "paper_numbers.yaml"
REPRODUCED, NOT_REPRODUCED, NOT_COMPARABLE = "reproduced in kind", "not reproduced", "not comparable"
CONFIDENCE = 0.95


# ----------------------------------------------------------------------------------------------- runs


def experiments() -> list[str]:
    """Every paper experiment: ``paper/<name>`` for each conf/experiment/paper/<name>.yaml."""
    return sorted(f"paper/{p.stem}" for p in (CONF / "experiment" / "paper").glob("*.yaml"))


@functools.cache
def _entries() -> tuple[dict, ...]:
    """paper_numbers.yaml, parsed once per process (pure-Python YAML takes seconds for its 238 entries)."""
    return tuple(yaml.load(NUMBERS.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)))


def paper_numbers(experiment: str | None = None) -> list[dict]:
    return [dict(e) for e in _entries() if experiment is None or e["experiment"] == experiment]


def number(entry_id: str) -> float | None:
    return next(e["value"] for e in _entries() if e["id"] == entry_id)


@dataclass
class Job:
    overrides: list[str]
    config: dict
    run_id: str


def sweep(experiment: str, overrides: tuple[str, ...] = ()) -> tuple[dict, list[Job]]:
    """``_sweep`` (below), composed once per process for each experiment, overrides and the environment the
    configs read (``${oc.env:...}``); a copy each call, so a caller may change what it gets."""
    import copy

    env = tuple(os.environ.get(k) for k in ("LORABENCH_RESULTS", "LORABENCH_CACHE", "LORABENCH_ASSETS"))
    return copy.deepcopy(_sweep(experiment, tuple(overrides), env))


@functools.lru_cache(maxsize=64)
def _sweep(experiment: str, overrides: tuple[str, ...], _env: tuple) -> tuple[dict, list[Job]]:
    """(the composed experiment config, one Job per run its sweep defines), as ``experiments.train -m
    experiment=<name> *overrides`` composes them: the sweeper's params (those ``overrides`` do not set)
    expanded by Hydra's basic sweeper, lr maps resolved per variant. Hydra composes once per combination of
    config-group choices (``variant=``, ``+setting=``); the value overrides are then applied as Hydra applies
    them (``OmegaConf.update``), which is what keeps a 150-run sweep to a few compositions."""
    import copy

    from hydra import compose, initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf, open_dict

    import experiments.schema  # noqa: F401  (the structured configs the YAMLs start from)
    from experiments.train import expand_paths, per_variant_lr

    parser = OverridesParser.create()
    groups = {p.name for p in CONF.iterdir() if p.is_dir()}
    given = {o.key_or_group for o in parser.parse_overrides(list(overrides))}
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        head = [f"experiment={experiment}", *overrides]
        base = compose("train", overrides=head, return_hydra_config=True)
        params = [f"{k}={v}" for k, v in (base.hydra.sweeper.params or {}).items() if k not in given]
        batches = BasicSweeper.split_arguments(parser.parse_overrides(params), None)
        composed, jobs = {}, []
        for job in batches[0] if batches else [[]]:
            parsed = parser.parse_overrides(job)
            choice = tuple(o.input_line for o in parsed if o.key_or_group in groups)
            if choice not in composed:
                composed[choice] = compose("train", overrides=[*head, *choice])
            cfg = copy.deepcopy(composed[choice])
            for o in parsed:
                if o.key_or_group not in groups:
                    with open_dict(cfg):
                        OmegaConf.update(cfg, o.key_or_group, o.value(), merge=True)
            cfg = expand_paths(per_variant_lr(OmegaConf.to_container(cfg, resolve=True)))
            jobs.append(Job(job, cfg, records.run_id(cfg)))
    GlobalHydra.instance().clear()
    out = OmegaConf.to_container(base, resolve=False)
    out.pop("hydra", None)
    return {**out, "results_dir": jobs[0].config["results_dir"] if jobs else None}, jobs


@dataclass
class Runs:
    experiment: str
    results_dir: Path
    jobs: list[Job]
    ok: pd.DataFrame  # aggregate.load's rows of this experiment's ok runs
    failed: pd.DataFrame
    missing: list[str]  # run ids without a record
    records: dict[str, dict]  # run id -> record (ok runs)

    @property
    def expected(self) -> int:
        return len(self.jobs)


def load_runs(experiment: str, results_dir: str | Path | None = None) -> Runs:
    cfg, jobs = sweep(experiment)
    folder = Path(results_dir or cfg["results_dir"])
    ids = {j.run_id for j in jobs}
    ok, failed = aggregate.load(folder)
    if not ok.empty:
        ok = ok[ok["run_id"].isin(ids)].reset_index(drop=True)
        ok = ok.drop(columns=[c for c in ok.columns if c.startswith("cfg.") and not aggregate._varies(ok, c)])
    if not failed.empty:
        failed = failed[failed["run_id"].isin(ids)].reset_index(drop=True)
    present = set(ok["run_id"]) if not ok.empty else set()
    recs = {rid: records.load(records.record_path(folder, rid)) for rid in present}
    missing = sorted(ids - present - (set(failed["run_id"]) if not failed.empty else set()))
    return Runs(experiment, folder, jobs, ok, failed, missing, recs)


# ----------------------------------------------------------------------------------------------- stats


def chosen(df: pd.DataFrame, metric: str, keys: list[str] | None = None) -> pd.DataFrame:
    """Each setting at its validation-best lr: ``aggregate.summarize`` then ``select_lr``."""
    return aggregate.select_lr(aggregate.summarize(df, metric, keys))


def seeds_of(df: pd.DataFrame, row: pd.Series, column: str) -> dict[int, float]:
    """{seed: value of ``column``} for the runs of the setting ``row`` names (its identity columns)."""
    return {int(r["seed"]): float(r[column]) for _, r in aggregate.setting_rows(df, row).iterrows()}


@dataclass
class Diff:
    """a − b paired by seed: mean, its interval and n."""

    mean: float
    low: float
    high: float
    n: int

    def text(self, scale: float = 1.0, unit: str = "", signed: bool = True) -> str:
        if self.n == 0:
            return "no common seeds"
        f = "{:+.2f}" if signed else "{:.2f}"
        if math.isnan(self.low):
            return f"{f.format(self.mean * scale)}{unit} (n={self.n}, no interval)"
        return (f"{f.format(self.mean * scale)}{unit} [{f.format(self.low * scale)}, {f.format(self.high * scale)}] "
                f"(n={self.n})")


def values_diff(values) -> Diff:
    """A sample's mean and its interval (against 0), as a Diff; NaNs left out."""
    v = np.asarray([x for x in values if not math.isnan(x)], dtype=float)
    if not len(v):
        return Diff(math.nan, math.nan, math.nan, 0)
    lo, hi, _ = aggregate.mean_ci(v, CONFIDENCE)
    return Diff(float(v.mean()), lo, hi, len(v))


def paired(x: dict[int, float], y: dict[int, float]) -> Diff:
    """x − y over the seeds both have ({seed: value} each)."""
    return values_diff([x[s] - y[s] for s in sorted(set(x) & set(y))])


def paired_diff(df: pd.DataFrame, a: pd.Series, b: pd.Series, column: str) -> Diff:
    """``column`` of setting a minus setting b, paired by seed."""
    return paired(seeds_of(df, a, column), seeds_of(df, b, column))


@dataclass
class Verdict:
    claim: str
    label: str
    reason: str


def sign_verdict(claim: str, d: Diff, what: str, scale: float = 100.0, unit: str = " points",
                 negative: bool = False) -> Verdict:
    """The claim says ``d`` > 0 (``d`` < 0 when ``negative``): reproduced in kind when its interval lies on the
    claimed side of 0; not reproduced when it lies on the other (the opposite holds) or spans 0 (no evidence
    at this size). The reason shows ``d`` as measured, never sign-flipped."""
    text = f"{what}: {d.text(scale, unit)}"
    if d.n < 2 or math.isnan(d.low):
        return Verdict(claim, NOT_COMPARABLE, f"{text}: fewer than 2 paired seeds")
    side, other = ("below", "above") if negative else ("above", "below")
    low, high = (-d.high, -d.low) if negative else (d.low, d.high)  # the interval, the claimed side positive
    if low > 0:
        return Verdict(claim, REPRODUCED, f"{text}: the {CONFIDENCE:.0%} interval lies {side} 0")
    if high < 0:
        return Verdict(claim, NOT_REPRODUCED, f"{text}: the {CONFIDENCE:.0%} interval lies {other} 0 (the opposite)")
    return Verdict(claim, NOT_REPRODUCED, f"{text}: the {CONFIDENCE:.0%} interval spans 0 (no evidence either way "
                                          "at this size)")


def equivalence_verdict(claim: str, d: Diff, margin: float, what: str, scale: float = 100.0,
                        unit: str = " points") -> Verdict:
    """The claim says a ≈ b: reproduced in kind when the interval of a − b lies within ±margin."""
    text = f"{what}: {d.text(scale, unit)}, margin ±{margin * scale:g}{unit}"
    if d.n < 2 or math.isnan(d.low):
        return Verdict(claim, NOT_COMPARABLE, f"{text}: fewer than 2 paired seeds")
    if -margin < d.low and d.high < margin:
        return Verdict(claim, REPRODUCED, f"{text}: the interval lies within the margin")
    if d.low >= margin or d.high <= -margin:
        return Verdict(claim, NOT_REPRODUCED, f"{text}: the interval lies outside the margin (a real difference)")
    return Verdict(claim, NOT_REPRODUCED, f"{text}: the interval reaches beyond the margin (equivalence not shown "
                                          "at this size)")


def spearman(xs, ys) -> tuple[float, float]:
    res = stats.spearmanr(xs, ys)
    return float(res.statistic), float(res.pvalue)


# ----------------------------------------------------------------------------------------------- report


@dataclass
class Report:
    experiment: str
    title: str
    claim: str  # the paper's finding, one paragraph
    sections: list[str] = field(default_factory=list)  # markdown blocks
    verdicts: list[Verdict] = field(default_factory=list)
    plots: list[Path] = field(default_factory=list)


FINDINGS: dict[str, Callable[[Runs, Path], Report]] = {}


def finding(experiment: str):
    def deco(fn):
        FINDINGS[experiment] = fn
        return fn

    return deco


def fmt_ci(row: pd.Series, scale: float = 100.0, digits: int = 1) -> str:
    """A summary row's "mean [low, high]" (the mean alone without an interval)."""
    f = f"{{:.{digits}f}}"
    if math.isnan(row["ci_low"]):
        return f.format(row["mean"] * scale)
    return f"{f.format(row['mean'] * scale)} [{f.format(row['ci_low'] * scale)}, {f.format(row['ci_high'] * scale)}]"


def setting_table(ch: pd.DataFrame, label: Callable[[pd.Series], str], paper: Callable[[pd.Series], str],
                  metric: str, scale: float = 100.0) -> str:
    """One row per chosen setting: ours (mean [CI], n, the chosen lr and whether it sits at the grid's edge)
    beside the paper's number(s)."""
    lines = [f"| setting | ours: test {metric} (95% CI) | n | lr (val-best) | paper |", "|---|---:|---:|---:|---|"]
    for _, r in ch.iterrows():
        edge = f" ({r['lr_edge']} tried)" if r.get("lr_edge") else ""
        lines.append(f"| {label(r)} | {fmt_ci(r, scale)}{trivial_note(r, scale)} | {r['n']} | {r['lr']:g}{edge} | "
                     f"{paper(r)} |")
    return "\n".join(lines)


def trivial_note(row: pd.Series, scale: float = 100.0) -> str:
    """" — k of n seeds at the trivial baseline (<its value>)" where a setting's seeds are no better than the
    task's trivial predictor (a finding to explain, never a row to read as a result); else ""."""
    k = row.get("n_trivial")
    if k is None or (isinstance(k, float) and math.isnan(k)) or k == 0:
        return ""
    return f" — **{int(k)} of {row['n']} seeds at the trivial baseline** ({row['trivial'] * scale:.1f})"


def provenance(runs: Runs) -> str:
    commits = sorted({str((r.get("env") or {}).get("git")) for r in runs.records.values()})
    n_ok = len(runs.records)
    lines = [f"- runs: {n_ok} of {runs.expected} ok" + (f", {len(runs.failed)} failed" if len(runs.failed) else "")
             + (f", {len(runs.missing)} not run yet" if runs.missing else ""),
             f"- command: `python -m experiments.train -m experiment={runs.experiment} launcher=joblib` "
             f"(records in `{_rel(runs.results_dir)}/runs`), then `python -m experiments.report {runs.experiment}`",
             f"- records made at commit(s): {', '.join(commits) or '–'}"]
    return "\n".join(lines)


def _rel(p: Path) -> str:
    try:
        return str(Path(p).resolve().relative_to(ROOT))
    except ValueError:
        return str(p)


def render(report: Report, runs: Runs, out: Path) -> str:
    counts = {k: sum(v.label == k for v in report.verdicts) for k in (REPRODUCED, NOT_REPRODUCED, NOT_COMPARABLE)}
    lines = [f"# {report.title}", "", report.claim, "", provenance(runs),
             f"- report made {datetime.date.today().isoformat()} by `python -m experiments.report "
             f"{runs.experiment}` at commit {records._git_commit() or '?'}", ""]
    lines += ["## Verdict", "", "| finding | verdict | why |", "|---|---|---|"]
    lines += [f"| {v.claim} | **{v.label}** | {v.reason} |" for v in report.verdicts]
    lines += ["", " · ".join(f"{n} {k}" for k, n in counts.items() if n), ""]
    for s in report.sections:
        lines += [s, ""]
    for p in report.plots:
        lines += [f"![{p.stem}]({_rel_to(p, out)})", ""]
    return "\n".join(lines)


def _rel_to(p: Path, out: Path) -> str:
    return os.path.relpath(p, out)


def make(experiment: str, out: str | Path = ROOT / "results" / "paper", results_dir: str | Path | None = None) -> Path:
    _register()
    finding_of = experiment.removesuffix("/paper")  # paper/<name>/paper: the paper size, the same checks
    name = experiment.removeprefix("paper/").replace("/", "-")
    if finding_of not in FINDINGS:
        raise SystemExit(f"error: no report for {experiment!r} (reports: {', '.join(sorted(FINDINGS))})")
    out = Path(out)
    plots = out / name
    plots.mkdir(parents=True, exist_ok=True)
    runs = load_runs(experiment, results_dir)
    if runs.ok.empty:
        report = Report(experiment, experiment, "No finished runs yet: run the sweep first.")
    else:
        report = FINDINGS[finding_of](runs, plots)
    path = out / f"{name}.md"
    path.write_text(render(report, runs, out) + "\n")
    summary = {"experiment": experiment, "verdicts": [v.__dict__ for v in report.verdicts],
               "runs_ok": len(runs.records), "runs_expected": runs.expected}
    (plots / "verdicts.json").write_text(json.dumps(summary, indent=1))
    return path


def summary(out: str | Path = ROOT / "results" / "paper") -> Path:
    """``results/paper/summary.md``: every report's verdicts in one table (from each ``verdicts.json``)."""
    out = Path(out)
    lines = ["# Paper reproductions: the verdicts", "",
             "Each row is one claim of one report (`results/paper/<name>.md`, made by `python -m experiments.report`); "
             "how a report decides: [docs/papers.md](../../docs/papers.md#how-a-report-decides).", "",
             "| experiment | runs | claim | verdict | why |", "|---|---:|---|---|---|"]
    for path in sorted(out.glob("*/verdicts.json")):
        v = json.loads(path.read_text())
        name = v["experiment"].removeprefix("paper/").replace("/", "-")
        for i, x in enumerate(v["verdicts"] or [{"claim": "–", "label": "no runs yet", "reason": ""}]):
            head = f"[{name}]({name}.md) | {v['runs_ok']}/{v['runs_expected']}" if i == 0 else " | "
            lines.append(f"| {head} | {x['claim']} | **{x['label']}** | {x['reason']} |")
    path = out / "summary.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("experiment", nargs="?", help="paper/<name>")
    ap.add_argument("--all", action="store_true", help="every paper/* experiment that has a report")
    ap.add_argument("--out", default=str(ROOT / "results" / "paper"))
    ap.add_argument("--results-dir", default=None, help="read the records here instead of the experiment's own")
    args = ap.parse_args(argv)
    _register()
    names = sorted(FINDINGS) if args.all else [args.experiment]
    if names == [None]:
        ap.error("name an experiment (paper/<name>) or pass --all")
    for name in names:
        print(f"wrote {make(name, args.out, args.results_dir)}")
    print(f"wrote {summary(args.out)}")
    return 0


def _register() -> None:
    import experiments.findings  # noqa: F401  (each finding registers itself with @finding)


if __name__ == "__main__":  # run the importable module's main, whose FINDINGS the findings fill
    from experiments.report import main as _main

    sys.exit(_main())
