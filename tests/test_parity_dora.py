"""DoRA: the norm expansion, the paper's formula, merge/unmerge and exact parity with peft (use_dora=True)."""

from __future__ import annotations

import peft
import pytest
import torch
import torch.nn.functional as F
from tiny import MODELS, output_of

import variants
from variants.dora import DoRA, DoRALinear
from variants.lora import adapter_layers
from variants.targets import head_module_names

RANK, ALPHA = 4, 8.0


def make(model_name: str, dtype=torch.float64, dropout: float = 0.0, seed: int = 0, **options):
    """(variant, adapted model, batch) for one of the tiny models; B and m randomised so DoRA is not W0."""
    factory, batch_fn, opts = MODELS[model_name]
    v = variants.create("dora", rank=RANK, alpha=ALPHA, dropout=dropout, **{**opts, **options})
    model = v.apply(factory().to(dtype))
    randomize(model, seed)
    batch = {k: t.to(dtype) if t.is_floating_point() else t for k, t in batch_fn().items()}
    return v, model, batch


@torch.no_grad()
def randomize(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _, layer in adapter_layers(model, DoRALinear):
        A, B, m = layer.lora_A, layer.lora_B, layer.lora_magnitude_vector
        A.copy_(torch.randn(A.shape, generator=g, dtype=A.dtype) * 0.1)
        B.copy_(torch.randn(B.shape, generator=g, dtype=B.dtype) * 0.05)
        m.mul_(1 + 0.2 * torch.randn(m.shape, generator=g, dtype=m.dtype))


def labels(batch):
    return batch["labels"] if "labels" in batch else batch["y"]


def maxdiff(a, b) -> float:
    return (a.detach() - b.detach()).abs().max().item()


# ----------------------------------------------------------------------------------------- the layer math


@pytest.mark.parametrize("scaling", ["standard", "rslora"])
def test_weight_norm_expansion_matches_naive(scaling):
    torch.manual_seed(0)
    base = torch.nn.Linear(57, 23, dtype=torch.float64)
    layer = DoRALinear(base, rank=5, scale=16 / (5**0.5 if scaling == "rslora" else 5))
    with torch.no_grad():
        layer.lora_A.normal_()
        layer.lora_B.normal_()  # ||sBA|| >> ||W0||: the cross and square terms dominate
    naive = torch.linalg.norm(base.weight + layer.scaling * layer.lora_B @ layer.lora_A, dim=1)
    got = layer.weight_norm()
    assert not got.requires_grad  # the norm is a constant for autograd (DoRA §4.3)
    print(f"norm expansion max abs diff {maxdiff(got, naive):.2e}")
    torch.testing.assert_close(got, naive, rtol=1e-12, atol=1e-12)
    with torch.no_grad():  # new base weights: the cached ||W0||² must be refreshed
        base.weight.mul_(3)
    layer.refresh_norm_cache()
    naive = torch.linalg.norm(base.weight + layer.scaling * layer.lora_B @ layer.lora_A, dim=1)
    torch.testing.assert_close(layer.weight_norm(), naive, rtol=1e-12, atol=1e-12)


def test_forward_matches_paper_formula():
    """eq. 5 with the detached norm, with and without dropout, written out densely."""
    torch.manual_seed(0)
    layer = DoRALinear(torch.nn.Linear(16, 12, dtype=torch.float64), rank=3, scale=2.0, dropout=0.5)
    randomize(torch.nn.Sequential(layer), seed=1)
    W0, b, m, s = layer.weight, layer.bias, layer.lora_magnitude_vector, layer.scaling
    x = torch.randn(7, 16, dtype=torch.float64)
    V = W0 + s * layer.lora_B @ layer.lora_A
    g = m / torch.linalg.norm(V, dim=1)
    layer.eval()
    torch.testing.assert_close(layer(x), F.linear(x, g[:, None] * V, b), rtol=0, atol=1e-13)
    layer.train()
    torch.manual_seed(5)
    got = layer(x)
    torch.manual_seed(5)
    xd = F.dropout(x, 0.5, training=True)
    want = F.linear(x, W0, b) + (g - 1) * F.linear(xd, W0) + g * s * F.linear(xd, layer.lora_B @ layer.lora_A)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-13)


