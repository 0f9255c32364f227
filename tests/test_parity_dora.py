"""DoRA: the norm expansion, the paper's formula, merge/unmerge and exact parity with peft (use_dora=True)."""

from __future__ import annotations

import peft
import pytest
import torch
import torch.nn.functional as F
from tiny import MODELS, output_of

import variants
from variants.dora import DoRA, DoRALinear
from variants.lora import adapter_layers, dense_weight
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


# ------------------------------------------------------------------- the hand-written backward (dropout-free)


def _fn_inputs(n, n_in, n_out, bias, seed=0, x_grad=True):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    x = rand(n, n_in).requires_grad_(x_grad)
    W, A, B = rand(n_out, n_in).requires_grad_(), rand(3, n_in).requires_grad_(), rand(n_out, 3).requires_grad_()
    gvec = (0.5 + torch.rand(n_out, generator=g, dtype=torch.float64)).requires_grad_()
    b = rand(n_out).requires_grad_() if bias else None
    return x, W, A, B, gvec, b, 1.7


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize(("n", "n_in", "n_out"), [(6, 13, 7), (20, 5, 7)], ids=["scale-grad", "fold-W0"])
@pytest.mark.parametrize("x_grad", [True, False], ids=["x-grad", "no-x-grad"])
def test_dora_function_gradcheck(bias, n, n_in, n_out, x_grad):
    """Every input's gradient by finite differences, both ways of applying g to dL/dx (6x13 -> 7: W0 is the
    larger, grad is scaled; 20x5 -> 7: W0's rows are), and with x frozen (the first adapted layer)."""
    from variants.dora import _DoRAFunction

    inputs = _fn_inputs(n, n_in, n_out, bias, x_grad=x_grad)
    assert torch.autograd.gradcheck(_DoRAFunction.apply, inputs)


def _fused(y) -> bool:
    """Whether ``y`` came out of _DoRAFunction (through the reshape back to x's leading dims, if any)."""
    fn = y.grad_fn
    while fn is not None and type(fn).__name__ == "ViewBackward0":
        fn = fn.next_functions[0][0]
    return fn is not None and "_DoRAFunction" in type(fn).__name__


def _old_path(layers, on: bool):
    """Route the layers through ``adapted`` (plain autograd, the path before _DoRAFunction) or not."""
    for layer in layers:
        if on:
            layer.fused_backward = lambda x, W: False
        else:
            layer.__dict__.pop("fused_backward", None)


def _grads(out, go, tensors):
    return out.detach(), torch.autograd.grad(out, tensors, go)


@pytest.mark.parametrize("layer_kind", ["linear", "linear-no-bias", "conv1d"])
def test_fused_layer_equals_autograd_path(layer_kind):
    """One layer, 3-D input: the same output and gradients (x, A, B, m) as the addcmul path, to 1e-12."""
    torch.manual_seed(0)
    if layer_kind == "conv1d":
        from transformers.pytorch_utils import Conv1D

        base = Conv1D(11, 9).to(torch.float64)  # (in=9, out=11), W stored in x out
        torch.nn.init.normal_(base.weight, std=0.3)
        torch.nn.init.normal_(base.bias, std=0.3)
    else:
        base = torch.nn.Linear(9, 11, bias=layer_kind == "linear", dtype=torch.float64)
    base.requires_grad_(False)
    layer = DoRALinear(base, rank=3, scale=2.0)
    randomize(torch.nn.Sequential(layer), seed=2)
    assert layer.fan_in_fan_out == (layer_kind == "conv1d")
    x = torch.randn(2, 5, 9, dtype=torch.float64, requires_grad=True)
    go = torch.randn(2, 5, 11, dtype=torch.float64)
    params = [x, layer.lora_A, layer.lora_B, layer.lora_magnitude_vector]
    y = layer(x)
    assert _fused(y)
    new = _grads(y, go, params)
    _old_path([layer], True)
    y_old = layer(x)
    assert y_old.grad_fn is not None and not _fused(y_old)
    old = _grads(y_old, go, params)
    torch.testing.assert_close(new[0], old[0], rtol=0, atol=1e-12)
    for name, a, b in zip(["x", "A", "B", "m"], new[1], old[1], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12, msg=lambda s, n=name: f"{n}: {s}")
    # and the dense formula (eq. 5, detached norm): W' x + b
    V = dense_weight(base) + layer.scaling * layer.lora_B @ layer.lora_A
    g = layer.lora_magnitude_vector / torch.linalg.norm(V, dim=1).detach()
    torch.testing.assert_close(new[0], F.linear(x, g[:, None] * V, base.bias).detach(), rtol=0, atol=1e-12)


