"""experiments.report: the runs of an experiment are exactly its sweep's (run ids as train makes them), the
verdict rules on constructed differences, and whole reports on constructed records with known answers."""

from __future__ import annotations

import json
import sys

import pytest

from experiments import findings, records, report  # noqa: F401  (findings registers the reports)
from experiments.report import NOT_COMPARABLE, NOT_REPRODUCED, REPRODUCED, Diff


def test_every_paper_experiment_has_a_report_and_composes():
    """Each cpu experiment composes (its base config) and has a finding registered to report it."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import experiments.schema  # noqa: F401  (the structured configs the YAMLs start from)

    names = report.experiments()
    assert len(names) >= 15 and set(names) == set(report.FINDINGS)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(report.CONF), version_base="1.3"):
        for name in names:
            cfg = compose("train", overrides=[f"experiment={name}"], return_hydra_config=True)
            assert cfg.hydra.sweeper.params and "/paper/" in cfg.results_dir, name
    GlobalHydra.instance().clear()


def test_every_paper_size_composes_resolves_and_checks_without_the_hub():
    """``experiment=paper/<name>/paper`` (GPU users, the hub): the first job of each composes, resolves and
    passes the entry point's option checks (variant, task option names, optim), all without downloading."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    import experiments.schema  # noqa: F401
    from experiments import train

    parser = OverridesParser.create()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(report.CONF), version_base="1.3"):
        for name in report.experiments():
            base = compose("train", overrides=[f"experiment={name}/paper"], return_hydra_config=True)
            params = parser.parse_overrides([f"{k}={v}" for k, v in base.hydra.sweeper.params.items()])
            first = BasicSweeper.split_arguments(params, None)[0][0]
            cfg = OmegaConf.to_container(compose("train", overrides=[f"experiment={name}/paper", *first]),
                                         resolve=True)
            train.check(train.expand_paths(train.per_variant_lr(cfg)))
            assert cfg["results_dir"].endswith("-paper"), name
            assert cfg["task"]["name"] in ("glue_sst2", "lm_gsm8k", "digits"), name
    GlobalHydra.instance().clear()


@pytest.mark.slow  # every job of every sweep: about a minute
def test_every_sweep_expands_to_distinct_runs_that_pass_the_checks():
    """Every job of every cpu sweep is a distinct run that passes the entry point's option checks (a sweep
    job rejected as bad input would leave its report a run short for good)."""
    from experiments import train

    for name in report.experiments():
        cfg, jobs = report.sweep(name)
        assert jobs and len({j.run_id for j in jobs}) == len(jobs), name  # every job a distinct run
        assert "/paper/" in jobs[0].config["results_dir"], name
        for j in jobs:
            train.check(j.config)
        for j in report.sweep(f"{name}/paper")[1]:  # the paper size too: composition and checks, no hub
            train.check(j.config)


def test_sweep_run_ids_are_the_ids_train_writes(tmp_path, monkeypatch):
    """One job of a real multirun through the command line: its record's id is the one ``sweep`` computes."""
    from hydra.core.global_hydra import GlobalHydra

    from experiments import train

    narrow = ["optim.lr=1e-3", "seed=1"]  # the command line narrows the sweep, as Hydra's sweeper does
    GlobalHydra.instance().clear()
    monkeypatch.setattr(sys, "argv", ["lorabench-train", "-m", "experiment=paper/digits_rank1", *narrow,
                                      f"results_dir={tmp_path}", "logger=none"])
    train.cli()
    written = [p.stem for p in (tmp_path / "runs").glob("*.json")]
    _, jobs = report.sweep("paper/digits_rank1", tuple(narrow))
    assert written == [j.run_id for j in jobs] and len(written) == 1
    _, every = report.sweep("paper/digits_rank1")
    assert written[0] in {j.run_id for j in every} and len(every) == 12


@pytest.mark.parametrize(("diff", "label"), [
    (Diff(0.03, 0.01, 0.05, 3), REPRODUCED), (Diff(-0.03, -0.05, -0.01, 3), NOT_REPRODUCED),
    (Diff(0.01, -0.02, 0.04, 3), NOT_REPRODUCED), (Diff(0.01, float("nan"), float("nan"), 1), NOT_COMPARABLE)])