@pytest.mark.parametrize("model_name", ["mlp", "bert", "llama"])
def test_adapted_model_equals_base_at_init(model_name):
    factory, batch_fn, opts = MODELS[model_name]
    batch = batch_fn()
    base = factory().eval()
    want = output_of(base, batch)
    model = variants.create("dora", rank=RANK, alpha=ALPHA, **opts).apply(base).eval()
    for _, layer in adapter_layers(model, DoRALinear):  # m = ||W0||_c, as peft initialises it
        torch.testing.assert_close(layer.lora_magnitude_vector, torch.linalg.norm(layer.weight, dim=1))
    torch.testing.assert_close(output_of(model, batch), want)  # g == 1 exactly; float32 rounding only


@pytest.mark.parametrize("model_name", ["mlp", "bert"])
def test_merge_unmerge(model_name):
    v, model, batch = make(model_name, dropout=0.1)
    model.eval()
    w0 = {n: layer.weight.clone() for n, layer in adapter_layers(model, DoRALinear)}
    want = output_of(model, batch)
    v.merge(model)
    assert all(layer.merged for _, layer in adapter_layers(model, DoRALinear))
    assert any(maxdiff(w0[n], layer.weight) > 1e-3 for n, layer in adapter_layers(model, DoRALinear))
    merged = output_of(model, batch)
    v.unmerge(model)
    print(f"merged vs unmerged output {maxdiff(merged, want):.2e}")
    torch.testing.assert_close(merged, want, rtol=0, atol=1e-12)
    for n, layer in adapter_layers(model, DoRALinear):
        torch.testing.assert_close(layer.weight, w0[n], rtol=0, atol=1e-14)
    torch.testing.assert_close(output_of(model, batch), want, rtol=0, atol=1e-13)


# ------------------------------------------------------------------------------------------ peft parity


def peft_twin(model_name: str, v: DoRA, ours, dtype):
    """peft's use_dora=True on a fresh copy of the same base model, with our A, B, m copied in."""
    cfg = v.peft_config(ours)
    pcfg = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=v.cfg.dropout, use_dora=True,
                           target_modules=cfg["target_modules"], modules_to_save=cfg["modules_to_save"])
    pm = peft.get_peft_model(MODELS[model_name][0]().to(dtype), pcfg)
    with torch.no_grad():
        for _, p_ours, p_peft in paired_params(ours, pm, v):
            assert p_peft.dtype == p_ours.dtype and p_peft.requires_grad
            p_peft.copy_(p_ours)
    return pm


def paired_params(ours, pm, v: DoRA):
    """[(label, our parameter, peft's parameter)] for every trainable tensor."""
    inner = pm.base_model.model
    pairs = []
    for name, layer in adapter_layers(ours, DoRALinear):
        twin = inner.get_submodule(name)
        pairs += [(f"{name}.lora_A", layer.lora_A, twin.lora_A["default"].weight),
                  (f"{name}.lora_B", layer.lora_B, twin.lora_B["default"].weight),
                  (f"{name}.m", layer.lora_magnitude_vector, twin.lora_magnitude_vector["default"].weight)]
    if v.cfg.trains_head:
        for head in head_module_names(ours, v.cfg.heads):
            copy = inner.get_submodule(head).modules_to_save["default"]
            params = ours.get_submodule(head).named_parameters()
            pairs += [(f"{head}.{n}", p, copy.get_parameter(n)) for n, p in params]
    return pairs


def same_groups_adamw(model, lr):
    """What ``Variant.optimizer`` builds (decay on matrices only), for peft's model."""
    ps = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW([{"params": [p for p in ps if p.ndim >= 2], "weight_decay": 0.01},
                              {"params": [p for p in ps if p.ndim < 2], "weight_decay": 0.0}], lr=lr)


