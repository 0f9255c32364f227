"""Invariants every variant must keep, on every tiny model: starts at the base model, exact trainable-parameter
counts, frozen weights untouched by training, merge == unmerged forward."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny import MODELS, loss_of, mlp, output_of
from torch import nn

import variants

ALL = variants.available()
LOW_RANK = {"lora", "lora_plus", "dora", "adalora"}
RANK = 2


def adapt(name: str, model_name: str):
    make, batch, opts = MODELS[model_name]
    base = make()
    if name in ("full", "head"):
        opts = {k: v for k, v in opts.items() if k == "train_head"}
    else:
        opts = {**opts, "rank": RANK}
    if model_name == "llama" and name == "head":
        opts["train_head"] = True  # a linear probe of the LM head
    if model_name == "mlp" and name == "head":
        opts["head"] = ["4"]  # the MLP's last layer plays the head
    v = variants.create(name, **opts)
    return base, v, v.apply(copy.deepcopy(base)), batch()


def linear_shapes(model: nn.Module, names):
    return [(model.get_submodule(n).in_features, model.get_submodule(n).out_features) for n in names]


def expected_trainable(name: str, v, base: nn.Module) -> int:
    """Each method's parameter count from its definition, computed on the *base* model."""
    heads = variants.targets.head_module_names(base, v.cfg.heads) if v.cfg.trains_head else []
    head = sum(p.numel() for h in heads for p in base.get_submodule(h).parameters())
    if name in ("full", "galore"):
        return sum(p.numel() for p in base.parameters())
    if name == "head":
        return head
    shapes = linear_shapes(base, v.target_names(base))
    if name in ("lora", "lora_plus"):
        return head + sum(RANK * (i + o) for i, o in shapes)  # A: r x in, B: out x r
    if name == "dora":
        return head + sum(RANK * (i + o) + o for i, o in shapes)  # + magnitude m (out)
    if name == "adalora":
        r = v.cfg.initial_rank
        return head + sum(r * (i + o) + r for i, o in shapes)  # P, Q and Λ at the initial rank
    # peft's methods (variants/peft_method.py): the head trains as peft's modules_to_save copy, same size
    if name in ("peft", "peft_lora"):  # variant=peft runs peft's LoRA by default
        return head + sum(RANK * (i + o) for i, o in shapes)
    if name == "peft_dora":
        return head + sum(RANK * (i + o) + o for i, o in shapes)  # + magnitude m (out)
    if name == "peft_lora_fa":
        return head + sum(RANK * o for i, o in shapes)  # B only: A stays frozen at its init (LoRA-FA)
    if name == "peft_vera":
        return head + sum(o + RANK for i, o in shapes)  # λ_b (out), λ_d (r); the shared A, B are frozen buffers
    if name == "peft_miss":
        return head + sum(RANK * o for i, o in shapes)  # one r x out shard per layer, shared by the d_in/r blocks
    raise AssertionError(f"no expectation written for variant {name}")