def test_sign_verdict(diff, label):
    v = report.sign_verdict("a > b", diff, "a − b")
    assert v.label == label and "a − b" in v.reason
    flipped = Diff(-diff.mean, -diff.high, -diff.low, diff.n)  # the claim a < b on the negated difference
    w = report.sign_verdict("a < b", flipped, "a − b", negative=True)
    assert w.label == label and f"{flipped.mean * 100:+.2f}" in w.reason  # shown as measured, not flipped back


def test_correlation_interval_is_fisher_z_and_stays_inside_one():
    d = findings.correlation_diff([0.97, 0.99, 0.9])
    assert -1 < d.low < d.mean < d.high < 1 and d.n == 3
    z = __import__("numpy").arctanh([0.97, 0.99, 0.9])
    assert abs(d.mean - __import__("math").tanh(z.mean())) < 1e-12
    t = findings.values_diff([0.97, 0.99, 0.9])
    assert t.high > 1  # the raw t-interval leaves (−1, 1) on the same values: why the report uses z


def test_equivalence_verdict():
    assert report.equivalence_verdict("a ≈ b", Diff(0.0, -0.01, 0.01, 3), 0.02, "d").label == REPRODUCED
    wide = report.equivalence_verdict("a ≈ b", Diff(0.0, -0.03, 0.01, 3), 0.02, "d")
    assert wide.label == NOT_REPRODUCED and "not shown" in wide.reason
    apart = report.equivalence_verdict("a ≈ b", Diff(0.05, 0.03, 0.07, 3), 0.02, "d")
    assert apart.label == NOT_REPRODUCED and "a real difference" in apart.reason


_NAMES = {"q": "l.query", "k": "l.key", "v": "l.value", "o": "l.attention.output.dense"}
# a preset -> the module names a record holds (what apply() resolved); aggregate keeps their last part
TARGETS = {**{p: [_NAMES[c] for c in p] for p in ("q", "k", "v", "o", "qk", "qv", "qkvo")},
           "all-linear": [*_NAMES.values(), "l.intermediate.dense", "l.output.dense"]}


def _fake(job: report.Job, test: float, val: float, results_dir, metric: str = "accuracy", **extra) -> None:
    """A minimal ok record for ``job`` with the given test and val ``metric`` (what aggregate.load reads);
    ``extra`` replaces or adds record fields (history, cost, variant_state)."""
    cfg = job.config
    v = cfg["variant"]
    higher = metric != "perplexity"
    rec = {"schema": records.SCHEMA, "run_id": job.run_id, "status": "ok", "variant": v["name"],
           "task": cfg["task"]["name"], "model": "m", "rank": v.get("rank"), "alpha": v.get("alpha"),
           "scaling": v.get("scaling"), "targets": TARGETS.get(v.get("targets")), "lr": cfg["optim"]["lr"],
           "seed": cfg["seed"], "metrics": {"val": {metric: val}, "test": {metric: test}},
           "directions": {metric: "max" if higher else "min"}, "main_metric": metric, "higher_is_better": higher,
           "config": cfg, "history": [], "cost": {"trainable_params": 1}, "env": {"git": "test"}, **extra}
    records.write(results_dir, rec)


def _verdicts(out, name: str) -> dict[str, dict]:
    got = json.loads((out / name.removeprefix("paper/") / "verdicts.json").read_text())["verdicts"]
    return {v["claim"]: v for v in got}


def test_lora_rank_report_on_constructed_records(tmp_path):
    """Wq,Wv flat in rank, Wq rising with it, the middle lr best: both verdicts reproduced; then Wq,Wv made to
    rise by 5 points from r=1 to r=64: the equivalence fails."""
    _, jobs = report.sweep("paper/lora_rank")

    def acc(job, qv_slope):
        v, lr, seed = job.config["variant"], job.config["optim"]["lr"], job.config["seed"]
        rank = v["rank"]
        base = 0.80 - 0.03 * abs(__import__("math").log10(lr / 3e-3))  # 3e-3 is best
        rise = {1: 0.0, 2: 0.01, 4: 0.02, 8: 0.03, 64: 0.04}[rank]
        bump = rise if v["targets"] == "q" else qv_slope * rise
        return base + bump + 0.001 * seed

    for slope, want in ((0.0, REPRODUCED), (1.25, NOT_REPRODUCED)):
        folder = tmp_path / f"s{slope}"
        for j in jobs:
            a = acc(j, slope)
            _fake(j, a, a, folder)
        path = report.make("paper/lora_rank", tmp_path / f"out{slope}", results_dir=folder)
        verdicts = {v["claim"]: v["label"] for v in json.loads((tmp_path / f"out{slope}" / "lora_rank" /
                                                                "verdicts.json").read_text())["verdicts"]}
        assert verdicts["Wq,Wv: r=1 is as good as r=64"] == want, verdicts
        assert "90 of 90 ok" in path.read_text()
        if slope == 0.0:
            assert verdicts["Wq alone gains more from rank than Wq,Wv"] == REPRODUCED
            assert "0.003" in path.read_text()  # the chosen lr


