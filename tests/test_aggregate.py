"""Aggregation on hand-built records with known answers."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from experiments import aggregate


def record(tmp_path, variant, seed, lr, val, test, rank=8, status="ok", task="toy", trainable=100, config=None,
           metric="accuracy", **fields):
    """A run record with ``val``/``test`` as its main ``metric``; ``fields`` (directions, trivial, metrics...)
    override or extend it. Without ``directions``, an older record: only the main metric's direction."""
    rid = f"{task}-{variant}-{rank}-{lr}-{seed}-{status}" + (f"-{hash(json.dumps(config))}" if config else "")
    r = {"schema": 1, "run_id": rid, "group_id": rid[:-2], "status": status, "variant": variant, "task": task,
         "model": "m", "rank": rank, "alpha": 16, "scaling": "standard", "targets": ["a.query", "a.value"],
         "lr": lr, "seed": seed, "main_metric": metric,
         "higher_is_better": fields.get("directions", {}).get(metric, "max") == "max",
         "metrics": {"val": {metric: val}, "test": {metric: test}} if status == "ok" else None,
         "error": None if status == "ok" else {"type": "NonFiniteLoss", "message": "nan at step 3", "step": 3},
         "cost": {"trainable_params": trainable, "trainable_pct": 1.0, "optimizer_state_bytes": 8 * trainable,
                  "peak_memory_bytes": 2**30, "step_time_ms": 10.0, "train_time_s": 1.0}}
    if config is not None:
        r["config"] = config
    r.update(fields)
    (tmp_path / "runs").mkdir(parents=True, exist_ok=True)
    (tmp_path / "runs" / f"{rid}.json").write_text(json.dumps(r))


LORA = [0.80, 0.82, 0.81, 0.79, 0.83]
DORA = [0.84, 0.85, 0.83, 0.82, 0.86]


@pytest.fixture
def results(tmp_path):
    for seed, (a, b) in enumerate(zip(LORA, DORA, strict=True)):
        record(tmp_path, "lora", seed, 1e-3, val=0.9, test=a)
        record(tmp_path, "lora", seed, 1e-4, val=0.5, test=0.99)  # best on test, worse on val: not chosen
        record(tmp_path, "dora", seed, 1e-3, val=0.6, test=0.10)
        record(tmp_path, "dora", seed, 1e-4, val=0.8, test=b)
        record(tmp_path, "full", seed, 1e-4, val=0.7, test=a - 0.01 * seed, rank=None, trainable=10_000)
    record(tmp_path, "dora", 9, 1e-3, val=0, test=0, status="failed")
    return tmp_path


def test_load_counts_failed_runs_and_keeps_them_out_of_the_table(results):
    ok, failed = aggregate.load(results)
    assert len(ok) == 25 and len(failed) == 1
    assert "NonFiniteLoss" in failed.iloc[0]["error"] and "step 3" in failed.iloc[0]["error"]
    assert failed.iloc[0]["status"] == "failed"
    assert set(ok["targets"]) == {"query,value"}


def test_summary_mean_std_and_t_interval_match_direct_computation(results):
    ok, _ = aggregate.load(results)
    s = aggregate.summarize(ok, "accuracy")
    lora = s[(s.variant == "lora") & (s.lr == 1e-3)].iloc[0]
    assert lora.n == 5 and lora["mean"] == pytest.approx(np.mean(LORA)) and lora["std"] == pytest.approx(
        np.std(LORA, ddof=1))
    direct = stats.t.interval(0.95, 4, loc=np.mean(LORA), scale=np.std(LORA, ddof=1) / np.sqrt(5))
    assert (lora.ci_low, lora.ci_high) == pytest.approx(direct) and lora.ci_method == "t"
    assert lora.ci_low < lora["mean"] < lora.ci_high


