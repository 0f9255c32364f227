"""A quantized frozen base (``model.quantize``) and gradient checkpointing, on a CPU: bitsandbytes 4-bit
(nf4, fp4) and int8 layers under LoRA, the record's task_info and weight bytes, and the one-line errors.

The models are tiny and saved to tmp_path (test_custom_data's helpers); nothing is downloaded.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import compose_config
from test_custom_data import files, lm_overrides, text_overrides  # noqa: F401  (files: the module fixture)

from experiments import records
from experiments.hub import Loading, weight_storage
from experiments.train import ConfigError, build, run
from experiments.trainer import OptimConfig, fit

pytest.importorskip("bitsandbytes")

FAST = ["optim.max_steps=3", "optim.batch_size=2", "optim.lr=1e-2", "optim.warmup_ratio=0"]


def config(tmp_path, task, *overrides) -> dict:
    return compose_config("logger=none", *overrides, task=task, results_dir=tmp_path / "results",
                          cache_dir=tmp_path / "cache")


def lm(files, tmp_path, *more):  # noqa: F811
    return config(tmp_path, "lm_file", *lm_overrides(files, *FAST, *more))


def quantized_linears(model, kind="Linear4bit"):
    return {n: m for n, m in model.named_modules() if type(m).__name__ == kind}


def test_nf4_base_loads_trains_with_lora_and_stays_packed_and_untouched(files, tmp_path):  # noqa: F811
    cfg = lm(files, tmp_path, "model.quantize=nf4")
    task, variant, model = build(cfg)
    layers = quantized_linears(model)
    assert len(layers) == 2 * 7  # every Linear of the 2 blocks (q, k, v, o, gate, up, down); lm_head is not
    assert type(model.lm_head).__name__ == "Linear" and model.lm_head.weight.dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.float32
    q = model.model.layers[0].self_attn.q_proj
    assert type(q).__name__ == "LoRALinear" and type(q.base_layer).__name__ == "Linear4bit"
    w = q.base_layer.weight
    assert type(w).__name__ == "Params4bit" and w.dtype == torch.uint8 and w.quant_state.quant_type == "nf4"
    assert w.numel() * w.element_size() == 64 * 64 // 2  # two 4-bit values per byte
    # never repacked for bitsandbytes' AVX512-BF16 inference kernel (not differentiable in its input)
    assert not any(m.support_avx512bf16_for_cpu for m in layers.values())
    before = {n: m.weight.detach().clone() for n, m in layers.items()}
    lora_before = q.lora_B.detach().clone()

    optim = OptimConfig(**{**cfg["optim"], "max_steps": 3})
    result = fit(model, variant, task, optim, seed=0, device="cpu", progress=False)
    assert all(math.isfinite(h["loss"]) for h in result["history"])
    assert not torch.equal(q.lora_B.detach(), lora_before)  # the adapter trained
    for name, layer in quantized_linears(model).items():  # the base did not, and stayed 4-bit
        assert type(layer.weight).__name__ == "Params4bit" and not layer.weight.requires_grad, name
        assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False), name
        assert torch.equal(layer.weight.detach(), before[name]), name
    assert result["cost"]["trainable_params"] == 2 * 8 * ((64 + 64) + (64 + 32))  # r(in+out) on q and v


def test_the_record_names_the_quantization_and_the_weights_shrink(files, tmp_path):  # noqa: F811
    plain = run(lm(files, tmp_path / "none"))
    nf4 = run(lm(files, tmp_path / "nf4", "model.quantize=nf4"))
    assert plain["status"] == nf4["status"] == "ok", (plain["error"], nf4["error"])
    info, base = nf4["task_info"], plain["task_info"]
    assert base["quantize"] == "none" and base["weight_bytes"] == base["weight_bytes_fp32"]
    assert info["quantize"] == "nf4" and info["double_quant"] is True and info["compute_dtype"] == "float32"
    assert info["quantized_modules"] == 14 and info["params"] == base["params"]  # the same weights, stored smaller
    linear = 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128)  # q, o; k, v (2 kv heads); gate, up, down
    assert info["weight_bytes_fp32"] == base["weight_bytes_fp32"] == 4 * base["params"]
    assert info["weight_bytes"] == base["weight_bytes"] - 4 * linear + linear // 2  # packed: 2 weights a byte
    # the variant's cost column is computed from parameter storage: it shows the saving too
    assert nf4["cost"]["weight_bytes"] - plain["cost"]["weight_bytes"] == info["weight_bytes"] - base["weight_bytes"]
    assert nf4["task_info"]["model_fingerprint"] != plain["task_info"]["model_fingerprint"]  # another base
    assert nf4["run_id"] != plain["run_id"] and nf4["config"]["model"]["quantize"] == "nf4"
    assert math.isfinite(nf4["metrics"]["test"]["perplexity"])
    assert records.finished(tmp_path / "nf4" / "results", nf4["run_id"])


def test_fp4_and_int8_load_on_a_cpu_and_train(files, tmp_path):  # noqa: F811
    fp4 = run(lm(files, tmp_path / "fp4", "model.quantize=fp4"))
    assert fp4["status"] == "ok", fp4["error"]
    assert fp4["task_info"]["quantize"] == "fp4" and fp4["task_info"]["double_quant"] is False
    try:  # LLM.int8 on a CPU: bitsandbytes >= 0.45 has CPU kernels; else it must be one line
        int8 = run(lm(files, tmp_path / "int8", "model.quantize=int8"))
    except ConfigError as e:
        assert "\n" not in str(e) and "int8" in str(e)
        return
    assert int8["status"] == "ok", int8["error"]
    info = int8["task_info"]
    assert info["quantize"] == "int8" and info["quantized_modules"] == 14
    assert info["weight_bytes"] < info["weight_bytes_fp32"] and info["quant_state_bytes"] > 0  # int8 + row scales


def test_a_quantized_text_classifier_keeps_its_new_head_full_precision_and_trains_it(files, tmp_path):  # noqa: F811
    cfg = config(tmp_path, "text_file", *text_overrides(files, "model.quantize=nf4", "optim.max_steps=2",
                                                       "optim.batch_size=8"))
    task, variant, model = build(cfg)
    assert type(model.classifier).__name__ == "Linear" and model.classifier.weight.requires_grad
    assert type(model.bert.encoder.layer[0].attention.self.query.base_layer).__name__ == "Linear4bit"
    assert len(quantized_linears(model)) == 2 * 6 + 1  # 6 Linears a layer, and the pooler
    head = model.classifier.weight.detach().clone()
    fit(model, variant, task, OptimConfig(**{**cfg["optim"], "max_steps": 2}), device="cpu", progress=False)
    assert not torch.equal(model.classifier.weight.detach(), head)
    assert task.info["quantize"] == "nf4" and task.info["weight_bytes"] < task.info["weight_bytes_fp32"]


def test_weight_storage_counts_4bit_parameters_by_their_packed_bytes(files):  # noqa: F811
    from transformers import AutoModelForCausalLM

    loading = Loading(quantize="nf4")
    model = AutoModelForCausalLM.from_pretrained(files["llama"], dtype=torch.float32, local_files_only=True,
                                                 **loading.from_pretrained_kwargs(("lm_head",)))
    plain = AutoModelForCausalLM.from_pretrained(files["llama"], dtype=torch.float32, local_files_only=True)
    stored = weight_storage(model)
    assert stored["weight_bytes"] == sum(p.numel() * p.element_size() for p in model.parameters())
    assert stored["params"] == sum(p.numel() for p in plain.parameters())
    assert stored["weight_bytes_fp32"] == weight_storage(plain)["weight_bytes"]
    assert stored["quant_state_bytes"] > 0  # absmax (double-quantized) and code books, beside the parameters


@pytest.mark.parametrize("variant", ["lora", "dora", "galore", *(pytest.param(v, marks=pytest.mark.slow)
                                                                for v in ("adalora", "lora_plus", "full", "head"))])
def test_gradient_checkpointing_gives_the_same_steps_for_every_variant(variant, files, tmp_path):  # noqa: F811
    more = [f"variant={variant}", *(["variant.tinit=1", "variant.tfinal=1"] if variant == "adalora" else [])]
    plain = run(lm(files, tmp_path / "plain", *more))
    ckpt = run(lm(files, tmp_path / "ckpt", "model.gradient_checkpointing=true", *more))
    assert plain["status"] == "ok", plain["error"]
    assert ckpt["status"] == "ok", ckpt["error"]
    assert ckpt["task_info"]["gradient_checkpointing"] is True
    # recomputation replays the same forward (dropout included: its RNG state is restored)
    assert [h["loss"] for h in ckpt["history"]] == pytest.approx([h["loss"] for h in plain["history"]], rel=1e-5)
    assert ckpt["metrics"]["test"] == pytest.approx(plain["metrics"]["test"], rel=1e-5)
    if variant != "lora":
        return
    cfg = lm(files, tmp_path / "nf4ckpt", "model.quantize=nf4", "model.gradient_checkpointing=true")
    _, _, model = build(cfg)
    assert model.model.gradient_checkpointing and model._require_grads_hooks  # QLoRA's setting
    assert run(cfg)["status"] == "ok"


@pytest.mark.parametrize("task, override, fragment", [
    ("synthetic", "model.quantize=nf4", "model.quantize=nf4: task 'synthetic' does not load a pretrained"),
    ("digits", "model.quantize=int8", "model.quantize=int8: task 'digits' does not load a pretrained"),
    ("synthetic", "model.gradient_checkpointing=true", "model.gradient_checkpointing=true: task 'synthetic'"),
    ("synthetic", "model.quantize=int4", "invalid option model.quantize='int4': expected one of none, int8, nf4, fp4"),
    ("synthetic", "+model.bits=4", "unknown option model.bits"),
    ("lm", "+task.loading=1", "unknown option task.loading"),
])
def test_quantizing_a_task_that_cannot_is_one_line_before_anything_is_built(task, override, fragment, tmp_path,
                                                                           monkeypatch):
    from experiments import tasks

    monkeypatch.setattr(tasks, "build", lambda *a, **k: pytest.fail("built the task"))
    with pytest.raises(ConfigError) as err:
        run(config(tmp_path, task, override))
    assert fragment in str(err.value) and "\n" not in str(err.value), str(err.value)
    assert not (tmp_path / "results").exists()