def test_report_counts_runs_that_are_missing(tmp_path):
    _, jobs = report.sweep("paper/lora_targets")
    for j in jobs[:5]:
        _fake(j, 0.7, 0.7, tmp_path)
    runs = report.load_runs("paper/lora_targets", tmp_path)
    assert len(runs.records) == 5 and len(runs.missing) == len(jobs) - 5


ACCURACY_ONLY = ["paper/lora_targets", "paper/dora_rank", "paper/adalora_budget", "paper/galore_vs_lora",
                 "paper/galore_rank", "paper/galore_update_freq", "paper/loraplus_ratio", "paper/lr_fairness"]


@pytest.mark.slow  # a report per experiment over every job of its sweep: about a minute
@pytest.mark.parametrize("name", ACCURACY_ONLY)
def test_reports_of_accuracy_findings_render_with_a_verdict_per_claim(name, tmp_path):
    """Constructed records (one accuracy per run: a seeded function of its settings) give each of these
    reports its tables and at least one verdict, every verdict one of the three labels."""
    import random

    _, jobs = report.sweep(name)
    for j in jobs:
        rnd = random.Random(j.run_id)
        a = 0.7 + 0.05 * rnd.random()
        _fake(j, a, a + 0.01 * rnd.random(), tmp_path / "runs_here")
    path = report.make(name, tmp_path / "out", results_dir=tmp_path / "runs_here")
    verdicts = json.loads((tmp_path / "out" / name.removeprefix("paper/") / "verdicts.json").read_text())["verdicts"]
    assert verdicts and all(v["label"] in (REPRODUCED, NOT_REPRODUCED, NOT_COMPARABLE) for v in verdicts)
    assert f"{len(jobs)} of {len(jobs)} ok" in path.read_text()


def test_galore_rank_report_tells_a_flattening_curve_from_a_straight_one(tmp_path):
    """Accuracy rising 3 points per rank doubling up to r=4 and flat after (the paper's shape): the gains shrink
    (r2→8: +3, r8→32: 0) and r=4 ≈ r=8. A straight line in log r (3 points per doubling): the gains do not
    shrink and r=8 sits 3 points above r=4, outside the ±1 point margin."""
    import math

    _, jobs = report.sweep("paper/galore_rank")
    shapes = {"flat_from_4": lambda r: min(math.log2(r), 2), "straight": lambda r: math.log2(r)}
    for name, shape in shapes.items():
        for j in jobs:
            r, lr, seed = j.config["variant"]["rank"], j.config["optim"]["lr"], j.config["seed"]
            a = 0.70 + 0.03 * shape(r) - 0.02 * abs(math.log10(lr / 3e-4)) + 0.002 * seed * (r % 3)
            _fake(j, a, a, tmp_path / name)
        report.make("paper/galore_rank", tmp_path / f"out_{name}", results_dir=tmp_path / name)
    flat, straight = (_verdicts(tmp_path / f"out_{n}", "paper/galore_rank") for n in shapes)
    shrink = "the gains shrink: r=2→8 gains more than r=8→32"
    same = "r=4 and r=8 are equivalent (Table 4: within 0.1 on the GLUE average)"
    assert flat[shrink]["label"] == REPRODUCED and flat[same]["label"] == REPRODUCED, (flat[shrink], flat[same])
    assert straight[shrink]["label"] == NOT_REPRODUCED and straight[same]["label"] == NOT_REPRODUCED