def test_the_interval_fits_n(tmp_path, capsys):
    three, twelve = [0.70, 0.74, 0.75], [0.6 + 0.013 * i + 0.02 * (i % 3) for i in range(12)]
    lo, hi, method = aggregate.mean_ci(three)
    assert method == "t" and (lo, hi) == pytest.approx(
        stats.t.interval(0.95, 2, loc=np.mean(three), scale=np.std(three, ddof=1) / np.sqrt(3)))
    lo, hi, method = aggregate.mean_ci(twelve)
    direct = stats.bootstrap((np.array(twelve),), np.mean, confidence_level=0.95, n_resamples=9999,
                             random_state=np.random.default_rng(0), method="BCa").confidence_interval
    assert method == "BCa" and (lo, hi) == pytest.approx((direct.low, direct.high))
    assert aggregate.mean_ci([0.7])[2] == "none" and np.isnan(aggregate.mean_ci([0.7])[:2]).all()
    assert aggregate.mean_ci([0.7, 0.7, 0.7]) == (0.7, 0.7, "t")  # degenerate, not NaN
    # through the CLI: three seeds of lora, twelve of dora, one of full
    for seed, v in enumerate(three):
        record(tmp_path, "lora", seed, 1e-3, val=v, test=v)
    for seed, v in enumerate(twelve):
        record(tmp_path, "dora", seed, 1e-3, val=v, test=v)
    record(tmp_path, "full", 0, 1e-4, val=0.8, test=0.8, rank=None)
    s = aggregate.summarize(aggregate.load(tmp_path)[0], "accuracy").set_index("variant")
    assert s["ci_method"].to_dict() == {"dora": "BCa", "full": "none", "lora": "t"}
    assert (s.loc["dora", "ci_low"], s.loc["dora", "ci_high"]) == pytest.approx((direct.low, direct.high))
    assert aggregate.main(["--results-dir", str(tmp_path)]) == 0
    md = (tmp_path / "tables" / "summary_accuracy.md").read_text()
    assert "| 95% CI |" in md and ("95% CI: Student-t interval of the mean over seeds (n = 3 per setting); BCa "
                                   "bootstrap of the mean over seeds (9,999 resamples) (n = 12 per setting); "
                                   "no interval (n = 1 per setting).") in md
    assert "| dora | 8 | 1e-03 |" in capsys.readouterr().out
    tex = (tmp_path / "tables" / "summary_accuracy.tex").read_text()
    assert tex.startswith("% 95% CI: Student-t") and "\\toprule" in tex


def test_settings_differing_in_another_config_key_are_not_averaged_together(tmp_path):
    # a LoRA+ ratio sweep: ratio is not an IDENTITY column, but it varies, so it names a setting
    for seed in range(3):
        for ratio, acc in ((4, 0.70), (16, 0.80)):
            cfg = {"seed": seed, "variant": {"name": "lora_plus", "ratio": ratio, "dropout": 0.05},
                   "optim": {"lr": 1e-3, "betas": [0.9, 0.999]}}
            record(tmp_path, "lora_plus", seed, 1e-3, val=acc, test=acc + 0.01 * seed, config=cfg)
        # a key only DoRA has, with one value: not a setting column
        record(tmp_path, "dora", seed, 1e-3, val=0.5, test=0.5, config={"seed": seed, "variant": {"name": "dora",
               "only_dora": 1, "dropout": 0.05}, "optim": {"lr": 1e-3, "betas": [0.9, 0.999]}})
    df, _ = aggregate.load(tmp_path)
    assert [c for c in df.columns if c.startswith("cfg.")] == ["cfg.variant.ratio"]
    s = aggregate.summarize(df, "accuracy").set_index(["variant", "cfg.variant.ratio"], drop=False)
    assert len(s) == 3 and s.loc[("lora_plus", 4), "n"] == 3 and s.loc[("lora_plus", 16), "n"] == 3
    assert s.loc[("lora_plus", 16), "mean"] == pytest.approx(0.81)
    chosen = aggregate.select_lr(aggregate.summarize(df, "accuracy"))
    assert len(chosen) == 3  # lr selection keeps each ratio: only the lr is chosen
    tab = aggregate.table(chosen, None, "accuracy")
    assert [str(v) for v in tab["variant.ratio"]] == ["–", "4", "16"]


