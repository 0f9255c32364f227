"""LoRA (Hu et al. 2021): h = W0 x + s·B A dropout(x), W0 frozen, B = 0 at init.

This file also holds the machinery the other low-rank methods build on: ``LoRALinear`` (the layer,
with merge/unmerge), ``wrap_targets`` (module surgery) and the peft-compatible adapter layout.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import LowRankConfig, Variant, VariantError, _check, lora_scale, register
from .targets import head_module_names, resolve_targets


def conv1d_type() -> type | None:
    """transformers' ``Conv1D`` (GPT-2 family: y = x W + b, W stored in x out), when transformers is there."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # variants/ works without transformers
        return None
    return Conv1D


def layer_dims(layer: nn.Module) -> tuple[int, int]:
    """(in, out) of a Linear (bitsandbytes' quantized ones included) or a transformers Conv1D."""
    conv1d = conv1d_type()
    if conv1d is not None and isinstance(layer, conv1d):
        return layer.weight.shape[0], layer.weight.shape[1]
    return layer.in_features, layer.out_features


def quantized_kind(weight: torch.Tensor) -> str | None:
    """"4bit" / "8bit" for a bitsandbytes parameter (told by its class, without importing bitsandbytes)."""
    return {"Params4bit": "4bit", "Int8Params": "8bit"}.get(type(weight).__name__)


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """W0 as an (out, in) floating tensor: Conv1D's stored weight transposed (a view), a bitsandbytes
    weight dequantized (a new tensor, as peft's ``dequantize_module_weight``)."""
    w = layer.weight
    kind = quantized_kind(w)
    if kind == "4bit":
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(w.data, w.quant_state).to(_float_dtype(layer))
    if kind == "8bit":
        import bitsandbytes.functional as bnbf

        scb = w.SCB if getattr(w, "SCB", None) is not None else layer.state.SCB
        return bnbf.int8_vectorwise_dequant(w.data, scb).to(_float_dtype(layer))
    conv1d = conv1d_type()
    return w.T if conv1d is not None and isinstance(layer, conv1d) else w


def _float_dtype(layer: nn.Module) -> torch.dtype:
    """The dtype the adapter computes in: the base weight's, or the quantized layer's compute dtype."""
    w = layer.weight
    if w.dtype.is_floating_point:
        return w.dtype
    return getattr(layer, "compute_dtype", None) or torch.float32


def adapter_dtype(layer: nn.Module) -> torch.dtype:
    """The dtype of the adapter's weights and computation: float32 on a 16-bit (or quantized) base, float64
    on a float64 one. peft's default (``autocast_adapter_dtype=True``): in bfloat16 a small update such as
    DoRA's magnitude step at lr 1e-4 rounds away (the magnitude did not move in 20 steps)."""
    return torch.promote_types(_float_dtype(layer), torch.float32)


INITS = ("kaiming", "gaussian", "olora", "pissa")  # and pissa_niter_<k> (randomised SVD, k iterations)


def check_init(init) -> bool:
    return isinstance(init, str) and (init in INITS or re.fullmatch(r"pissa_niter_[1-9]\d*", init) is not None)


class _LowRankUpdate(nn.Module):
    """What the LoRA layers share: the frozen ``base_layer`` seen through, and merge/unmerge of
    ``delta_weight()`` (ΔW in the stored weight's layout) into it."""

    merged: bool
    rank: int
    scaling: float

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    @property
    def update_scale(self) -> float:
        """s of ΔW = s·B A (AdaLoRA: alpha / (ranknum + 1e-5)), as a number."""
        return float(self.scaling)

    @torch.no_grad()
    def effective_weight(self) -> torch.Tensor:
        """The (out, in) weight the layer computes with, W0 + ΔW, merged or not (a Linear layer's)."""
        W = dense_weight(self.base_layer)
        return W if self.merged else W + self.delta().to(W.dtype)

    def _check_mergeable(self) -> None:
        """Raise where ΔW cannot be added to the stored weight (a quantized base)."""

    @torch.no_grad()
    def merge(self) -> None:
        self._check_mergeable()
        if not self.merged:
            self.base_layer.weight += self.delta_weight().to(self.base_layer.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base_layer.weight -= self.delta_weight().to(self.base_layer.weight.dtype)
            self.merged = False

    @torch.no_grad()
    def restore_unmerged(self, weight: torch.Tensor) -> None:
        """Unmerged by copying back the frozen weight saved before ``merge`` (bit for bit, unlike ``unmerge``)."""
        self.base_layer.weight.copy_(weight)
        self.merged = False

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling:g}, merged={self.merged}"


