"""LoRA (Hu et al. 2021): h = W0 x + s·B A dropout(x), W0 frozen, B = 0 at init.

This file also holds the machinery the other low-rank methods build on: ``LoRALinear`` (the layer,
with merge/unmerge), ``wrap_targets`` (module surgery) and the peft-compatible adapter layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import LowRankConfig, Variant, VariantError, _check, lora_scale, register
from .targets import head_module_names


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable rank-r update; the layer names follow peft's."""

    def __init__(self, base_layer: nn.Linear, rank: int, scale: float, dropout: float = 0.0,
                 init: str = "kaiming"):
        super().__init__()
        self.base_layer = base_layer
        self.rank, self.scaling = rank, scale
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        w = base_layer.weight
        self.lora_A = nn.Parameter(torch.empty(rank, base_layer.in_features, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(base_layer.out_features, rank, dtype=w.dtype, device=w.device))
        self.merged = False
        self.reset_parameters(init)

    def reset_parameters(self, init: str = "kaiming") -> None:
        # A as nn.Linear's default init (peft / microsoft/LoRA), B = 0 so the model starts at W0 (LoRA §4.1)
        if init == "kaiming":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        elif init == "gaussian":
            nn.init.normal_(self.lora_A, std=1 / self.rank)
        else:
            raise VariantError(f"invalid option init={init!r}: expected 'kaiming' or 'gaussian'")
        nn.init.zeros_(self.lora_B)

    # the wrapped layer still looks like a Linear to code that inspects it
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def lora_out(self, x: torch.Tensor) -> torch.Tensor:
        """s·B A dropout(x) — the low-rank branch (LoRA eq. 3)."""
        return F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.merged:
            return out
        return out + self.lora_out(x).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = s·B A, shaped like W0."""
        return (self.lora_B @ self.lora_A) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base_layer.weight += self.delta_weight().to(self.base_layer.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base_layer.weight -= self.delta_weight().to(self.base_layer.weight.dtype)
            self.merged = False

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling:g}, merged={self.merged}"


def wrap_targets(model: nn.Module, names: list[str], make) -> dict[str, nn.Module]:
    """Replace each named ``nn.Linear`` by ``make(linear)``; returns {name: new module}."""
    wrapped = {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = make(getattr(parent, child))
        setattr(parent, child, layer)
        wrapped[name] = layer
    return wrapped


def adapter_layers(model: nn.Module, cls: type[nn.Module] = LoRALinear):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, cls)]


@dataclass
class LoRAConfig(LowRankConfig):
    init: str = "kaiming"  # A's init; B is always 0
    # A fixed number of A and B parameters instead of a fixed rank: apply() sets rank to the largest r with
    # r * sum(d_in + d_out) <= param_budget over the targeted matrices (LoRA paper, Table 5: one budget,
    # r=8 on one matrix type, 4 on two, 2 on four). DoRA's magnitude vectors come on top.
    param_budget: int | None = None

    def validate(self) -> None:
        super().validate()
        if self.init not in ("kaiming", "gaussian"):
            raise VariantError(f"invalid option init={self.init!r}: expected 'kaiming' or 'gaussian'")
        b = self.param_budget
        _check(b is None or (isinstance(b, int) and not isinstance(b, bool) and b > 0), "param_budget", b,
               "a positive integer or null")


def budget_rank(model: nn.Module, names: list[str], budget: int) -> int:
    """The largest rank whose A and B matrices on ``names`` hold at most ``budget`` parameters."""
    per_rank = sum(model.get_submodule(n).in_features + model.get_submodule(n).out_features for n in names)
    if budget < per_rank:
        raise VariantError(f"invalid option param_budget={budget}: rank 1 on these {len(names)} targets "
                           f"already takes {per_rank:,} parameters")
    return budget // per_rank


@register("lora")
class LoRA(Variant):
    """Options: rank, alpha, dropout, scaling (standard | rslora), targets, init (kaiming | gaussian)."""

    Config = LoRAConfig
    layer_cls: type[LoRALinear] = LoRALinear
    use_dora = False
    mergeable = True

    def make_layer(self, linear: nn.Linear) -> LoRALinear:
        c = self.cfg
        return self.layer_cls(linear, self.rank, lora_scale(c.alpha, self.rank, c.scaling), c.dropout, c.init)

    def _adapt(self, model: nn.Module) -> None:
        self.target_modules = self.target_names(model)
        budget = getattr(self.cfg, "param_budget", None)  # AdaLoRA's budget is its rank schedule instead
        if budget is not None:
            self.rank = budget_rank(model, self.target_modules, budget)
        for layer in wrap_targets(model, self.target_modules, self.make_layer).values():
            for n, p in layer.named_parameters():
                p.requires_grad_(not n.startswith("base_layer."))

    def merge(self, model: nn.Module) -> nn.Module:
        for _, layer in adapter_layers(model, self.layer_cls):
            layer.merge()
        return model

    def unmerge(self, model: nn.Module) -> nn.Module:
        for _, layer in adapter_layers(model, self.layer_cls):
            layer.unmerge()
        return model

    # -- peft layout: adapter_model.safetensors + adapter_config.json that PeftModel.from_pretrained loads
    def adapter_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        state = {}
        for name, layer in adapter_layers(model, self.layer_cls):
            for pname, p in layer.named_parameters(recurse=False):
                suffix = pname if pname == "lora_magnitude_vector" else f"{pname}.weight"
                state[f"base_model.model.{name}.{suffix}"] = p.detach()
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
        return {
            "peft_type": "LORA", "task_type": None, "base_model_name_or_path": None,
            "r": self.rank, "lora_alpha": c.alpha, "lora_dropout": c.dropout, "use_rslora": c.scaling == "rslora",
            "target_modules": [n for n, _ in adapter_layers(model, self.layer_cls)],
            "modules_to_save": [h.rpartition(".")[2] for h in heads] or None,
            "init_lora_weights": True if c.init == "kaiming" else "gaussian",
            "use_dora": self.use_dora, "bias": "none", "fan_in_fan_out": False,
        }