def test_lr_selection_picks_the_validation_best_and_reports_its_test(results):
    ok, _ = aggregate.load(results)
    chosen = aggregate.select_lr(aggregate.summarize(ok, "accuracy"))
    by_variant = chosen.set_index("variant")
    assert by_variant.loc["lora", "lr"] == 1e-3 and by_variant.loc["lora", "mean"] == pytest.approx(np.mean(LORA))
    assert by_variant.loc["dora", "lr"] == 1e-4 and by_variant.loc["dora", "mean"] == pytest.approx(np.mean(DORA))
    lower = aggregate.select_lr(aggregate.summarize(ok, "accuracy"), higher_is_better=False).set_index("variant")
    assert lower.loc["lora", "lr"] == 1e-4  # e.g. perplexity: the lowest validation mean wins
    # both picks lie at an end of their two-point grid; full fine-tuning tried one lr: no edge to speak of
    assert by_variant["lr_edge"].to_dict() == {"dora": "lowest", "full": "", "lora": "highest"}
    assert by_variant["lrs_tried"].to_dict() == {"dora": 2, "full": 1, "lora": 2}
    # the choice, as the per-variant lr map the next sweep takes (train's optim.lr={...})
    assert aggregate.lr_map(chosen) == "{dora:0.0001,full:0.0001,lora:0.001}"
    assert aggregate.lr_map(aggregate.summarize(ok, "accuracy")) is None  # two lrs per variant: no single map


def test_paired_tests_match_scipy_on_matched_seeds_and_holm_orders(results):
    ok, _ = aggregate.load(results)
    chosen = aggregate.select_lr(aggregate.summarize(ok, "accuracy"))
    tests = aggregate.paired_tests(ok, chosen, "accuracy", baseline="lora").set_index("variant")
    assert tests.loc["dora", "n_pairs"] == 5
    assert tests.loc["dora", "p_ttest"] == pytest.approx(stats.ttest_rel(DORA, LORA).pvalue)
    assert tests.loc["dora", "mean_diff"] == pytest.approx(np.mean(DORA) - np.mean(LORA))
    raw = tests["p_ttest"].tolist()
    assert tests["p_holm"].tolist() == pytest.approx(aggregate.holm(raw))


def test_a_rankless_method_is_compared_with_the_baselines_val_best_setting(tmp_path):
    for seed in range(3):
        for rank, val in ((2, 0.6), (8, 0.8), (32, 0.7)):  # rank 8 is lora's val-best
            record(tmp_path, "lora", seed, 1e-3, val=val, test=val + 0.01 * seed, rank=rank)
        record(tmp_path, "full", seed, 1e-4, val=0.9, test=0.9, rank=None)
    ok, _ = aggregate.load(tmp_path)
    tests = aggregate.paired_tests(ok, aggregate.summarize(ok, "accuracy"), "accuracy").set_index("variant")
    assert tests.loc["full", "baseline_rank"] == 8
    assert tests.loc["full", "mean_diff"] == pytest.approx(0.9 - (0.8 + 0.01))


def test_holm_against_hand_computed_values():
    # sorted p: 0.01 (x3) -> 0.03, 0.02 (x2) -> 0.04, 0.04 (x1) -> 0.04 (monotone)
    assert aggregate.holm([0.04, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])
    assert aggregate.holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])


def test_cli_writes_markdown_latex_csv_and_lists_failures(results, capsys):
    assert aggregate.main(["--results-dir", str(results), "--select-lr"]) == 0
    out = capsys.readouterr().out
    assert "| toy | dora | 8 | 1e-04 | 0.8400 ± 0.0158 |" in out and "1 failed" in out and "NonFiniteLoss" in out
    assert "val-best lr per variant, for the next sweep: optim.lr={dora:0.0001,full:0.0001,lora:0.001}" in out
    assert "note: lora r=8: lr 0.001 is the highest of the 2 tried; the best lr may lie beyond the grid" in out
    for ext in ("md", "tex", "csv"):
        assert (results / "tables" / f"summary_accuracy.{ext}").stat().st_size > 0
    assert "\\toprule" in (results / "tables" / "summary_accuracy.tex").read_text()


