"""The side-by-side benchmark (experiments/bench.py) on a tiny random BERT, --quick: every contender is
there with its ratios, the header says where and with what it ran, and each of our methods trains exactly
the tensors its reference trains and computes the same losses. Timings are never asserted."""

from __future__ import annotations

import contextlib
import io
import json
import math

import pytest

from experiments import bench

PAIRS = [("lora", "peft-lora"), ("lora_plus", "peft-lora_plus"), ("dora", "peft-dora"),
         ("adalora", "peft-adalora"), ("galore", "galore-torch")]


def test_quick_run(tmp_path):
    """One run, four groups of checks (one test: under pytest-xdist a shared fixture would run per worker)."""
    report = _run(tmp_path)
    check_every_contender_and_ratio(report)
    check_ours_trains_what_the_reference_trains(report)
    check_header(report)
    check_markdown(report)


def _run(out):
    """One --quick run on the tiny BERT, in this process (the memory runs still get their own processes)."""
    pytest.importorskip("peft")
    pytest.importorskip("galore_torch")
    import torch

    threads, stdout = torch.get_num_threads(), io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout):
            bench.main(["--workload", "tiny", "--quick", "--threads", "1", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    data = json.loads((out / "tiny-cpu.json").read_text())
    data["_md"] = (out / "tiny-cpu.md").read_text()
    data["_stdout"] = stdout.getvalue()
    return data


def check_every_contender_and_ratio(report):
    rows = {r["key"]: r for r in report["rows"]}
    assert list(rows) == list(bench.CONTENDERS)
    for key, r in rows.items():
        assert r["step_ms"]["n"] == 2 and r["step_ms"]["median"] > 0
        assert r["trainable_params"] >= 0
        if key != "floor":
            assert r["vs_floor"] is not None and r["vs_floor"] > 0
        if key != "full":
            assert r["vs_full"] is not None and r["vs_full"] > 0
        if key == "trainer-lora":
            assert r["reference"] == "bare loop" and r["vs_reference"] > 0 and r["bare_loop_ms"]["n"] == 2
            continue
        assert r["peak_memory_bytes"] > 0 and r["memory_error"] is None, (key, r["memory_error"])
        assert r["optimizer_state_bytes"] >= 0
    for ours, ref in PAIRS:
        assert rows[ours]["reference"] == ref and rows[ours]["vs_reference"] > 0
        assert rows[ours]["vs_reference_cpu"] > 0 and rows[ours]["peak_vs_reference"] > 0
    # eval, unmerged and merged where the method merges
    for key in ("lora", "peft-lora", "dora", "peft-dora", "adalora", "peft-adalora"):
        assert rows[key]["eval_ms"]["median"] > 0 and rows[key]["eval_merged_ms"]["median"] > 0
    assert rows["floor"]["eval_ms"]["median"] > 0 and rows["floor"]["eval_merged_ms"] is None
    assert rows["floor"]["trainable_params"] == 0 and rows["floor"]["optimizer_state_bytes"] == 0
    assert rows["full"]["trainable_params"] == rows["galore"]["trainable_params"]
    assert [(g["contender"], g["against"]) for g in report["goals"]] == [(c, a) for c, a, _ in bench.GOALS]


def check_ours_trains_what_the_reference_trains(report):
    """A real check, not a timing: same trainable tensors (names, shapes, counts) and the same warm-up loss."""
    rows = {r["key"]: r for r in report["rows"]}
    for ours, ref in PAIRS:
        r = rows[ours]
        assert r["same_trainable_tensors"] is True, ours
        assert r["trainable_params"] == r["trainable_params_reference"] == rows[ref]["trainable_params"], ours
        assert r["trainable_params"] > 0
        assert len(r["warmup_losses"]) == 1 and math.isfinite(r["warmup_losses"][0])
        assert r["warmup_loss_max_abs_diff"] <= 1e-4 * max(1.0, abs(r["warmup_losses"][0])), ours
    # LoRA and LoRA+ are the same model; DoRA adds one magnitude per output row of each target
    assert rows["lora"]["trainable_params"] == rows["lora_plus"]["trainable_params"]
    assert rows["dora"]["trainable_params"] > rows["lora"]["trainable_params"]
    assert rows["lora"]["optimizer_state_bytes"] == rows["peft-lora"]["optimizer_state_bytes"]
    assert rows["galore"]["optimizer_state_bytes"] == rows["galore-torch"]["optimizer_state_bytes"]
    assert rows["galore"]["optimizer_state_bytes"] < rows["full"]["optimizer_state_bytes"]


def check_header(report):
    h = report["header"]
    assert h["date"] and h["command"].startswith("python -m experiments.bench --workload tiny --quick")
    assert "git_commit" in h and isinstance(h["git_dirty"], list)
    m = h["machine"]
    assert m["cpu"] and m["cores"] >= 1 and m["threads"] == 1 and m["device"] == "cpu"
    assert set(h["versions"]) == {"python", "torch", "transformers", "peft", "galore-torch"}
    assert all(h["versions"].values())
    assert h["workload"]["name"] == "tiny" and h["workload"]["rank"] == 8
    assert h["protocol"]["rounds"] == 2 and h["protocol"]["repeats"] == 1


def check_markdown(report):
    md = report["_md"]
    assert md in report["_stdout"]  # stdout prints the table
    assert "| contender | step ms (median) | IQR | min–max | ours / ref" in md
    for label, *_ in bench.CONTENDERS.values():
        assert f"| {label} |" in md
    assert "Trainer overhead" in md and "| goal (step time)" in md
    both = bench.combined_markdown([report, report], ["a", "b"])  # --combine: runs side by side
    for label, *_ in bench.CONTENDERS.values():
        assert f"| {label} |" in both
    lora = next(line for line in both.splitlines() if line.startswith("| ours LoRA |"))
    assert lora.count(" / ") >= 4 and "| goal (step time) | a | b | met |" in both


def test_bad_flags():
    with pytest.raises(SystemExit):
        bench.parse(["--methods", "lora,nope"])
    with pytest.raises(SystemExit):
        bench.parse(["--rounds", "0"])
    args = bench.parse(["--methods", "trainer", "--quick"])
    assert bench.contender_keys(args.methods) == ["trainer-lora"]
    assert "head" not in bench.contender_keys(list(bench.METHODS), bench.WORKLOADS["smollm2"])
    assert args.rounds == 2 and args.repeats == 1 and not args.bf16