def test_galore_update_freq_report_checks_the_flat_range_from_t50(tmp_path):
    """T = 50 and 100 within 0.2 points (the paper's flat range): equivalent; 3 points apart: not shown."""
    import math

    _, jobs = report.sweep("paper/galore_update_freq")
    for gap100, name in ((0.750, "flat"), (0.722, "falls")):
        for j in jobs:
            t, lr, seed = j.config["variant"]["update_proj_gap"], j.config["optim"]["lr"], j.config["seed"]
            base = {2: 0.72, 10: 0.73, 50: 0.752, 100: gap100}[t]
            a = base - 0.02 * abs(math.log10(lr / 3e-4)) + 0.001 * seed * (t % 7)
            _fake(j, a, a, tmp_path / name)
        report.make("paper/galore_update_freq", tmp_path / f"out_{name}", results_dir=tmp_path / name)
    claim = "T=50 and T=100 are equivalent (Fig. 5: little difference from 50 to 1000)"
    assert _verdicts(tmp_path / "out_flat", "paper/galore_update_freq")[claim]["label"] == REPRODUCED
    assert _verdicts(tmp_path / "out_falls", "paper/galore_update_freq")[claim]["label"] == NOT_REPRODUCED


def test_adalora_ranks_report_on_constructed_rank_patterns(tmp_path):
    """Kept ranks that grow with the layer and favour the two FFN matrices: both claims reproduced; the mirror
    image (ranks falling with the layer, FFN starved): both not reproduced."""
    _, jobs = report.sweep("paper/adalora_ranks")
    types = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
             "intermediate.dense", "output.dense"]

    def pattern(seed, up):
        out = {}
        for layer in range(6):
            for t in types:
                k = layer if up else 5 - layer
                ffn = t in ("intermediate.dense", "output.dense")
                out[f"encoder.layer.{layer}.{t}"] = min(12, 2 + k + (4 if ffn == up else 0) + (seed + layer) % 2)
        return out

    for up, want in ((True, REPRODUCED), (False, NOT_REPRODUCED)):
        folder, out = tmp_path / f"r{up}", tmp_path / f"o{up}"
        for j in jobs:
            a = 0.8 - 0.01 * abs(j.config["optim"]["lr"] - 1e-2) * 100
            _fake(j, a, a, folder, variant_state={"rank_pattern": pattern(j.config["seed"], up)})
        report.make("paper/adalora_ranks", out, results_dir=folder)
        v = _verdicts(out, "paper/adalora_ranks")
        assert v["the feed-forward matrices get more than their even share"]["label"] == want, v
        top = v["the top layers get more rank (Spearman of rank vs layer > 0)"]
        assert top["label"] == want and ("lies below 0 (the opposite)" in top["reason"]) == (not up), top
        assert (out / "adalora_ranks" / "rank_pattern.png").exists()


def test_rslora_report_on_constructed_learning_curves(tmp_path):
    """α/√r: the loss falls by 0.05 per doubling of r; α/r: flat. Both verdicts reproduced; with both flat,
    neither is."""
    import math

    _, jobs = report.sweep("paper/rslora")

    def history(rank, scaling, seed, lr, effect):
        drop = effect * math.log2(rank) if scaling == "rslora" else 0.0
        end = 0.6 - drop + 0.002 * seed + 0.05 * abs(math.log10(lr / 1e-3))
        # α/r: ‖∇B‖ ∝ s·√r = α/√r (halves every 4× in r) when effect is on; α/√r: flat
        wobble = 1 + 0.1 * (__import__("random").Random(f"{rank}-{seed}-{scaling}").random() - 0.5)  # no trend
        norm = (0.1 * rank ** -0.5 if scaling == "standard" and effect else 0.05) * wobble
        return [{"step": s, "loss": end + 0.5 * (1 - s / 100), "adapter_grad_norm": norm * (1 + 0.1 * (s % 3))}
                for s in range(5, 101, 5)]

    for effect, want in ((0.05, REPRODUCED), (0.0, NOT_REPRODUCED)):
        folder, out = tmp_path / f"e{effect}", tmp_path / f"o{effect}"
        for j in jobs:
            v, lr, seed = j.config["variant"], j.config["optim"]["lr"], j.config["seed"]
            acc = 0.75 - 0.01 * abs(math.log10(lr / 1e-3))
            _fake(j, acc, acc, folder, history=history(v["rank"], v["scaling"], seed, lr, effect))
        report.make("paper/rslora", out, results_dir=folder)
        got = _verdicts(out, "paper/rslora")
        lower = got["with α/√r a higher rank trains to a lower loss (slope of loss vs log2 r < 0)"]
        assert lower["label"] == (want if effect else NOT_REPRODUCED), got
        shrinks = got["with α/r the adapter's gradient norm shrinks as r grows"]
        assert shrinks["label"] == want, shrinks
        if effect:
            assert "-0.05" in lower["reason"]  # the slope as measured
            assert got["with α/r the rank matters less than with α/√r (flatter loss vs rank)"]["label"] == want
            assert "-0.5" in shrinks["reason"]  # log2 norm per doubling: −1/2 (± the wobble)
            assert got["with α/√r the gradient norm collapses less with r than with α/r"]["label"] == want
        assert (out / "rslora" / "loss_vs_rank.png").exists()


