"""LoRA and LoRA+ against peft: same weights -> same outputs, gradients, optimizer steps; peft loads our adapters."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.optimizers import create_loraplus_optimizer
from tiny import loss_of, mlp, mlp_batch, output_of, tiny_bert, tiny_llama, token_batch

import variants

TOL = dict(rtol=0, atol=1e-12)  # float64 throughout


def peft_key(name: str, heads=("classifier",)) -> str:
    """Our parameter name -> peft's (adapter 'default', heads in modules_to_save)."""
    name = re.sub(r"\.(lora_[AB])$", r".\1.default.weight", name)
    for h in heads:
        name = re.sub(rf"^{h}\.", f"{h}.modules_to_save.default.", name)
    return "base_model.model." + name


CASES = {
    "mlp": (lambda: mlp().double(), lambda: {k: (v.double() if v.is_floating_point() else v)
                                            for k, v in mlp_batch().items()},
            dict(targets="all-linear"), dict(target_modules=["0", "2", "4"])),
    "bert": (lambda: tiny_bert(dtype=torch.float64), lambda: token_batch(num_labels=3),
             dict(targets=["query", "value"]), dict(target_modules=["query", "value"],
                                                    modules_to_save=["classifier"])),
    "llama": (lambda: tiny_llama(dtype=torch.float64), lambda: token_batch(num_labels=None),
              dict(targets="all-linear", train_head=False), dict(target_modules="all-linear")),
}


def build_pair(case: str, name="lora", dropout=0.0, scaling="standard", **extra):
    """Our adapted model and peft's, holding identical (non-zero) adapter weights."""
    make, batch, ours_opts, peft_opts = CASES[case]
    base = make()
    v = variants.create(name, rank=4, alpha=8, dropout=dropout, scaling=scaling, **ours_opts, **extra)
    ours = v.apply(copy.deepcopy(base))
    ref = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                                         use_rslora=scaling == "rslora", **peft_opts))
    torch.manual_seed(123)
    with torch.no_grad():
        for _, layer in variants.lora.adapter_layers(ours):
            layer.lora_B.normal_(std=0.1)  # B = 0 at init would hide any mistake in the A path
        ref_params = dict(ref.named_parameters())
        for n, p in ours.named_parameters():
            if p.requires_grad:
                ref_params[peft_key(n)].copy_(p)
    return v, ours, ref, batch()


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("scaling", ["standard", "rslora"])
def test_lora_matches_peft_outputs_grads_and_steps(case, scaling):
    v, ours, ref, batch = build_pair(case, scaling=scaling)
    ours_trainable = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    ref_trainable = {n: p for n, p in ref.named_parameters() if p.requires_grad}
    assert sorted(peft_key(n) for n in ours_trainable) == sorted(ref_trainable)
    assert sum(p.numel() for p in ours_trainable.values()) == ref.get_nb_trainable_parameters()[0]

    torch.testing.assert_close(output_of(ours, batch), output_of(ref, batch), **TOL)
    loss_of(ours, batch).backward()
    loss_of(ref, batch).backward()
    for n, p in ours_trainable.items():
        torch.testing.assert_close(p.grad, ref_trainable[peft_key(n)].grad, **TOL)

    opt_ours = v.optimizer(ours, lr=1e-2)
    opt_ref = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    for _ in range(3):
        for model, opt in ((ours, opt_ours), (ref, opt_ref)):
            opt.zero_grad()
            loss_of(model, batch).backward()
            opt.step()
    for n, p in ours_trainable.items():
        torch.testing.assert_close(p, ref_trainable[peft_key(n)], **TOL)
    torch.testing.assert_close(output_of(ours, batch), output_of(ref, batch), **TOL)


def test_lora_dropout_matches_peft_in_train_mode():
    v, ours, ref, batch = build_pair("bert", dropout=0.3)
    ours.train(), ref.train()
    torch.manual_seed(7)
    out_ours = output_of(ours, batch)
    torch.manual_seed(7)
    out_ref = output_of(ref, batch)
    torch.testing.assert_close(out_ours, out_ref, **TOL)
    ours.eval()
    assert not torch.allclose(out_ours, output_of(ours, batch))  # dropout really was active


def _groups_by_name(model, groups, key=lambda n: n):
    names = {id(p): key(n) for n, p in model.named_parameters()}
    return {names[id(p)]: (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}


@pytest.mark.parametrize("case", ["bert", "llama"])
def test_loraplus_param_groups_match_peft(case):
    v, ours, ref, batch = build_pair(case, name="lora_plus", ratio=16)
    ours_groups = _groups_by_name(ours, v.param_groups(ours, lr=1e-3, weight_decay=0.01), key=peft_key)
    ref_opt = create_loraplus_optimizer(ref, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16,
                                        loraplus_weight_decay=0.01)
    assert ours_groups == _groups_by_name(ref, ref_opt.param_groups)
    lrs = {lr for lr, _ in ours_groups.values()}
    assert lrs == {1e-3, 16e-3}
    assert all(ours_groups[n][0] == 16e-3 for n in ours_groups if "lora_B" in n)
    assert all(ours_groups[n][0] == 1e-3 for n in ours_groups if "lora_A" in n)


def test_loraplus_steps_match_peft():
    v, ours, ref, batch = build_pair("bert", name="lora_plus", ratio=8)
    opt_ours = v.optimizer(ours, lr=1e-2, weight_decay=0.1)
    opt_ref = create_loraplus_optimizer(ref, torch.optim.AdamW, lr=1e-2, loraplus_lr_ratio=8,
                                        loraplus_weight_decay=0.1)
    for _ in range(3):
        for model, opt in ((ours, opt_ours), (ref, opt_ref)):
            opt.zero_grad()
            loss_of(model, batch).backward()
            opt.step()
    ref_params = dict(ref.named_parameters())
    for n, p in ours.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p, ref_params[peft_key(n)], **TOL)


@pytest.mark.parametrize("case", ["bert", "llama"])
def test_peft_loads_our_adapter(case, tmp_path):
    v, ours, _, batch = build_pair(case, scaling="rslora")
    opt = v.optimizer(ours, lr=1e-2)
    for _ in range(2):  # train a little so the head and both matrices differ from their init
        opt.zero_grad()
        loss_of(ours, batch).backward()
        opt.step()
    nbytes = v.save_adapter(ours, tmp_path)
    assert (tmp_path / "adapter_model.safetensors").exists() and nbytes == v.cost(ours)["adapter_bytes"]
    loaded = PeftModel.from_pretrained(CASES[case][0](), tmp_path).eval()
    torch.testing.assert_close(output_of(loaded, batch), output_of(ours, batch), **TOL)
