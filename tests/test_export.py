"""What we save, peft loads: for each model family, an adapter trained here (LoRA, DoRA; the head where it
trains) is loaded by ``PeftModel.from_pretrained`` onto the untouched base and gives our outputs, and peft's
own model for the same config trains exactly as many parameters as ours (``modules_to_save`` wraps exactly
the head we trained: DistilBERT's new ``pre_classifier`` included, since peft's suffix match takes it)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from test_targets import model as family_model

import variants
from variants.lora import LoRALinear, adapter_layers

CLASSIFIERS = ["bert", "roberta", "deberta-v2", "distilbert"]
CAUSAL = ["gpt2", "opt", "llama", "phi"]  # (the tiny Mistral/Qwen2 configs of test_targets do not run a forward)


def _inputs(family: str) -> dict:
    g = torch.Generator().manual_seed(3)
    if family == "vit":
        return {"pixel_values": torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)}
    ids = torch.randint(1, 100, (2, 7), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _trained(family: str, name: str):
    base = copy.deepcopy(family_model(family)).double()
    classifier = family in CLASSIFIERS or family == "vit"
    v = variants.create(name, rank=4, alpha=8, targets="all-linear", train_head=classifier)
    model = v.apply(copy.deepcopy(base))
    torch.manual_seed(1)
    with torch.no_grad():  # away from the init, head included
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return base, v, model.eval()


@pytest.mark.parametrize("name", ["lora", "dora"])
@pytest.mark.parametrize("family", [*CLASSIFIERS, *CAUSAL, "vit"])
def test_peft_loads_what_we_save_and_reproduces_our_outputs(family, name, tmp_path):
    base, v, ours = _trained(family, name)
    batch = _inputs(family)
    with torch.no_grad():
        out = ours(**batch).logits
    v.save_adapter(ours, tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, out, rtol=0, atol=1e-10)


@pytest.mark.parametrize("family", [*CLASSIFIERS, *CAUSAL, "vit"])
def test_peft_trains_as_many_parameters_for_the_saved_config(family, tmp_path):
    base, v, ours = _trained(family, "lora")
    v.save_adapter(ours, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    ref = get_peft_model(copy.deepcopy(base), LoraConfig(r=cfg["r"], lora_alpha=cfg["lora_alpha"],
                                                          target_modules=cfg["target_modules"],
                                                          modules_to_save=cfg["modules_to_save"],
                                                          fan_in_fan_out=cfg["fan_in_fan_out"]))
    assert v.cost(ours)["trainable_params"] == ref.get_nb_trainable_parameters()[0]


def test_distilbert_pre_classifier_is_part_of_the_head():
    """DistilBERT's classifier is pre_classifier + classifier, both new: it trains, and is never adapted."""
    base, v, ours = _trained("distilbert", "lora")
    assert not isinstance(ours.pre_classifier, LoRALinear) and ours.pre_classifier.weight.requires_grad
    assert "pre_classifier" not in {n for n, _ in adapter_layers(ours)}
    assert v.peft_config(ours)["modules_to_save"] == ["pre_classifier", "classifier"]
