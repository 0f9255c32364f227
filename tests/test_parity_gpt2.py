"""Layer types beyond nn.Linear, against peft in float64: transformers Conv1D (GPT-2, weights stored in x out)
for LoRA, LoRA+, DoRA, AdaLoRA and GaLore, and nn.Embedding for LoRA. Same weights -> same outputs,
gradients and optimizer steps; merge == unmerged; peft loads what we save and reproduces our outputs."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from peft import AdaLoraConfig, LoraConfig, PeftModel, get_peft_model
from peft.optimizers import create_loraplus_optimizer
from tiny import loss_of, output_of, tiny_bert, tiny_gpt2, token_batch

import variants
from variants.lora import LoRAEmbedding, LoRALinear, adapter_layers

TOL = dict(rtol=0, atol=1e-12)
CONV1D = ["c_attn", "c_proj", "c_fc"]  # every Conv1D of GPT-2 (attn.c_proj and mlp.c_proj share a suffix)


def peft_key(name: str, heads=("score", "classifier"), adalora: bool = False) -> str:
    """Our parameter name -> peft's: nn.Linear sub-modules (``lora_A.default.weight``) for LoRA/DoRA,
    ParameterDicts (``lora_A.default``) for AdaLoRA and embeddings; heads under modules_to_save."""
    if adalora:
        name = re.sub(r"\.(lora_[ABE])$", r".\1.default", name)
    else:
        name = re.sub(r"\.(lora_[AB]|lora_magnitude_vector)$", r".\1.default.weight", name)
    name = re.sub(r"\.(lora_embedding_[AB])$", r".\1.default", name)
    for h in heads:
        name = re.sub(rf"^{h}\.", f"{h}.modules_to_save.default.", name)
    return "base_model.model." + name


def _nonzero_b(model, seed=123):
    torch.manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapter_layers(model, (LoRALinear, LoRAEmbedding)):
            if isinstance(layer, LoRAEmbedding):
                layer.lora_embedding_A.normal_(std=0.1)  # A = 0 at init for embeddings
            elif hasattr(layer, "lora_E"):
                layer.lora_E.normal_(std=0.1)  # AdaLoRA: Λ = 0 at init
            else:
                layer.lora_B.normal_(std=0.1)


def _copy_into_ref(ours, ref, adalora: bool = False):
    ref_params = dict(ref.named_parameters())
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if p.requires_grad:
                ref_params[peft_key(n, adalora=adalora)].copy_(p)


def _pair(name, base, peft_cfg, **options):
    v = variants.create(name, rank=4, alpha=8, dropout=0.0, **options)
    ours = v.apply(copy.deepcopy(base))
    ref = get_peft_model(copy.deepcopy(base), peft_cfg)
    _nonzero_b(ours)
    _copy_into_ref(ours, ref)
    return v, ours, ref


def _same_steps(v, ours, ref, batch, opt_ref, steps=3):
    ours_trainable = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    ref_trainable = {n: p for n, p in ref.named_parameters() if p.requires_grad}
    assert sorted(peft_key(n) for n in ours_trainable) == sorted(ref_trainable)
    torch.testing.assert_close(output_of(ours, batch), output_of(ref, batch), **TOL)
    loss_of(ours, batch).backward()
    loss_of(ref, batch).backward()
    for n, p in ours_trainable.items():
        torch.testing.assert_close(p.grad, ref_trainable[peft_key(n)].grad, **TOL)
    opt = v.optimizer(ours, lr=1e-2)
    for _ in range(steps):
        for model, o in ((ours, opt), (ref, opt_ref)):
            o.zero_grad()
            loss_of(model, batch).backward()
            o.step()
    for n, p in ours_trainable.items():
        torch.testing.assert_close(p, ref_trainable[peft_key(n)], **TOL)
    torch.testing.assert_close(output_of(ours, batch), output_of(ref, batch), **TOL)


def _peft_loads_and_merge_equals_unmerged(v, ours, base, batch, tmp_path) -> torch.Tensor:
    """peft loads the saved adapter onto the untouched base and gives our outputs; merging keeps them."""
    out = output_of(ours, batch)
    v.save_adapter(ours, tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    torch.testing.assert_close(output_of(loaded, batch), out, **TOL)
    v.merge(ours)
    torch.testing.assert_close(output_of(ours, batch), out, rtol=0, atol=1e-10)
    return out


def _adamw(ref):
    return torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)


@pytest.mark.parametrize("name", ["lora", "dora"])
def test_conv1d_lora_and_dora_match_peft(name):
    base = tiny_gpt2(dtype=torch.float64)
    v, ours, ref = _pair(name, base, LoraConfig(r=4, lora_alpha=8, target_modules=CONV1D, fan_in_fan_out=True,
                                                use_dora=name == "dora"), targets=CONV1D, train_head=False)
    layer = ours.transformer.h[0].attn.c_attn
    assert layer.fan_in_fan_out and layer.lora_A.shape == (4, 32) and layer.lora_B.shape == (96, 4)
    _same_steps(v, ours, ref, token_batch(num_labels=None), _adamw(ref))


def test_conv1d_lora_plus_matches_peft():
    base = tiny_gpt2(dtype=torch.float64)
    v, ours, ref = _pair("lora_plus", base, LoraConfig(r=4, lora_alpha=8, target_modules=CONV1D,
                                                       fan_in_fan_out=True), targets=CONV1D, train_head=False)
    opt_ref = create_loraplus_optimizer(ref, torch.optim.AdamW, lr=1e-2, loraplus_lr_ratio=16.0, weight_decay=0.0)
    _same_steps(v, ours, ref, token_batch(num_labels=None), opt_ref)


def test_conv1d_adalora_matches_peft_outputs_gradients_and_penalty():
    base = tiny_gpt2(dtype=torch.float64)
    v = variants.create("adalora", rank=2, init_r=4, alpha=8, dropout=0.0, targets=CONV1D, train_head=False)
    ours = v.apply(copy.deepcopy(base))
    ref = get_peft_model(copy.deepcopy(base), AdaLoraConfig(init_r=4, target_r=2, lora_alpha=8, total_step=10,
                                                            target_modules=CONV1D, fan_in_fan_out=True,
                                                            task_type="CAUSAL_LM"))  # its forward adds the penalty
    for n, p in ref.named_parameters():
        if ".ranknum." in n:
            p.requires_grad_(False)
    _nonzero_b(ours)
    _copy_into_ref(ours, ref, adalora=True)
    batch = token_batch(num_labels=None)
    torch.testing.assert_close(output_of(ours, batch), output_of(ref, batch), **TOL)
    ours_loss = loss_of(ours, batch) + v.extra_loss(ours)
    ref_loss = ref(**batch).loss  # peft's AdaLoraModel.forward adds the orthogonality penalty itself
    # transformers computes the causal-LM loss in float32 (it upcasts the logits to float, not to float64),
    # and peft adds the penalty into that float32 loss in place
    torch.testing.assert_close(ours_loss.float(), ref_loss, rtol=0, atol=1e-6)
    ours_loss.backward()
    ref_loss.backward()
    ref_params = dict(ref.named_parameters())
    for n, p in ours.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, ref_params[peft_key(n, adalora=True)].grad, **TOL)


def test_conv1d_galore_matches_galore_torch():
    galore_torch = pytest.importorskip("galore_torch")
    model = tiny_gpt2(dtype=torch.float64)
    v = variants.create("galore", rank=4, targets=CONV1D, update_proj_gap=2)
    v.apply(model)
    assert len(v.target_modules) == 8  # c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj in 2 layers
    ref_model = copy.deepcopy(model)
    opt = v.optimizer(model, lr=1e-3)
    by_id = dict(zip([id(p) for p in model.parameters()], ref_model.parameters(), strict=True))
    ref = galore_torch.GaLoreAdamW([{**{k: x for k, x in g.items() if k != "params"},
                                     "params": [by_id[id(p)] for p in g["params"]]} for g in opt.param_groups],
                                   lr=1e-3, no_deprecation_warning=True)
    for step in range(5):
        batch = token_batch(num_labels=None, seed=10 + step)
        for m, o in ((model, opt), (ref_model, ref)):
            loss_of(m, batch).backward()
            o.step()
            o.zero_grad()
    diff = max((p - q).abs().max().item() for p, q in zip(model.parameters(), ref_model.parameters(), strict=True))
    assert diff <= 1e-12


@pytest.mark.parametrize("name", ["lora", "dora"])
def test_conv1d_merge_equals_unmerged_and_peft_loads_the_adapter(name, tmp_path):
    base = tiny_gpt2(dtype=torch.float64, num_labels=3)
    v = variants.create(name, rank=4, alpha=8, targets=CONV1D, head=("score",))
    ours = v.apply(copy.deepcopy(base)).eval()
    _nonzero_b(ours)
    batch = token_batch(num_labels=3)
    out = _peft_loads_and_merge_equals_unmerged(v, ours, base, batch, tmp_path)
    v.unmerge(ours)
    torch.testing.assert_close(output_of(ours, batch), out, rtol=0, atol=1e-10)


# --- nn.Embedding -----------------------------------------------------------------------------------

EMBED = ["word_embeddings", "query", "value"]


def test_embedding_lora_matches_peft_and_is_saved_in_its_layout(tmp_path):
    base = tiny_bert(dtype=torch.float64)
    v, ours, ref = _pair("lora", base, LoraConfig(r=4, lora_alpha=8, target_modules=EMBED,
                                                  modules_to_save=["classifier"]), targets=EMBED)
    layer = ours.bert.embeddings.word_embeddings
    assert isinstance(layer, LoRAEmbedding) and layer.lora_embedding_A.shape == (4, 99)
    batch = token_batch(num_labels=3)
    _same_steps(v, ours, ref, batch, _adamw(ref))
    _peft_loads_and_merge_equals_unmerged(v, ours.eval(), base, batch, tmp_path)


def test_embedding_count_and_init_start_at_the_base():
    base = tiny_bert()
    v = variants.create("lora", rank=4, targets=["word_embeddings"])
    model = v.apply(copy.deepcopy(base))
    batch = token_batch(num_labels=3)
    torch.testing.assert_close(output_of(model, batch), output_of(base, batch), rtol=0, atol=0)
    head = sum(p.numel() for p in base.classifier.parameters())
    assert v.cost(model)["trainable_params"] == head + 4 * (99 + 32)


@pytest.mark.parametrize("name", ["dora", "lora_plus", "adalora"])
def test_embedding_targets_are_lora_only(name):
    with pytest.raises(variants.VariantError, match="cannot adapt an nn.Embedding"):
        variants.create(name, rank=2, targets=["word_embeddings"]).apply(tiny_bert())


def test_conv1d_adalora_adapter_loads_in_peft(tmp_path):
    base = tiny_gpt2(dtype=torch.float64)
    v = variants.create("adalora", rank=2, init_r=4, alpha=8, targets=CONV1D, train_head=False)
    ours = v.apply(copy.deepcopy(base)).eval()
    _nonzero_b(ours)
    batch = token_batch(num_labels=None)
    out = output_of(ours, batch)
    v.save_adapter(ours, tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    torch.testing.assert_close(output_of(loaded, batch), out, **TOL)


# --- the command line: a tiny GPT-2 saved by the test, on a local JSONL data set ------------------------

def test_gpt2_trains_end_to_end_from_the_cli_with_lora_dora_and_galore(tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from test_custom_data import word_tokenizer, write_documents
    from transformers import GPT2Config, GPT2LMHeadModel

    docs = write_documents(tmp_path / "docs.jsonl")
    tok = word_tokenizer([json.loads(line)["body"] for line in docs.read_text().splitlines()])
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=64,
                               bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id)).save_pretrained(tmp_path / "tiny-gpt2")
    tok.save_pretrained(tmp_path / "tiny-gpt2")
    env = {**os.environ, "WANDB_MODE": "disabled", "LORABENCH_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "LORABENCH_CACHE": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-m", "experiments.train", "-m", "task=lm_file", f"task.data={docs}",
                          "task.text_column=body", f"task.model={tmp_path / 'tiny-gpt2'}", "task.seq_len=16",
                          "variant=lora,dora,galore", "variant.targets=all-linear", "optim.max_steps=3",
                          "optim.batch_size=4", "logger=none", f"results_dir={tmp_path / 'results'}"],
                         capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[1], timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    runs = [json.loads(p.read_text()) for p in (tmp_path / "results" / "runs").glob("*.json")]
    assert sorted(r["variant"] for r in runs) == ["dora", "galore", "lora"]
    for r in runs:
        assert r["status"] == "ok" and r["model"] == "tiny-gpt2", r.get("error")
        assert len(r["targets"]) == 8 and any(t.endswith("attn.c_attn") for t in r["targets"])  # the Conv1Ds