def test_issue_example_rank1_lora_on_mnist_mlp():
    base = mlp()
    v = variants.create("lora", rank=1, targets="all-linear")
    cost = v.cost(v.apply(base))
    assert (cost["trainable_params"], cost["base_params"]) == (6794, 2_807_010)
    assert round(cost["trainable_pct"], 3) == 0.242


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("name", ALL)
def test_starts_at_base_and_counts_exact(name, model_name):
    base, v, model, batch = adapt(name, model_name)
    torch.testing.assert_close(output_of(model, batch), output_of(base, batch), rtol=1e-6, atol=1e-6)
    assert v.cost(model)["trainable_params"] == expected_trainable(name, v, base)
    assert v.cost(model)["base_params"] == sum(p.numel() for p in base.parameters())


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("name", ALL)
def test_training_moves_trainable_only(name, model_name):
    base, v, model, batch = adapt(name, model_name)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    opt = v.optimizer(model, lr=1e-2)
    model.train()
    total = 10
    for step in range(4):  # B (or Λ) leaves zero first; A moves from the second step on
        loss = loss_of(model, batch) + v.extra_loss(model)
        loss.backward()
        opt.step()
        v.after_step(model, step, total)
        opt.zero_grad()
    assert trainable, "nothing to train"
    for n, p in model.named_parameters():
        if n in trainable:
            assert not torch.equal(p, before[n]), f"{n} did not change"
        else:
            assert torch.equal(p, before[n]), f"frozen {n} changed"
    assert v.cost(model, opt)["optimizer_state_bytes"] > 0


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("name", [n for n in ALL if variants.get(n).mergeable])
def test_merge_equals_unmerged_and_unmerge_restores(name, model_name):
    base, v, model, batch = adapt(name, model_name)
    model.eval()  # merging is for inference: adapter dropout (0.05 by default) is off
    torch.manual_seed(0)
    with torch.no_grad():  # move every adapter parameter away from its init
        for n, p in model.named_parameters():
            if p.requires_grad and "base_layer" not in n:
                p.add_(0.05 * torch.randn_like(p))
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    unmerged = output_of(model, batch)
    v.merge(model)
    assert any(not torch.equal(p, weights[n]) for n, p in model.named_parameters() if n in weights)
    torch.testing.assert_close(output_of(model, batch), unmerged, rtol=1e-5, atol=1e-5)
    v.unmerge(model)
    for n, p in model.named_parameters():
        if n in weights:
            torch.testing.assert_close(p, weights[n], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(output_of(model, batch), unmerged, rtol=1e-5, atol=1e-5)


def test_every_low_rank_variant_is_registered():
    assert LOW_RANK | {"galore", "full", "head"} <= set(ALL)


# ------------------------------------------------------------------- evaluation on merged weights


@pytest.mark.parametrize("variant", ["lora", "dora", "adalora", "lora_plus", "full"])
def test_eval_merged_gives_the_same_metrics_and_leaves_training_untouched(variant, tmp_path):
    """``eval_merged=true``: every evaluation (mid-run and final) on merged weights; the metrics equal the
    unmerged evaluation's within float rounding, and since the frozen weights are restored exactly after
    each one, the training trajectory (every loss) is bit for bit the same. ``full`` has nothing to merge:
    it evaluates as usual and its record says so."""
    from conftest import compose_config

    from experiments import train

    common = [f"variant={variant}", "task=digits", "optim.max_steps=20", "optim.eval_every=5", "logger=none"]
    plain = train.run(compose_config(*common, results_dir=tmp_path / "a"))
    merged = train.run(compose_config(*common, "eval_merged=true", results_dir=tmp_path / "b"))
    assert merged["run_id"] == plain["run_id"] and merged["eval_merged"] is (variant != "full")
    assert plain["eval_merged"] is False
    assert [h["loss"] for h in merged["history"]] == [h["loss"] for h in plain["history"]]
    for split in ("val", "test"):
        for k, v in plain["metrics"][split].items():
            assert merged["metrics"][split][k] == pytest.approx(v, rel=1e-5, abs=1e-6), (split, k)


@pytest.mark.slow  # inductor compiles for tens of seconds on 2 cores
@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_compile_trains_the_same_model_within_float_rounding(variant, tmp_path):
    from conftest import compose_config

    from experiments import train

    common = [f"variant={variant}", "task=digits", "optim.max_steps=10", "optim.eval_every=5", "logger=none"]
    eager = train.run(compose_config(*common, results_dir=tmp_path / "a"))
    compiled = train.run(compose_config(*common, "compile=true", results_dir=tmp_path / "b"))
    assert compiled["status"] == "ok", compiled["error"]
    assert compiled["config"]["compile"] is True and compiled["run_id"] == eager["run_id"]
    assert [h["loss"] for h in compiled["history"]] == pytest.approx([h["loss"] for h in eager["history"]], rel=1e-4)
