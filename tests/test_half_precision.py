"""A 16-bit base (bfloat16 / float16): the adapter's weights and computation stay float32, as peft's default
``autocast_adapter_dtype=True``; the base runs in its own dtype and the layer returns it.

In bfloat16 a small update rounds away: DoRA's magnitude did not move in 20 steps at lr 1e-4 when it took
the base's dtype. Parity with peft is checked norm-wise (relative error of outputs and gradients), since
two bfloat16 models that round in different places agree only to bfloat16 precision element by element.
"""

from __future__ import annotations

import copy

import pytest
import torch
from tiny import loss_of, output_of, tiny_bert, token_batch

import variants
from variants.lora import adapter_layers

peft = pytest.importorskip("peft")
METHODS = {"lora": {}, "dora": {}, "adalora": {"tinit": 1, "tfinal": 1}, "lora_plus": {}}


def _adapted(name, dtype, **more):
    model = tiny_bert().to(dtype)
    v = variants.create(name, rank=4, targets="all-linear", **METHODS[name], **more)
    return v, v.apply(model)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(METHODS))
def test_the_adapter_is_float32_on_a_16_bit_base_and_the_layer_returns_the_base_dtype(name, dtype):
    v, model = _adapted(name, dtype, dropout=0.1, train_head=False)  # a float16 head under AdamW: not our point
    adapters = {n: p for n, p in model.named_parameters() if p.requires_grad and "lora" in n}
    assert adapters and all(p.dtype == torch.float32 for p in adapters.values())
    assert all(p.dtype == dtype for n, p in model.named_parameters() if not p.requires_grad)
    batch = token_batch(seed=2)
    assert output_of(model, batch).dtype == dtype
    opt = v.optimizer(model, lr=1e-2)
    for step in range(3):
        loss_of(model, batch).backward()
        opt.step()
        v.after_step(model, step, 10)
        opt.zero_grad()
    model.eval()
    unmerged = output_of(model, batch)
    v.merge(model)
    # merged: ΔW rounded into the 16-bit weight, so equal to that precision (norm-wise)
    assert _rel(output_of(model, batch), unmerged) < 2e-2


def test_doras_magnitude_moves_on_a_bf16_base_at_a_small_lr():
    v, model = _adapted("dora", torch.bfloat16, dropout=0.0)
    before = {n: layer.lora_magnitude_vector.detach().clone() for n, layer in adapter_layers(model)}
    opt = v.optimizer(model, lr=1e-4)
    for step in range(20):
        loss_of(model, token_batch(seed=step)).backward()
        opt.step()
        opt.zero_grad()
    moved = [(layer.lora_magnitude_vector - before[n]).abs().max().item() for n, layer in adapter_layers(model)]
    assert min(moved) > 0, moved  # every layer's magnitude moved (in bf16, 1e-4 steps on values ~1 round to 0)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_a_bf16_base_agrees_with_peft_norm_wise(use_dora):
    """peft keeps the adapter in float32 on a bf16 base too; with the same weights copied in, outputs and
    gradients agree to bf16 precision (relative error of the whole tensor)."""
    v, ours = _adapted("dora" if use_dora else "lora", torch.bfloat16, dropout=0.0)
    with torch.no_grad():  # B != 0 so that every gradient is non-trivial
        for _, layer in adapter_layers(ours):
            layer.lora_B.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    cfg = v.peft_config(ours)
    pm = peft.get_peft_model(tiny_bert().to(torch.bfloat16), peft.LoraConfig(
        r=4, lora_alpha=v.cfg.alpha, lora_dropout=0.0, use_dora=use_dora, target_modules=cfg["target_modules"],
        modules_to_save=cfg["modules_to_save"]))
    peft.set_peft_model_state_dict(pm, copy.deepcopy(v.adapter_state(ours)))
    def peft_name(n: str) -> str:  # bert...value.lora_A -> base_model.model.bert...value.lora_A.default.weight
        return f"base_model.model.{n}.default.weight"

    pairs = [(n, p, pm.get_parameter(peft_name(n))) for n, p in ours.named_parameters()
             if p.requires_grad and "lora" in n]
    assert all(q.dtype == torch.float32 for _, _, q in pairs)
    batch = token_batch(seed=3)
    outs = [output_of(m, batch) for m in (ours, pm)]
    assert _rel(*outs) < 1e-2
    for m in (ours, pm):
        loss_of(m, batch).backward()
    worst = max(_rel(p.grad, q.grad) for _, p, q in pairs)
    assert worst < 5e-2, worst
