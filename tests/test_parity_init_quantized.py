"""OLoRA and PiSSA initialisation, and a quantized (QLoRA, NF4) base, against peft.

OLoRA / PiSSA: peft's ``init_lora_weights`` ("olora", "pissa", "pissa_niter_<k>") and ours give the same
adapter, the same residual base weight and the same steps; the model starts at W0; the saved adapter is the
standard LoRA update of the *original* W0 (rank 2r), which peft loads onto the untouched base.
QLoRA: our LoRA and DoRA on a bitsandbytes NF4 base equal peft's on the same base (CPU: bitsandbytes 0.50)."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from test_parity_gpt2 import _copy_into_ref, peft_key
from tiny import loss_of, output_of, tiny_bert, tiny_llama, token_batch

import variants
from experiments.hub import Loading
from variants.lora import LoRALinear, adapter_layers

F32 = dict(rtol=1e-5, atol=1e-5)  # peft initialises OLoRA / PiSSA in float32 only
INITS = ["olora", "pissa", "pissa_niter_4"]


def _principal_pair(init: str, use_dora: bool = False):
    base = tiny_bert()
    name = "dora" if use_dora else "lora"
    v = variants.create(name, rank=4, alpha=8, dropout=0.0, init=init, targets=["query", "value"])
    torch.manual_seed(7)  # pissa_niter_k draws a random sketch: the same one on both sides
    ours = v.apply(copy.deepcopy(base))
    torch.manual_seed(7)
    ref = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, init_lora_weights=init,
                                                         target_modules=["query", "value"], use_dora=use_dora,
                                                         modules_to_save=["classifier"]))
    return base, v, ours, ref


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("init", INITS)
def test_principal_init_matches_peft_and_starts_at_the_base(init, use_dora):
    base, v, ours, ref = _principal_pair(init, use_dora)
    batch = token_batch(num_labels=3)
    torch.testing.assert_close(output_of(ours, batch), output_of(base, batch), **F32)  # W_res + s·B0A0 = W0
    ref_params = dict(ref.named_parameters())
    for name, layer in adapter_layers(ours, LoRALinear):
        prefix = f"base_model.model.{name}"
        ref_a, ref_b = ref_params[f"{prefix}.lora_A.default.weight"], ref_params[f"{prefix}.lora_B.default.weight"]
        if init.startswith("pissa_niter"):
            # a randomised SVD: peft draws its sketch after nn.Linear's own init has moved the generator, so
            # the two sketches differ, and on these random weights (a flat spectrum) 4 iterations do not
            # converge to one subspace; what must hold is the start at W0 (above) and the saved adapter (below)
            continue
        torch.testing.assert_close(layer.lora_A, ref_a, **F32)
        torch.testing.assert_close(layer.lora_B, ref_b, **F32)
        torch.testing.assert_close(layer.base_layer.weight, ref_params[f"{prefix}.base_layer.weight"], **F32)
        if use_dora:
            torch.testing.assert_close(layer.lora_magnitude_vector,
                                       ref_params[f"{prefix}.lora_magnitude_vector.default.weight"], **F32)
    if init != "pissa_niter_4":  # A/B equal: then the steps are peft's too
        opt_ours = v.optimizer(ours, lr=1e-3)
        opt_ref = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
        for _ in range(3):
            for model, opt in ((ours, opt_ours), (ref, opt_ref)):
                opt.zero_grad()
                loss_of(model, batch).backward()
                opt.step()
        torch.testing.assert_close(output_of(ours, batch), output_of(ref, batch), **F32)


@pytest.mark.parametrize("init", INITS)
def test_principal_adapter_is_saved_as_lora_of_the_original_base(init, tmp_path):
    base, v, ours, _ = _principal_pair(init)
    batch = token_batch(num_labels=3)
    opt = v.optimizer(ours, lr=1e-3)
    for _ in range(3):
        opt.zero_grad()
        loss_of(ours, batch).backward()
        opt.step()
    out = output_of(ours.eval(), batch)
    v.save_adapter(ours, tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()  # the untouched W0
    assert loaded.peft_config["default"].r == 8
    torch.testing.assert_close(output_of(loaded, batch), out, **F32)
    v.merge(ours)  # into the residual: W_res + s·BA = W0 + s·(BA - B0A0)
    torch.testing.assert_close(output_of(ours, batch), out, **F32)


def test_principal_init_errors_in_one_line():
    with pytest.raises(variants.VariantError, match="invalid option init='pissa_niter_x'"):
        variants.create("lora", init="pissa_niter_x")
    with pytest.raises(variants.VariantError, match="OLoRA/PiSSA apply to Linear layers"):
        variants.create("lora", init="pissa", targets=["word_embeddings"]).apply(tiny_bert())


# --- a quantized base ---------------------------------------------------------------------------------

def _nf4(path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=q, device_map="cpu")
    # bitsandbytes 0.50 repacks a 4-bit weight for its AVX512-BF16 CPU kernel on the first no-grad eval
    # forward, assuming in_features is a multiple of the 64-wide block; the tiny model's 32 is not, so on such
    # a CPU that forward fails inside bitsandbytes. Both sides keep the plain dequantize path, as a run's
    # model does: the product's own Loading.prepare switches the repacking off.
    return Loading(quantize="nf4").prepare(model)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    pytest.importorskip("bitsandbytes")
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(path)
    return path


@pytest.mark.parametrize("name", ["lora", "dora"])
def test_qlora_matches_peft_on_the_same_nf4_base(name, llama_dir):
    targets = ["q_proj", "v_proj", "down_proj"]
    v = variants.create(name, rank=4, alpha=8, dropout=0.0, targets=targets, train_head=False)
    ours = v.apply(_nf4(llama_dir))
    ref = get_peft_model(_nf4(llama_dir), LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                      use_dora=name == "dora"))
    layer = ours.model.layers[0].self_attn.q_proj
    assert layer.quantized == "4bit" and layer.lora_A.dtype == torch.float32
    torch.manual_seed(0)
    with torch.no_grad():
        for _, m in adapter_layers(ours, LoRALinear):
            m.lora_B.normal_(std=0.1)
    _copy_into_ref(ours, ref)
    batch = token_batch(num_labels=None)
    torch.testing.assert_close(output_of(ours, batch), output_of(ref, batch), rtol=1e-5, atol=1e-5)
    frozen = {n: p.detach().clone() for n, p in ours.named_parameters() if not p.requires_grad}
    opt_ours = v.optimizer(ours, lr=1e-2)
    opt_ref = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    for _ in range(3):
        for model, opt in ((ours, opt_ours), (ref, opt_ref)):
            opt.zero_grad()
            loss_of(model, batch).backward()
            opt.step()
    ref_params = dict(ref.named_parameters())
    for n, p in ours.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p, ref_params[peft_key(n)], rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(p, frozen[n]), f"frozen {n} changed"
    with pytest.raises(variants.VariantError, match="cannot merge into a 4bit quantized base"):
        v.merge(ours)


def test_a_quantized_base_is_counted_by_its_storage(llama_dir):
    from transformers import AutoModelForCausalLM

    v32 = variants.create("lora", rank=4, targets=["q_proj", "v_proj"], train_head=False)
    full = v32.cost(v32.apply(AutoModelForCausalLM.from_pretrained(llama_dir)))
    v4 = variants.create("lora", rank=4, targets=["q_proj", "v_proj"], train_head=False)
    quantized = v4.cost(v4.apply(_nf4(llama_dir)))
    assert quantized["trainable_params"] == full["trainable_params"]
    assert quantized["weight_bytes"] < 0.7 * full["weight_bytes"]  # linear weights at 4 bits, embeddings float


def test_parameter_counts_unpack_4bit_weights(llama_dir):
    from transformers import AutoModelForCausalLM

    full = variants.create("lora", rank=4, targets=["q_proj"], train_head=False)
    quantized = variants.create("lora", rank=4, targets=["q_proj"], train_head=False)
    a = full.cost(full.apply(AutoModelForCausalLM.from_pretrained(llama_dir)))
    b = quantized.cost(quantized.apply(_nf4(llama_dir)))
    assert (b["base_params"], b["total_params"]) == (a["base_params"], a["total_params"])
    assert b["trainable_pct"] == pytest.approx(a["trainable_pct"])


@pytest.mark.parametrize("name", ["full", "galore"])
def test_full_parameter_methods_refuse_a_quantized_base_in_one_line(name, llama_dir):
    with pytest.raises(variants.VariantError, match=f"variant '{name}' trains every weight, and .* is quantized"):
        variants.create(name, train_head=False).apply(_nf4(llama_dir))