def _gpt2():
    from tiny import tiny_gpt2, token_batch

    return tiny_gpt2, lambda: token_batch(num_labels=None), {"targets": ["c_attn", "c_proj", "c_fc"],
                                                             "train_head": False}


@pytest.mark.parametrize("model_name", ["mlp", "bert", "llama", "gpt2"])
def test_fused_model_equals_autograd_path(model_name):
    """Whole tiny models (GPT-2: Conv1D layers) in float64, train mode, dropout 0: outputs and the gradients of
    every trainable tensor equal the addcmul path's to 1e-12, over two AdamW steps."""
    factory, batch_fn, opts = _gpt2() if model_name == "gpt2" else MODELS[model_name]
    runs = {}
    for old in (False, True):
        v = variants.create("dora", rank=RANK, alpha=ALPHA, dropout=0.0, **opts)
        model = v.apply(factory().to(torch.float64))
        randomize(model, seed=0)
        layers = [layer for _, layer in adapter_layers(model, DoRALinear)]
        assert layers
        _old_path(layers, old)
        batch = {k: t.to(torch.float64) if t.is_floating_point() else t for k, t in batch_fn().items()}
        opt = v.optimizer(model, lr=1e-2)
        model.train()
        seen = []
        for _ in range(2):
            out = output_of(model, batch)
            out.double().pow(2).mean().backward()  # a loss with gradient everywhere
            seen.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
            opt.step()
            opt.zero_grad()
        runs[old] = seen, {n: p.detach().clone() for n, p in model.named_parameters()}
    (new_steps, new_params), (old_steps, old_params) = runs[False], runs[True]
    for (out_n, g_n), (out_o, g_o) in zip(new_steps, old_steps, strict=True):
        torch.testing.assert_close(out_n, out_o, rtol=0, atol=1e-12)
        assert set(g_n) == set(g_o) and any(n.endswith("lora_magnitude_vector") for n in g_n)
        for n in g_n:
            torch.testing.assert_close(g_n[n], g_o[n], rtol=0, atol=1e-12, msg=lambda s, n=n: f"{n}: {s}")
    for n in new_params:
        torch.testing.assert_close(new_params[n], old_params[n], rtol=0, atol=1e-12)


def test_fused_path_is_taken_only_where_it_applies():
    """float32/float64 base, dropout-free or eval: _DoRAFunction; a bf16 base, dropout in training or
    autocast: the autograd path."""
    x = torch.randn(4, 8)
    for dtype in (torch.float32, torch.float64):
        layer = DoRALinear(torch.nn.Linear(8, 6, dtype=dtype), rank=2, scale=1.0)
        assert _fused(layer(x.to(dtype)))
    layer = DoRALinear(torch.nn.Linear(8, 6, dtype=torch.bfloat16), rank=2, scale=1.0)
    assert not _fused(layer(x.to(torch.bfloat16)))
    layer = DoRALinear(torch.nn.Linear(8, 6), rank=2, scale=1.0, dropout=0.1)
    assert not _fused(layer.train()(x))
    assert _fused(layer.eval()(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast would recast the forward's matmuls only
        assert not _fused(layer(x))