def test_galore_memory_report_on_constructed_costs(tmp_path):
    _, jobs = report.sweep("paper/galore_memory")
    for j in jobs:
        v = j.config["variant"]
        layerwise = bool(v.get("layerwise"))
        peak = {"full": 3.4e9, "lora": 2.2e9, "galore": 2.5e9}[v["name"]] - (3e7 if layerwise else 0)
        # galore: one 100x400 weight projected at r=8 plus 2e4 other parameters: Table 1 counts
        # 100·8 + 2·400·8 + 2·2e4 = 47,200 elements, 188,800 bytes in float32 (others: 2 per parameter)
        trainable = 60_000 if v["name"] != "lora" else 1_000
        shapes = {"rank": 8, "projected": {"l.0.w": [100, 400]}} if v["name"] == "galore" else None
        _fake(j, 20.0, 20.0, tmp_path / "runs_here", metric="perplexity", variant_state=shapes,
              cost={"trainable_params": trainable, "trainable_bytes": 4 * trainable, "gradient_bytes": 4e8,
                    "optimizer_state_bytes": {"full": 8 * trainable, "lora": 8 * trainable, "galore": 188_800}[
                        v["name"]], "peak_memory_bytes": peak + 1e6 * j.config["seed"]})
    text = report.make("paper/galore_memory", tmp_path / "out", results_dir=tmp_path / "runs_here").read_text()
    got = _verdicts(tmp_path / "out", "paper/galore_memory")
    assert {v["label"] for v in got.values()} == {REPRODUCED} and len(got) == 4, got  # the peak at 2 batch sizes
    assert "GaLore / full: 0.39" in text and "galore layerwise" in text and "Table 1's count 188,800" in text


def test_lr_fairness_lm_report_counts_the_flips_of_a_lower_is_better_metric(tmp_path):
    """Perplexity (lower is better): full FT is best at its own low lr but worst at LoRA's lr, so a shared lr
    flips every pair with full FT (4 of the 10)."""
    import math

    _, jobs = report.sweep("paper/lr_fairness_lm")
    best_lr = {"lora": 1e-3, "dora": 1e-3, "galore": 1e-3, "adalora": 1e-3, "full": 3e-5}
    level = {"lora": 20.0, "dora": 19.5, "galore": 21.0, "adalora": 22.0, "full": 18.0}
    for diverges in (False, True):
        folder, out = tmp_path / f"runs{diverges}", tmp_path / f"out{diverges}"
        for j in jobs:
            name, lr, seed = j.config["variant"]["name"], j.config["optim"]["lr"], j.config["seed"]
            ppl = level[name] + 3 * abs(math.log10(lr / best_lr[name])) ** 2 * (4 if name == "full" else 1) + 0.1 * seed
            _fake(j, ppl, ppl, folder, metric="perplexity")
            if diverges and name == "full" and lr >= 1e-3:  # full FT blows up from LoRA's lr on: failed records
                _fake(j, ppl, ppl, folder, metric="perplexity", status="failed", metrics=None,
                      error={"type": "NonFiniteLoss", "message": "loss is nan", "step": 3})
        text = report.make("paper/lr_fairness_lm", out, results_dir=folder).read_text()
        got = _verdicts(out, "paper/lr_fairness_lm")["a shared lr changes the ranking of the methods"]
        assert got["label"] == REPRODUCED and "4 of 10 pairs flip" in got["reason"], got  # full: last either way
        assert "4 clearly" in got["reason"]  # the seeds shift every method alike: each paired interval is tight
        assert "0.001" in text and "3e-05" in text
        assert ("failed (3 runs; ranked last)" in text) == diverges


