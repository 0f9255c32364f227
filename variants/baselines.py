"""Reference points every comparison needs: full fine-tuning and the head-only linear probe."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .base import BaseConfig, Variant, VariantError, count_params, register, reject_quantized
from .targets import head_module_names


@register("full")
class Full(Variant):
    """Every parameter trainable (AdamW); the upper reference for quality and the cost ceiling."""

    def apply(self, model: nn.Module) -> nn.Module:
        reject_quantized(model, self.name)
        self.base_params = count_params(model)
        return model.requires_grad_(True)


@dataclass
class HeadConfig(BaseConfig):
    train_head: bool | None = True  # even where the task's head is pretrained (digits): nothing else trains


@register("head")
class Head(Variant):
    """Only the task head trains (a linear probe of the frozen backbone)."""

    Config = HeadConfig

    def _adapt(self, model: nn.Module) -> None:
        if not self.cfg.trains_head:
            raise VariantError("variant 'head' needs train_head=True: it trains nothing else")
        if not head_module_names(model, self.cfg.heads):
            names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
            raise VariantError(f"invalid option head={list(self.cfg.heads)}: no such module in the model "
                               f"(Linear modules: {', '.join(names[-5:])})")