@pytest.mark.parametrize(("model_name", "dropout", "dtype", "atol"), [
    ("mlp", 0.0, torch.float64, 1e-10),
    ("mlp", 0.3, torch.float64, 1e-10),
    ("bert", 0.0, torch.float64, 1e-10),
    ("bert", 0.3, torch.float64, 1e-10),
    ("bert", 0.3, torch.float32, 2e-5),
])
def test_parity_with_peft_training(model_name, dropout, dtype, atol):
    """Same outputs, gradients (A, B, m, head) and weights after AdamW steps, dropout masks included."""
    v, ours, batch = make(model_name, dtype=dtype, dropout=dropout)
    pm = peft_twin(model_name, v, ours, dtype)
    pairs = paired_params(ours, pm, v)
    opt_ours, opt_peft = v.optimizer(ours, lr=1e-2, weight_decay=0.01), same_groups_adamw(pm, lr=1e-2)
    ours.train(), pm.train()
    worst = {"output": 0.0, "grad": 0.0, "weight": 0.0}
    for step in range(3):
        outs = []
        for model in (ours, pm):
            torch.manual_seed(100 + step)  # identical dropout masks
            out = output_of(model, batch)
            F.cross_entropy(out, labels(batch)).backward()
            outs.append(out)
        worst["output"] = max(worst["output"], maxdiff(*outs))
        torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=atol)
        for label, p, q in pairs:
            assert p.grad is not None and q.grad is not None, label
            assert p.grad.abs().max() > 0, label  # B != 0, so A, B and m all receive gradient
            worst["grad"] = max(worst["grad"], maxdiff(p.grad, q.grad))
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=atol, msg=lambda s, n=label: f"{n}: {s}")
        for opt in (opt_ours, opt_peft):
            opt.step()
            opt.zero_grad()
    for label, p, q in pairs:
        worst["weight"] = max(worst["weight"], maxdiff(p, q))
        torch.testing.assert_close(p, q, rtol=0, atol=atol, msg=lambda s, n=label: f"{n}: {s}")
    # the saved state has peft's keys and values
    ours_state, peft_state = v.adapter_state(ours), peft.get_peft_model_state_dict(pm)
    assert set(ours_state) == set(peft_state)
    for k in ours_state:
        torch.testing.assert_close(ours_state[k], peft_state[k], rtol=0, atol=atol)
    ours.eval(), pm.eval()  # eval with dropout > 0 takes peft's other (base_result) branch
    worst["eval output"] = maxdiff(output_of(ours, batch), output_of(pm, batch))
    assert worst["eval output"] <= atol
    print(f"{model_name} dropout={dropout} {dtype}: " + ", ".join(f"{k} {d:.2e}" for k, d in worst.items()))


@pytest.mark.parametrize("model_name", ["bert", "llama"])
def test_peft_loads_saved_adapter(model_name, tmp_path):
    v, ours, batch = make(model_name, dtype=torch.float32, dropout=0.1)
    opt = v.optimizer(ours, lr=1e-2)
    ours.train()
    for _ in range(3):
        out = output_of(ours, batch)
        F.cross_entropy(out.flatten(0, -2), labels(batch).flatten()).backward()
        opt.step()
        opt.zero_grad()
    v.save_adapter(ours, tmp_path)
    loaded = peft.PeftModel.from_pretrained(MODELS[model_name][0](), tmp_path).eval()
    assert loaded.peft_config["default"].use_dora
    ours.eval()
    diff = maxdiff(output_of(ours, batch), output_of(loaded, batch))
    print(f"{model_name}: ours vs peft-loaded output {diff:.2e}")
    assert diff < 1e-5


@pytest.mark.parametrize("model_name", ["mlp", "bert", "llama"])
def test_trainable_params_match_peft(model_name):
    v, ours, _ = make(model_name, dtype=torch.float32)
    pm = peft_twin(model_name, v, ours, torch.float32)
    assert v.peft_config(ours)["use_dora"] is True
    assert v.cost(ours)["trainable_params"] == pm.get_nb_trainable_parameters()[0]