def test_lr_fairness_ranks_a_method_at_the_trivial_baseline_in_every_seed_last(tmp_path):
    """Full FT diverges from LoRA's lr on: its perplexity (3e3, 5e2, 9e3 by seed) is worse than the untrained
    model's 50 in every seed. The paired interval of such values spans 0, yet the order is certain: it is ranked
    last like a failed run, and each of its 4 flips is clear, as is what the shared lr costs it; with the
    untrained model at 1e5 (so full is no longer at the trivial baseline) neither is."""
    import math

    _, jobs = report.sweep("paper/lr_fairness_lm")
    best_lr = {"lora": 1e-3, "dora": 1e-3, "galore": 1e-3, "adalora": 1e-3, "full": 3e-5}
    level = {"lora": 20.0, "dora": 19.5, "galore": 21.0, "adalora": 22.0, "full": 18.0}
    for untrained in (50.0, 1e5):
        folder, out = tmp_path / f"runs{untrained:g}", tmp_path / f"out{untrained:g}"
        for j in jobs:
            name, lr, seed = j.config["variant"]["name"], j.config["optim"]["lr"], j.config["seed"]
            ppl = level[name] + abs(math.log10(lr / best_lr[name])) ** 2 + 0.1 * seed
            if name == "full" and lr >= 1e-3:
                ppl = (3e3, 5e2, 9e3)[seed]
            _fake(j, ppl, ppl, folder, metric="perplexity",
                  trivial={"name": "untrained model", "test": {"perplexity": untrained}})
        text = report.make("paper/lr_fairness_lm", out, results_dir=folder).read_text()
        got = _verdicts(out, "paper/lr_fairness_lm")["a shared lr changes the ranking of the methods"]
        assert "4 of 10 pairs flip" in got["reason"], got
        row = next(line for line in text.splitlines() if line.startswith("| full |"))
        cost = _verdicts(out, "paper/lr_fairness_lm")["a shared lr understates some methods (worse than at their "
                                                        "own lr)"]
        if untrained == 50.0:
            assert got["label"] == REPRODUCED and "4 clearly" in got["reason"], got
            assert "3 of 3 seeds at the trivial baseline" in row and "diverged" in row and "ranked last" in row, row
            assert cost["label"] == REPRODUCED and "1 of 1 methods" in cost["reason"] and ": full" in cost["reason"]
        else:
            assert got["label"] == NOT_REPRODUCED and "0 clearly" in got["reason"], got
            assert "ranked last" not in row, row
            assert cost["label"] == NOT_REPRODUCED and "0 of 1 methods" in cost["reason"], cost


def test_a_setting_at_the_trivial_baseline_is_flagged_in_its_row(tmp_path):
    """Wk alone no better than the majority class (0.5) on every seed: its row says so; the others do not."""
    _, jobs = report.sweep("paper/lora_targets")
    for j in jobs:
        a = 0.5 if j.config["variant"]["targets"] == "k" else 0.75
        _fake(j, a, a, tmp_path / "runs_here", trivial={"name": "majority class", "test": {"accuracy": 0.5}})
    text = report.make("paper/lora_targets", tmp_path / "out", results_dir=tmp_path / "runs_here").read_text()
    flagged = [line for line in text.splitlines() if "at the trivial baseline" in line]
    assert len(flagged) == 1 and flagged[0].startswith("| Wk") and "3 of 3 seeds" in flagged[0], flagged