class LoRALinear(_LowRankUpdate):
    """A frozen ``nn.Linear`` (or transformers ``Conv1D``, or a bitsandbytes 4/8-bit Linear) plus a
    trainable rank-r update; the layer names follow peft's. A: r x in, B: out x r, whatever the layout
    of the base weight (Conv1D stores it transposed: peft's ``fan_in_fan_out``).

    ``init``: ``kaiming`` / ``gaussian`` (B = 0: the model starts at W0), or ``olora`` / ``pissa`` /
    ``pissa_niter_<k>``, which start A and B from W0's QR or top-r SVD and leave the residual
    W0 − s·B0 A0 as the frozen weight (peft's ``init_lora_weights``); B0 and A0 are kept (buffers, not
    saved) so that the saved adapter can be the standard LoRA update relative to the original W0.
    """

    def __init__(self, base_layer: nn.Module, rank: int, scale: float, dropout: float = 0.0,
                 init: str = "kaiming"):
        super().__init__()
        self.base_layer = base_layer
        self.rank, self.scaling = rank, scale
        conv1d = conv1d_type()
        self.fan_in_fan_out = conv1d is not None and isinstance(base_layer, conv1d)
        self.quantized = quantized_kind(base_layer.weight)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        n_in, n_out = layer_dims(base_layer)
        dtype, device = adapter_dtype(base_layer), base_layer.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, n_in, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(n_out, rank, dtype=dtype, device=device))
        self.register_buffer("lora_A0", None, persistent=False)  # olora / pissa: the initial A and B
        self.register_buffer("lora_B0", None, persistent=False)
        self.merged = False
        self.reset_parameters(init)

    def reset_parameters(self, init: str = "kaiming") -> None:
        if init == "kaiming":  # A as nn.Linear's default init (peft / microsoft/LoRA), B = 0 (LoRA §4.1)
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)
        elif init == "gaussian":
            nn.init.normal_(self.lora_A, std=1 / self.rank)
            nn.init.zeros_(self.lora_B)
        elif init in ("olora", "pissa") or check_init(init):
            self.principal_init(init)
        else:
            raise VariantError(f"invalid option init={init!r}: expected {', '.join(INITS)} or pissa_niter_<k>")

    @torch.no_grad()
    def principal_init(self, init: str) -> None:
        """OLoRA (Büyükakyüz 2024): W0 = QR, B = Q[:, :r], A = R[:r]. PiSSA (Meng et al. 2024, eq. 2-3):
        W0 = U S Vᵀ, A = diag(√(S_r/s)) V_rᵀ, B = U_r diag(√(S_r/s)) (randomised SVD for pissa_niter_k).
        Both: the frozen weight becomes the residual W0 − s·BA, so the model still starts at W0. In float32,
        as peft, then cast back."""
        if self.quantized:
            raise VariantError(f"invalid option init={init!r}: OLoRA/PiSSA need a float base weight "
                               f"(this one is {self.quantized}); use init=kaiming on a quantized base")
        w = self.base_layer.weight
        W = dense_weight(self.base_layer).to(torch.float32)  # (out, in)
        r, s = self.rank, self.scaling
        if init == "olora":
            Q, R = torch.linalg.qr(W)
            B, A = Q[:, :r], R[:r]
        else:
            if init == "pissa":
                U, S, Vh = torch.linalg.svd(W, full_matrices=False)
                U, S, Vh = U[:, :r], S[:r], Vh[:r]
            else:
                U, S, V = torch.svd_lowrank(W, q=r, niter=int(init.rsplit("_", 1)[1]))
                Vh = V.T
            root = torch.sqrt(S / s)
            A, B = root[:, None] * Vh, U * root[None, :]
        residual = W - s * B @ A
        w.copy_((residual.T if self.fan_in_fan_out else residual).to(w.dtype))
        self.lora_A.copy_(A)
        self.lora_B.copy_(B)
        self.lora_A0, self.lora_B0 = A.to(self.lora_A.dtype).clone(), B.to(self.lora_B.dtype).clone()

    # the wrapped layer still looks like its base to code that inspects it
    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def in_features(self) -> int:
        return self.lora_A.shape[1]

    @property
    def out_features(self) -> int:
        return self.lora_B.shape[0]

    def lora_in(self, x: torch.Tensor) -> torch.Tensor:
        """s·A dropout(x), (..., r): the scale is applied to the rank-r intermediate, not the output."""
        return F.linear(self.lora_dropout(x).to(self.lora_A.dtype), self.lora_A) * self.scaling

    def lora_out(self, x: torch.Tensor) -> torch.Tensor:
        """s·B A dropout(x) — the low-rank branch (LoRA eq. 3)."""
        return F.linear(self.lora_in(x), self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.merged:
            return out
        h = self.lora_in(x)
        if out.dtype != h.dtype:  # a 16-bit or quantized base: the float32 update is cast to the output's
            return out + F.linear(h, self.lora_B).to(out.dtype)
        # eq. 3, h = W0 x + B (s·A x): B's product accumulated into the base output by one addmm, so neither
        # an out-sized temporary for the update nor a separate add (docs/bench.md)
        return torch.addmm(out.reshape(-1, out.shape[-1]), h.reshape(-1, h.shape[-1]),
                           self.lora_B.T).view(out.shape)

    def delta(self) -> torch.Tensor:
        """ΔW = s·B A, (out, in)."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """ΔW in the layout of the stored base weight (transposed for Conv1D)."""
        d = self.delta()
        return d.T if self.fan_in_fan_out else d

    def _check_mergeable(self) -> None:
        if self.quantized:
            raise VariantError(f"cannot merge into a {self.quantized} quantized base weight "
                               "(dequantize the model first)")


class LoRAEmbedding(_LowRankUpdate):
    """A frozen ``nn.Embedding`` plus a rank-r update of its table, in peft's layout:
    ``lora_embedding_A`` (r x num_embeddings) = 0 and ``lora_embedding_B`` (dim x r) ~ N(0, 1) at init
    (peft's order: A, not B, starts at zero), out = E[x] + s·(A.T[x]) Bᵀ, no dropout (as peft)."""

    def __init__(self, base_layer: nn.Embedding, rank: int, scale: float):
        super().__init__()
        self.base_layer = base_layer
        self.rank, self.scaling = rank, scale
        w, dtype = base_layer.weight, adapter_dtype(base_layer)
        self.lora_embedding_A = nn.Parameter(torch.zeros(rank, base_layer.num_embeddings, dtype=dtype,
                                                         device=w.device))
        self.lora_embedding_B = nn.Parameter(torch.empty(base_layer.embedding_dim, rank, dtype=dtype,
                                                         device=w.device))
        nn.init.normal_(self.lora_embedding_B)
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.merged:
            return out
        b = self.base_layer
        after_a = F.embedding(x, self.lora_embedding_A.T, padding_idx=b.padding_idx, max_norm=b.max_norm,
                              norm_type=b.norm_type, scale_grad_by_freq=b.scale_grad_by_freq, sparse=b.sparse)
        delta = (after_a @ self.lora_embedding_B.T) * self.scaling
        scale = getattr(b, "embed_scale", None)  # Gemma-style scaled embeddings scale the update too
        return out + (delta if scale is None else delta * scale).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """ΔE = s·(B A)ᵀ, shaped like the table (num_embeddings x dim)."""
        return (self.lora_embedding_B @ self.lora_embedding_A).T * self.scaling


@torch.no_grad()
def weight_snapshot(model: nn.Module, names: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The weights of the modules ``names`` as they are now, float32 on the CPU: ``<name>.weight``, the
    (out, in) weight the module computes with (an adapted layer's W0 + ΔW, DoRA's m·V), plus an adapted
    layer's own tensors ``<name>.lora_A``, ``.lora_B`` ...; and {name: s} of the adapted ones."""
    tensors, scales = {}, {}
    for name in names:
        m = model.get_submodule(name)
        if isinstance(m, _LowRankUpdate):
            tensors[f"{name}.weight"] = m.effective_weight()
            tensors.update({f"{name}.{k}": p for k, p in m.named_parameters(recurse=False)})
            scales[name] = m.update_scale
        else:
            tensors[f"{name}.weight"] = dense_weight(m)
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}, scales


def snapshot_modules(model: nn.Module, spec=None, head=()) -> list[str]:
    """The Linear modules a weight snapshot covers: those ``spec`` names (resolve_targets, on the adapted
    model: an adapted layer stands for its base layer), or every adapted layer when ``spec`` is None."""
    if spec is None:
        return [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    return resolve_targets(model, spec, head=head, also=(LoRALinear,))


def wrap_targets(model: nn.Module, names: list[str], make) -> dict[str, nn.Module]:
    """Replace each named module (a Linear, Conv1D or Embedding) by ``make(module)``; {name: new module}."""
    wrapped = {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = make(getattr(parent, child))
        setattr(parent, child, layer)
        wrapped[name] = layer
    return wrapped


def adapter_layers(model: nn.Module, cls: type[nn.Module] | tuple[type[nn.Module], ...] = LoRALinear):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, cls)]


@dataclass
class LoRAConfig(LowRankConfig):
    # kaiming (peft's default: A as nn.Linear's init, B = 0) | gaussian (A ~ N(0, 1/r²), B = 0) | olora |
    # pissa | pissa_niter_<k>: A, B from W0's QR / top-r SVD, the frozen weight becomes the residual
    init: str = "kaiming"
    # A fixed number of A and B parameters instead of a fixed rank: apply() sets rank to the largest r with
    # r * sum(d_in + d_out) <= param_budget over the targeted matrices (LoRA paper, Table 5: one budget,
    # r=8 on one matrix type, 4 on two, 2 on four). DoRA's magnitude vectors come on top.
    param_budget: int | None = None

    def validate(self) -> None:
        super().validate()
        _check(check_init(self.init), "init", self.init, f"{', '.join(INITS)} or pissa_niter_<k>")
        b = self.param_budget
        _check(b is None or (isinstance(b, int) and not isinstance(b, bool) and b > 0), "param_budget", b,
               "a positive integer or null")


def budget_rank(model: nn.Module, names: list[str], budget: int) -> int:
    """The largest rank whose A and B matrices on ``names`` hold at most ``budget`` parameters."""
    per_rank = sum(sum(_dims(model.get_submodule(n))) for n in names)
    if budget < per_rank:
        raise VariantError(f"invalid option param_budget={budget}: rank 1 on these {len(names)} targets "
                           f"already takes {per_rank:,} parameters")
    return budget // per_rank


def _dims(layer: nn.Module) -> tuple[int, int]:
    """(in, out) of a targetable layer; an Embedding's are (num_embeddings, embedding_dim), as peft's."""
    return (layer.num_embeddings, layer.embedding_dim) if isinstance(layer, nn.Embedding) else layer_dims(layer)


@register("lora")
class LoRA(Variant):
    """Options: rank, alpha, dropout, scaling (standard | rslora), targets, init, param_budget.

    Targets may be ``nn.Linear``, transformers ``Conv1D`` (GPT-2) and bitsandbytes' quantized Linear layers
    (QLoRA: the base stays 4/8-bit, the adapter is float), and — for LoRA itself — ``nn.Embedding``.
    """

    Config = LoRAConfig
    layer_cls: type[LoRALinear] = LoRALinear
    use_dora = False
    mergeable = True
    embeddings = True  # nn.Embedding targets (peft's lora_embedding_A/B); DoRA, LoRA+, AdaLoRA: not here

    def make_layer(self, layer: nn.Module) -> nn.Module:
        c = self.cfg
        scale = lora_scale(c.alpha, self.rank, c.scaling)
        if isinstance(layer, nn.Embedding):
            if not self.embeddings:
                raise VariantError(f"variant {self.name!r} cannot adapt an nn.Embedding (LoRA can); "
                                   "leave the embedding out of the targets")
            if c.init not in ("kaiming", "gaussian"):
                raise VariantError(f"invalid option init={c.init!r}: OLoRA/PiSSA apply to Linear layers, "
                                   "not to the nn.Embedding among the targets")
            return LoRAEmbedding(layer, self.rank, scale)
        return self.layer_cls(layer, self.rank, scale, c.dropout, c.init)

    def layers(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """The adapted modules, by name."""
        return adapter_layers(model, (self.layer_cls, LoRAEmbedding))

    def _adapt(self, model: nn.Module) -> None:
        self.target_modules = self.target_names(model)
        budget = getattr(self.cfg, "param_budget", None)  # AdaLoRA's budget is its rank schedule instead
        if budget is not None:
            self.rank = budget_rank(model, self.target_modules, budget)
        for layer in wrap_targets(model, self.target_modules, self.make_layer).values():
            for n, p in layer.named_parameters():
                p.requires_grad_(not n.startswith("base_layer."))

    def merge(self, model: nn.Module) -> nn.Module:
        for _, layer in self.layers(model):
            layer.merge()
        return model

    def unmerge(self, model: nn.Module) -> nn.Module:
        for _, layer in self.layers(model):
            layer.unmerge()
        return model

    @contextlib.contextmanager
    def merged_for_eval(self, model: nn.Module) -> Iterator[bool]:
        """Merged for an evaluation (one matmul per layer instead of two or three), then the frozen weights
        are put back from a copy: subtracting ΔW again would not restore them bit for bit, and training
        goes on from them. A layer that cannot merge (a quantized base) leaves the model unmerged."""
        layers = [layer for _, layer in self.layers(model) if not layer.merged]
        if any(getattr(layer, "quantized", None) for layer in layers):
            yield False
            return
        stored = [layer.base_layer.weight.detach().clone() for layer in layers]
        try:
            for layer in layers:
                layer.merge()
            yield True
        finally:
            for layer, w in zip(layers, stored, strict=True):
                layer.restore_unmerged(w)

    # -- peft layout: adapter_model.safetensors + adapter_config.json that PeftModel.from_pretrained loads
    @property
    def principal(self) -> bool:
        """OLoRA / PiSSA: the frozen weights hold the residual, so the saved adapter is converted."""
        return self.cfg.init not in ("kaiming", "gaussian")

    def adapter_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """peft's keys. After OLoRA/PiSSA the adapter is saved as the standard LoRA update of the original
        W0, as peft's ``save_pretrained(path_initial_model_for_weight_conversion=...)``: ΔW = BA − B0A0 =
        [B | −B0][A ; A0], rank 2r (``peft_config`` doubles r and alpha to keep s)."""
        state = {}
        for name, layer in self.layers(model):
            for pname, p in layer.named_parameters(recurse=False):
                if pname in ("lora_magnitude_vector", "lora_embedding_A", "lora_embedding_B"):
                    key = pname
                else:
                    key = f"{pname}.weight"
                value = p.detach()
                if self.principal and pname == "lora_A":
                    value = torch.cat([value, layer.lora_A0])
                elif self.principal and pname == "lora_B":
                    value = torch.cat([value, -layer.lora_B0], dim=1)
                state[f"base_model.model.{name}.{key}"] = value
        return {**state, **self.head_state(model)}

    def head_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Trained head weights, under the plain names peft stores ``modules_to_save`` with."""
        state = {}
        if self.cfg.trains_head:
            for head in head_module_names(model, self.cfg.heads):
                for pname, p in model.get_submodule(head).named_parameters():
                    if p.requires_grad:
                        state[f"base_model.model.{head}.{pname}"] = p.detach()
        return state

    def peft_config(self, model: nn.Module) -> dict:
        """peft's LoraConfig fields, so that ``PeftModel.from_pretrained`` loads the saved adapter."""
        c = self.cfg
        heads = head_module_names(model, c.heads) if c.trains_head else []
        layers = self.layers(model)
        r, alpha = self.rank, c.alpha
        if self.principal:  # the converted rank-2r adapter, same s (peft: alpha x 2, or x √2 for rsLoRA)
            r, alpha = 2 * r, alpha * (2**0.5 if c.scaling == "rslora" else 2)
        return {
            "peft_type": "LORA", "task_type": None, "base_model_name_or_path": None,
            "r": r, "lora_alpha": alpha, "lora_dropout": c.dropout, "use_rslora": c.scaling == "rslora",
            "target_modules": [n for n, _ in layers],
            "modules_to_save": [h.rpartition(".")[2] for h in heads] or None,
            "init_lora_weights": "gaussian" if c.init == "gaussian" else True,
            "use_dora": self.use_dora, "bias": "none",
            # Conv1D stores W transposed; peft also flips this per module when it sees a Conv1D
            "fan_in_fan_out": bool(layers) and all(getattr(m, "fan_in_fan_out", False) for _, m in layers),
        }

