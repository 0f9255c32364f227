"""Aggregation on hand-built records with known answers."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

from experiments import aggregate


def record(tmp_path, variant, seed, lr, val, test, rank=8, status="ok", task="toy", trainable=100, config=None):
    rid = f"{variant}-{rank}-{lr}-{seed}-{status}" + (f"-{hash(json.dumps(config))}" if config else "")
    r = {"schema": 1, "run_id": rid, "group_id": rid[:-2], "status": status, "variant": variant, "task": task,
         "model": "m", "rank": rank, "alpha": 16, "scaling": "standard", "targets": ["a.query", "a.value"],
         "lr": lr, "seed": seed, "main_metric": "accuracy", "higher_is_better": True,
         "metrics": {"val": {"accuracy": val}, "test": {"accuracy": test}} if status == "ok" else None,
         "error": None if status == "ok" else {"type": "NonFiniteLoss", "message": "nan at step 3", "step": 3},
         "cost": {"trainable_params": trainable, "trainable_pct": 1.0, "optimizer_state_bytes": 8 * trainable,
                  "peak_memory_bytes": 2**30, "step_time_ms": 10.0, "train_time_s": 1.0}}
    if config is not None:
        r["config"] = config
    (tmp_path / "runs").mkdir(exist_ok=True)
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
    assert set(ok["targets"]) == {"query,value"}


def test_summary_mean_std_and_bootstrap_ci_match_direct_computation(results):
    ok, _ = aggregate.load(results)
    s = aggregate.summarize(ok, "accuracy")
    lora = s[(s.variant == "lora") & (s.lr == 1e-3)].iloc[0]
    assert lora.n == 5 and lora["mean"] == pytest.approx(np.mean(LORA)) and lora["std"] == pytest.approx(
        np.std(LORA, ddof=1))
    direct = stats.bootstrap((np.array(LORA),), np.mean, confidence_level=0.95, n_resamples=9999,
                             random_state=np.random.default_rng(0), method="BCa").confidence_interval
    assert (lora.ci_low, lora.ci_high) == pytest.approx((direct.low, direct.high))
    assert lora.ci_low < lora["mean"] < lora.ci_high


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


def test_paired_tests_match_scipy_on_matched_seeds_and_holm_orders(results):
    ok, _ = aggregate.load(results)
    chosen = aggregate.select_lr(aggregate.summarize(ok, "accuracy"))
    tests = aggregate.paired_tests(ok, chosen, "accuracy", baseline="lora").set_index("variant")
    assert tests.loc["dora", "n_pairs"] == 5
    assert tests.loc["dora", "p_ttest"] == pytest.approx(stats.ttest_rel(DORA, LORA).pvalue)
    assert tests.loc["dora", "mean_diff"] == pytest.approx(np.mean(DORA) - np.mean(LORA))
    raw = tests["p_ttest"].tolist()
    assert tests["p_holm"].tolist() == pytest.approx(aggregate.holm(raw))


def test_holm_against_hand_computed_values():
    # sorted p: 0.01 (x3) -> 0.03, 0.02 (x2) -> 0.04, 0.04 (x1) -> 0.04 (monotone)
    assert aggregate.holm([0.04, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])
    assert aggregate.holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])


def test_cli_writes_markdown_latex_csv_and_lists_failures(results, capsys):
    assert aggregate.main(["--results-dir", str(results), "--select-lr"]) == 0
    out = capsys.readouterr().out
    assert "| toy | dora | 8 | 1e-04 | 0.8400 ± 0.0158 |" in out and "1 failed" in out and "NonFiniteLoss" in out
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


def test_demo_runs_the_commands_a_user_would_type():
    from experiments import demo

    cmds = [" ".join(c[1:]) for c in demo.steps("results/demo", "lora,dora,galore", "2,8", jobs=1)]
    sweeps = [c for c in cmds if c.startswith("-m experiments.train -m experiment=demo")]
    assert len(sweeps) == 4 and all("results_dir=results/demo" in c for c in sweeps)
    # one sweep per learning rate: lora and dora share theirs, galore has its own
    assert "variant=lora,dora variant.rank=2,8 optim.lr=4e-3" in cmds[0]
    assert f"variant=galore variant.rank=2,8 optim.lr={demo.LRS['galore']}" in cmds[1]
    assert f"variant=full optim.lr={demo.LRS['full']}" in cmds[2] and "variant.rank" not in cmds[2]
    assert f"variant=head optim.lr={demo.LRS['head']}" in cmds[3]
    assert cmds[4:] == ["-m experiments.plots --results-dir results/demo",
                        "-m experiments.aggregate --results-dir results/demo --wandb"]
    assert set(demo.LRS) == {*demo.LOW_RANK, "full", "head"}


def test_demo_rejects_an_unknown_variant_in_one_line(capsys):
    from experiments import demo

    assert demo.main(["--variants", "lora,nope"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


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