def test_lr_fairness_flips_within_the_seed_noise_are_not_clear(tmp_path):
    """DoRA 0.2 points above LoRA at LoRA's lr and 0.2 below at its own, with ±2-point seed noise that is
    not shared: the means flip, the paired intervals span 0, so the claim is not reproduced."""
    import math

    _, jobs = report.sweep("paper/lr_fairness")
    best = {"lora": 3e-3, "dora": 1e-3}
    for j in jobs:
        name, lr, seed = j.config["variant"]["name"], j.config["optim"]["lr"], j.config["seed"]
        if name not in best:
            continue
        noise = {"lora": (0.0, 0.02, -0.02), "dora": (0.02, -0.02, 0.0)}[name][seed]
        acc = 0.75 - 0.05 * abs(math.log10(lr / best[name])) + noise - (0.002 if name == "dora" else 0.0)
        if name == "dora" and math.isclose(lr, 3e-3):
            acc = 0.752 + noise  # at LoRA's lr: 0.2 points above LoRA's 0.75 (at its own: 0.2 below)
        _fake(j, acc, acc - 0.01 * (lr != best[name]), tmp_path / "runs_here")
    report.make("paper/lr_fairness", tmp_path / "out", results_dir=tmp_path / "runs_here")
    got = _verdicts(tmp_path / "out", "paper/lr_fairness")["a shared lr changes the ranking of the methods"]
    assert got["label"] == NOT_REPRODUCED and "1 of 1 pairs flip" in got["reason"] and "0 clearly" in got["reason"], got
    cost = _verdicts(tmp_path / "out", "paper/lr_fairness")["a shared lr understates some methods (worse than at "
                                                             "their own lr)"]
    assert cost["label"] == NOT_REPRODUCED and "0 of 1 methods" in cost["reason"], cost  # DoRA: better at LoRA's lr


def test_loraplus_report_finds_the_b_lr_ridge(tmp_path):
    """Accuracy a function of B's lr alone (λ × lr, best at 1e-2) plus a bonus for λ = 4: the grid names B's lr
    at each λ's best run (λ=1: its highest lr, 1e-2), the best λ is 4, and LoRA+ − LoRA is reproduced."""
    import math

    _, jobs = report.sweep("paper/loraplus_ratio")
    for j in jobs:
        lam, lr, seed = j.config["variant"]["ratio"], j.config["optim"]["lr"], j.config["seed"]
        a = 0.8 - 0.05 * abs(math.log10(lam * lr / 1e-2)) + (0.02 if lam == 4 else 0.0) + 0.001 * seed
        _fake(j, a, a, tmp_path / "runs")
    text = report.make("paper/loraplus_ratio", tmp_path / "out", results_dir=tmp_path / "runs").read_text()
    got = _verdicts(tmp_path / "out", "paper/loraplus_ratio")
    assert got["the best λ on validation is above 1"]["label"] == REPRODUCED
    assert "best λ = 4" in got["the best λ on validation is above 1"]["reason"]
    assert got["LoRA+ (λ=4) beats LoRA (λ=1), each at its tuned lr"]["label"] == REPRODUCED
    rows = {line.split(" | ")[0]: line.split(" | ")[-1] for line in text.splitlines() if line.startswith("| 1 |")
            or line.startswith("| 4 |")}
    assert rows["| 1"] == "0.01 |" and rows["| 4"] == "0.012 |", rows  # λ=1 at lr 1e-2; λ=4 at 3e-3 (B: 1.2e-2)


def test_loraplus_grid_marks_cells_at_the_trivial_baseline(tmp_path):
    """Runs whose B lr (λ × lr) reaches 4e-2 score the majority class after a loss spike: their grid cells carry
    †, one seed of another cell gives (1/3 †), and the table under the grid gives their loss beside the prior's
    entropy, with the val-best cell for comparison. Unmarked cells stay plain numbers."""
    import math

    majority = {"name": "majority class (label 1)", "test": {"accuracy": 0.6}}
    _, jobs = report.sweep("paper/loraplus_ratio")
    for j in jobs:
        lam, lr, seed = j.config["variant"]["ratio"], j.config["optim"]["lr"], j.config["seed"]
        dead = lam * lr >= 4e-2 or (lam == 1 and lr == 1e-4 and seed == 0)
        a = 0.6 if dead else 0.8 - 0.05 * abs(math.log10(lam * lr / 1e-2)) + 0.001 * seed
        loss = [0.7, 2.0 if lam * lr >= 4e-2 else 0.9] + [0.673 if dead else 0.5] * 20
        _fake(j, a, a, tmp_path / "runs", trivial=majority, history=[{"step": i, "loss": v} for i, v in
                                                                      enumerate(loss)])
    text = report.make("paper/loraplus_ratio", tmp_path / "out", results_dir=tmp_path / "runs").read_text()
    grid = {}
    for line in text.split("B's lr at the best |", 1)[1].splitlines():  # the grid's rows come first
        if line.startswith(("| 1 |", "| 8 |")):
            grid.setdefault(line.split(" | ")[0], line.split(" | ")[1:-1])
    assert grid["| 8"][-1] == "60.0 †" and "†" not in grid["| 8"][-2], grid  # lr 1e-2, 3e-3 (B: 8e-2, 2.4e-2)
    assert grid["| 1"][0].endswith("(1/3 †)") and "†" not in grid["| 1"][-1], grid
    assert "0.673 nats" in text, text  # -(0.6 ln 0.6 + 0.4 ln 0.4)
    assert "| 8 | 0.01 | 0.08 | 3/3 | 2.00 | 0.67 |" in text
    assert "(val-best, for comparison) |" in text and "| 0/3 | 0.90 | 0.50 |" in text