def test_wandb_summary_run_holds_the_table_and_the_plots_offline(results, capsys, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (results / "plots").mkdir()
    plt.plot([1, 2], [3, 4])
    plt.savefig(results / "plots" / "rank_vs_accuracy_toy.png")
    plt.close("all")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    assert aggregate.main(["--results-dir", str(results), "--wandb"]) == 0
    assert "W&B summary run (1 plots)" in capsys.readouterr().out
    media = list((results / "wandb").glob("**/offline-run-*/files/media/**/*"))
    names = [p.name for p in media if p.is_file()]
    assert any(n.startswith("summary_accuracy") and n.endswith(".table.json") for n in names), names
    assert any(n.startswith("failed") and n.endswith(".table.json") for n in names), names
    assert any(n.startswith("rank_vs_accuracy_toy") and n.endswith(".png") for n in names), names
    table = next(p for p in media if p.name.startswith("summary_accuracy") and p.name.endswith(".table.json"))
    assert {"variant", "mean", "ci_low"} <= set(json.loads(table.read_text())["columns"])


def test_wandb_disabled_logs_no_summary(results, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert aggregate.main(["--results-dir", str(results), "--wandb"]) == 0
    assert "W&B summary" not in capsys.readouterr().out and not (results / "wandb").exists()


def test_cli_with_no_records_is_one_error_line(tmp_path, capsys):
    assert aggregate.main(["--results-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_tiny_synthetic_multirun_through_to_a_table_and_plots(tmp_path, capsys):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from experiments import plots

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-m", "experiments.train", "-m", "variant=lora,dora", "variant.rank=2,4", "seed=0,1",
         "optim.max_steps=20", "task.n_train=256", "task.n_val=64", "task.n_test=64", "logger=none",
         f"results_dir={tmp_path}"],
        capture_output=True, text=True, cwd=root, timeout=300,
        env={**os.environ, "WANDB_MODE": "disabled", "LORABENCH_NO_PROGRESS": "1"})
    assert out.returncode == 0, out.stderr
    assert aggregate.main(["--results-dir", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    rows = [ln for ln in table.splitlines() if ln.startswith("| synthetic |")]
    assert len(rows) == 4 and all("| 2 |" in r for r in rows)  # 2 variants x 2 ranks, n = 2 seeds each
    assert "8 ok runs, 0 failed" in table
    assert any(p.name == "rank_vs_fit_synthetic.png" for p in plots.make_all(tmp_path))


def test_demo_probes_each_methods_own_grid_then_compares_at_the_chosen_lrs(tmp_path):
    from experiments import demo

    probe = [" ".join(c[1:]) for c in demo.probe_cmds("d/probe", ["lora", "dora", "full"], jobs=2)]
    # one sweep per kind (only the low-rank methods take a rank), over three per-method lr maps
    assert probe == [
        "-m experiments.train -m experiment=demo results_dir=d/probe logger=none launcher=joblib "
        "hydra.launcher.n_jobs=2 variant=dora,lora variant.rank=8 seed=0 "  # the slower first
        "optim.lr={dora:0.001,lora:0.001},{dora:0.003,lora:0.003},{dora:0.01,lora:0.01}",
        "-m experiments.train -m experiment=demo results_dir=d/probe logger=none launcher=joblib "
        "hydra.launcher.n_jobs=2 variant=full seed=0 optim.lr={full:3e-05},{full:0.0001},{full:0.0003}"]
    lrs = {"lora": 0.003, "galore": 3e-4, "dora": 0.01, "full": 1e-4}
    compare = [" ".join(c[1:]) for c in demo.compare_cmds("d", lrs, jobs=1)]
    # LoRA across ranks (the rank plot), the other low-rank methods at rank 8, the baselines rank-less
    assert compare == [
        "-m experiments.train -m experiment=demo results_dir=d logger=none variant=lora variant.rank=2,8,32 "
        "seed=0,1,2 optim.lr={lora:0.003}",
        "-m experiments.train -m experiment=demo results_dir=d logger=none variant=galore,dora variant.rank=8 "
        "seed=0,1,2 optim.lr={galore:0.0003,dora:0.01}",  # the slowest first
        "-m experiments.train -m experiment=demo results_dir=d logger=none variant=full seed=0,1,2 "
        "optim.lr={full:0.0001}"]
    assert "variant=dora,lora variant.rank=2,8,32" in " ".join(demo.compare_cmds("d", lrs, 1, ("lora", "dora"))[0])
    assert set(demo.GRID) == {*demo.LOW_RANK, *demo.BASELINES} and all(len(g) == 3 for g in demo.GRID.values())
    # the chosen lrs come from the probe's --select-lr table; the probe runs stage 2 repeats are copied
    for variant, lr, val in [("lora", 1e-3, 0.70), ("lora", 3e-3, 0.75), ("full", 1e-4, 0.72)]:
        record(tmp_path / "probe", variant, 0, lr, val=val, test=val, rank=8 if variant == "lora" else None)
    assert aggregate.main(["--results-dir", str(tmp_path / "probe"), "--select-lr"]) == 0
    lrs = demo.chosen_lrs(tmp_path / "probe")
    assert lrs == {"full": 1e-4, "lora": 3e-3}
    assert demo.reuse_probe_runs(tmp_path / "probe", tmp_path, lrs) == 2
    assert sorted(p.name for p in (tmp_path / "runs").glob("*.json")) == sorted(
        p.name for p in (tmp_path / "probe" / "runs").glob("*.json") if "0.001-" not in p.name)


def test_demo_rejects_an_unknown_variant_in_one_line(capsys):
    from experiments import demo

    assert demo.main(["--variants", "lora,nope"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert demo.main(["--rank-sweep", "lora,full"]) == 2
    assert capsys.readouterr().err == "error: --rank-sweep takes lora, lora_plus, dora, galore, adalora (not 'full')\n"


def test_wandb_that_cannot_start_is_one_warning_for_a_run_and_for_the_summary(results, capsys, monkeypatch):
    import wandb

    from experiments.wandb_log import WandbRun

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setattr(wandb, "init", lambda **kw: (_ for _ in ()).throw(RuntimeError("no login\nmore")))
    cfg = {"logger": {"name": "wandb"}, "results_dir": str(results), "variant": {"name": "lora", "rank": 8},
           "task": {"name": "toy"}, "seed": 0}
    with WandbRun(cfg) as wb:
        assert wb.run is None
        wb.log({"loss": 1.0}, 1)  # a no-op, not an error
    assert aggregate.main(["--results-dir", str(results), "--wandb"]) == 0
    out = capsys.readouterr()
    assert out.err.count("warning: W&B disabled (RuntimeError: no login\n") == 2 and "more" not in out.err
    assert "W&B summary run" not in out.out


MAJORITY = {"name": "majority class (label 1)", "val": {"accuracy": 0.55}, "test": {"accuracy": 0.5775}}
CLS = {"directions": {"accuracy": "max", "macro_f1": "max"}, "trivial": MAJORITY}
LM = {"metric": "perplexity", "task": "lm", "directions": {"perplexity": "min", "forget_increase": "min"},
      "trivial": {"name": "the untouched model", "val": {"perplexity": 30.0}, "test": {"perplexity": 31.0}}}


def test_paired_test_only_with_three_matched_seeds(tmp_path, capsys):
    lora, dora, galore = [0.70, 0.74, 0.75], [0.72, 0.73, 0.79], [0.71, 0.76]
    for seed, v in enumerate(lora):
        record(tmp_path, "lora", seed, 1e-3, val=v, test=v, **CLS)
        record(tmp_path, "dora", seed, 1e-3, val=v, test=dora[seed], **CLS)
        record(tmp_path, "pissa", seed, 1e-3, val=v, test=v + 0.25, **CLS)  # the same gain on every seed
    for seed, v in enumerate(galore):
        record(tmp_path, "galore", seed, 1e-3, val=v, test=v, **CLS)
    ok, _ = aggregate.load(tmp_path)
    chosen = aggregate.summarize(ok, "accuracy")
    tests = aggregate.paired_tests(ok, chosen, "accuracy").set_index("variant")
    assert tests.loc["dora", "p_ttest"] == pytest.approx(stats.ttest_rel(dora, lora).pvalue)
    assert tests.loc["dora", "p_holm"] == tests.loc["dora", "p_ttest"]  # the only test run
    assert tests.loc["galore", "n_pairs"] == 2 and np.isnan(tests.loc["galore", "p_ttest"])
    assert tests.loc["galore", "p_note"] == "n/a (2 pairs)" and np.isnan(tests.loc["galore", "p_holm"])
    assert tests.loc["pissa", "p_note"] == "n/a (constant diff)" and np.isnan(tests.loc["pissa", "p_holm"])
    assert aggregate.main(["--results-dir", str(tmp_path)]) == 0
    rows = {ln.split(" | ")[1]: ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| toy |")}
    p = f"{stats.ttest_rel(dora, lora).pvalue:.3g}"
    assert f"| +0.0167 | {p} |" in rows["dora"] and "| n/a (2 pairs) |" in rows["galore"]
    assert "| n/a (constant diff) |" in rows["pissa"] and "| 1 |" not in rows["galore"]


def test_a_lower_is_better_metric_selects_the_lowest_validation_lr(tmp_path, capsys):
    # forget_increase is not the main metric: its direction comes from the records' "directions"
    for seed in range(3):
        for lr, ppl, forget in ((1e-3, 20.0, 0.5), (1e-4, 25.0, 2.0)):
            metrics = {split: {"perplexity": ppl + seed, "forget_increase": forget + 0.1 * seed}
                       for split in ("val", "test")}
            record(tmp_path, "lora", seed, lr, val=0, test=0, metrics=metrics, **LM)
    ok, _ = aggregate.load(tmp_path)
    for metric in ("perplexity", "forget_increase"):
        assert aggregate.direction(ok, metric) == "min"
        assert aggregate.select_lr(aggregate.summarize(ok, metric))["lr"].tolist() == [1e-3]
    assert aggregate.main(["--results-dir", str(tmp_path), "--select-lr", "--metric", "forget_increase"]) == 0
    rows = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| lm |")]
    assert len(rows) == 1 and "| 1e-03 | 0.6000 ± 0.1000 |" in rows[0]


def test_two_tasks_get_one_table_each_in_their_own_metric(tmp_path, capsys):
    for seed in range(3):
        for variant, gain in (("lora", 0.0), ("dora", 0.01 * (seed + 1))):
            record(tmp_path, variant, seed, 1e-3, val=0.8, test=0.8 + gain, **CLS)
            record(tmp_path, variant, seed, 1e-3, val=20.0, test=20.0 - gain, **LM)
    assert aggregate.main(["--results-dir", str(tmp_path), "--select-lr"]) == 0
    tables = tmp_path / "tables"
    assert sorted(p.name for p in tables.glob("*.md")) == ["summary_lm_perplexity.md", "summary_toy_accuracy.md"]
    toy, lm = (tables / "summary_toy_accuracy.md").read_text(), (tables / "summary_lm_perplexity.md").read_text()
    assert "test accuracy" in toy and "Δ vs baseline (higher is better)" in toy and "perplexity" not in toy
    assert "test perplexity" in lm and "Δ vs baseline (lower is better)" in lm and "accuracy" not in lm
    assert "| lm | dora | 8 | 1e-03 | 19.9800 ± 0.0100 |" in lm and "| -0.0200 |" in lm
    assert "12 ok runs" in capsys.readouterr().out
    # --metric: only the tasks that report it, the others listed as skipped; --task still filters
    assert aggregate.main(["--results-dir", str(tmp_path), "--metric", "perplexity", "--out", str(tmp_path / "p")]) == 0
    assert "skipped task toy: its runs report no test perplexity" in capsys.readouterr().out
    assert [p.name for p in (tmp_path / "p").glob("*.md")] == ["summary_lm_perplexity.md"]
    assert aggregate.main(["--results-dir", str(tmp_path), "--task", "toy", "--out", str(tmp_path / "t")]) == 0
    assert [p.name for p in (tmp_path / "t").glob("*.md")] == ["summary_toy_accuracy.md"]


def test_a_run_at_the_trivial_baseline_is_flagged(tmp_path, capsys):
    for seed, v in enumerate([0.5775, 0.70, 0.72]):  # seed 0 did not train: the majority class's accuracy
        record(tmp_path, "lora", seed, 1e-3, val=v, test=v, **CLS)
        record(tmp_path, "dora", seed, 1e-3, val=v, test=v + 0.05, **CLS)
    s = aggregate.summarize(aggregate.load(tmp_path)[0], "accuracy").set_index("variant")
    assert s.loc["lora", "n_trivial"] == 1 and s.loc["dora", "n_trivial"] == 0
    assert s.loc["lora", "trivial"] == 0.5775 and s.loc["lora", "trivial_name"] == "majority class (label 1)"
    assert aggregate.main(["--results-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = {ln.split(" | ")[1]: ln for ln in out.splitlines() if ln.startswith("| toy |")}
    assert "| at trivial |" in out and "| 3 | 1/3 |" in rows["lora"] and "| 3 |  |" in rows["dora"]
    assert "(majority class (label 1): test accuracy 0.5775)" in out
    assert "1 of 6 runs did not beat the trivial baseline:" in out and "at trivial toy-lora-8-0.001-0-ok" in out
    # lower is better: no lower than the untouched model's perplexity is at the trivial baseline
    ok = pd.DataFrame({"test_perplexity": [31.0, 30.5, 32.0], "trivial_test_perplexity": [31.0, 31.0, None]})
    assert aggregate.at_trivial(ok, "perplexity", "min").tolist()[:2] == [1.0, 0.0]
    assert np.isnan(aggregate.at_trivial(ok, "perplexity", "min").iloc[2])  # unknown: not flagged


def test_records_without_a_trivial_baseline_say_so_once(results, capsys):
    assert aggregate.main(["--results-dir", str(results)]) == 0
    out = capsys.readouterr().out
    assert "at trivial" not in out and out.count("trivial baseline unknown for 25 runs") == 1


def test_old_records_without_directions_know_only_the_main_metric(tmp_path, capsys):
    for seed in range(3):
        for variant, lr, f1 in (("lora", 1e-3, 0.6), ("lora", 1e-4, 0.7), ("dora", 1e-3, 0.65)):
            metrics = {split: {"accuracy": 0.8 + seed / 100, "macro_f1": f1} for split in ("val", "test")}
            record(tmp_path, variant, seed, lr, val=0, test=0, metrics=metrics)  # no "directions"
    ok, _ = aggregate.load(tmp_path)
    assert aggregate.direction(ok, "accuracy") == "max" and aggregate.direction(ok, "macro_f1") is None
    assert aggregate.main(["--results-dir", str(tmp_path), "--select-lr"]) == 0
    for argv in (["--select-lr"], []):  # lr selection; the Δ vs baseline column
        assert aggregate.main(["--results-dir", str(tmp_path), "--metric", "macro_f1", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: metric 'macro_f1' has no declared direction") and err.count("\n") == 1
    with pytest.raises(ValueError, match="macro_f1"):
        aggregate.select_lr(aggregate.summarize(ok, "macro_f1"))


def test_dropped_runs_are_reported_not_silently_ignored(results, capsys):
    record(results, "lora", 7, 1e-3, val=0, test=0, metrics={"val": {"macro_f1": 0.5}, "test": {"macro_f1": 0.5}})
    (results / "runs" / "null.json").write_text("null")
    (results / "runs" / "list.json").write_text("[]")
    (results / "runs" / "cut.json").write_text('{"status": "o')
    ok, failed = aggregate.load(results)
    assert len(ok) == 26 and sorted(failed.loc[failed["status"] == "unreadable", "run_id"]) == ["cut", "list", "null"]
    assert aggregate.main(["--results-dir", str(results)]) == 0
    out = capsys.readouterr().out
    assert "25 ok runs, 1 failed, 3 unreadable, 1 without the metric" in out
    assert "unreadable null: not a run record: the file holds null" in out and "the file holds []" in out
    assert "unreadable cut: unreadable record" in out
    assert "dropped toy-lora-8-0.001-7-ok lora toy: ok, but no test accuracy" in out
