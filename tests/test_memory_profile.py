"""``profile_memory=N``: step N runs under torch.profiler's memory timeline; the record's ``memory_profile``
says what the step's tensors hold at their peak and at most, by category. Checked against what the run
knows exactly (weights, optimizer state, gradients), and the run itself unchanged."""

from __future__ import annotations

from conftest import compose_config

from experiments import train

COMMON = ["optim.max_steps=3", "optim.grad_clip=0", "logger=none"]


def test_profiled_step_counts_the_weights_state_and_gradients_and_leaves_the_run_unchanged(tmp_path):
    plain = train.run(compose_config("variant=full", *COMMON, results_dir=tmp_path / "a"))
    rec = train.run(compose_config("variant=full", *COMMON, "profile_memory=2", results_dir=tmp_path / "b"))
    assert rec["status"] == plain["status"] == "ok"
    assert rec["run_id"] == plain["run_id"]  # watching a step does not change the run
    assert rec["metrics"] == plain["metrics"]
    assert [h["loss"] for h in rec["history"]] == [h["loss"] for h in plain["history"]]
    assert "memory_profile" not in plain and plain["cost"]["tensor_peak_bytes"] is None
    mp, cost = rec["memory_profile"], rec["cost"]
    assert mp["step"] == 2 and cost["tensor_peak_bytes"] == mp["peak_bytes"] == sum(mp["at_peak"].values())
    assert mp["max"]["parameter"] == cost["weight_bytes"]  # full FT: every weight, all of it trained
    assert mp["max"]["optimizer_state"] == cost["optimizer_state_bytes"]  # AdamW's two moments, from step 1 on
    assert mp["max"]["gradient"] == cost["gradient_bytes"]  # every gradient alive before the step
    assert mp["peak_bytes"] >= cost["weight_bytes"] + cost["optimizer_state_bytes"]


def test_layerwise_galore_never_holds_all_gradients_in_the_profiled_step(tmp_path):
    common = ["task=digits", "variant=galore", "variant.rank=4", *COMMON, "profile_memory=2"]
    plain = train.run(compose_config(*common, results_dir=tmp_path / "a"))
    layerwise = train.run(compose_config(*common, "variant.layerwise=true", results_dir=tmp_path / "b"))
    most = {k: r["memory_profile"]["max"]["gradient"] for k, r in (("plain", plain), ("layerwise", layerwise))}
    assert most["plain"] == plain["cost"]["gradient_bytes"] > 0
    assert 0 < most["layerwise"] < most["plain"], most
    assert layerwise["memory_profile"]["max"]["optimizer_state"] == plain["memory_profile"]["max"]["optimizer_state"]