def test_galore_memory_peak_that_cannot_see_state_is_not_comparable(tmp_path):
    """When full FT's peak sits no higher than LoRA's although it holds 1.5 GB more gradients and state, the
    peak is set by something else: the layer-wise claim is 'not comparable', not a verdict on noise."""
    _, jobs = report.sweep("paper/galore_memory")
    for j in jobs:
        v = j.config["variant"]
        full = v["name"] == "full"
        _fake(j, 20.0, 20.0, tmp_path / "runs", metric="perplexity",
              cost={"trainable_params": 1_000, "gradient_bytes": 5e8 if full else 4e7,
                    "optimizer_state_bytes": 1e9 if full else 8e7,
                    "peak_memory_bytes": 3.4e9 + 1e7 * j.config["seed"] - (5e8 if v.get("layerwise") else 0)})
    report.make("paper/galore_memory", tmp_path / "out", results_dir=tmp_path / "runs")
    got = _verdicts(tmp_path / "out", "paper/galore_memory")
    for size in (4, 1):
        layerwise = got[f"the layer-wise update lowers the training peak (gradients never all exist), batch {size}"]
        assert layerwise["label"] == NOT_COMPARABLE and "do not resolve it" in layerwise["reason"], layerwise
    assert "the layer-wise update never holds all gradients at once" not in got  # no profiles, no such verdict


def test_galore_memory_tensor_peaks_decide_the_layerwise_claim_per_batch_size(tmp_path):
    """Profiled steps: at batch 4 the peak falls before any gradient exists (layer-wise and plain GaLore tie
    exactly): not reproduced, saying so; at batch 1 the layer-wise peak is 400 MiB lower: reproduced. The
    gradients-at-most verdict compares the most gradient bytes each held."""
    mib = 2**20
    _, jobs = report.sweep("paper/galore_memory")
    for j in jobs:
        v, size = j.config["variant"], j.config["optim"]["batch_size"]
        layerwise, act = bool(v.get("layerwise")), 750 * mib * size / 4
        grads = 0 if layerwise and size == 4 else 500 * mib
        at_peak = {"parameter": 513 * mib, "optimizer_state": 279 * mib, "gradient": 0 if size == 4 else grads,
                   "activation": act if size == 4 else act / 4}
        peak = sum(at_peak.values()) - (400 * mib if layerwise and size == 1 else 0)
        profile = {"step": 2, "peak_bytes": peak, "at_peak": at_peak,
                   "max": {"gradient": 108 * mib if layerwise else 513 * mib}}
        _fake(j, 20.0, 20.0, tmp_path / "runs", metric="perplexity", memory_profile=profile,
              cost={"trainable_params": 1_000, "gradient_bytes": 0 if layerwise else 5e8, "optimizer_state_bytes": 3e8,
                    "peak_memory_bytes": 3.4e9, "tensor_peak_bytes": peak})
    text = report.make("paper/galore_memory", tmp_path / "out", results_dir=tmp_path / "runs").read_text()
    got = _verdicts(tmp_path / "out", "paper/galore_memory")
    claim = "the layer-wise update lowers the training peak (gradients never all exist), batch "
    assert got[claim + "4"]["label"] == NOT_REPRODUCED and "identical" in got[claim + "4"]["reason"], got[claim + "4"]
    assert "gradients 0.0, activations 750.0" in got[claim + "4"]["reason"]
    assert got[claim + "1"]["label"] == REPRODUCED and "-400.00 MiB" in got[claim + "1"]["reason"], got[claim + "1"]
    most = got["the layer-wise update never holds all gradients at once"]
    assert most["label"] == REPRODUCED and "batch 4: layer-wise 108.0 MiB vs 513.0 MiB" in most["reason"], most
    assert "## What the tensors hold at the peak (profiled step 2" in text
