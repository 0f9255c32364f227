"""LoRA+ (Hayou et al. 2024): the LoRA model, trained with lr_B = ratio · lr_A (paper §4, default ratio 16).

The parameter groups are those of ``peft.optimizers.create_loraplus_optimizer``: B matrices *and every
other trainable 1-D parameter* (biases, norms, DoRA-style magnitudes) get ``ratio · lr``; matrices that are
not B (the A matrices, a trainable head's weight) get ``lr``; biases and LayerNorm parameters are not
decayed. LoRA on embeddings is not supported, so peft's separate embedding group is always empty here.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .base import _check, _is_number, register, trainable
from .lora import LoRA, LoRAConfig


@dataclass
class LoRAPlusConfig(LoRAConfig):
    ratio: float = 16.0  # λ = lr_B / lr_A (LoRA+ §4: "a good default is 2^4")

    def validate(self) -> None:
        super().validate()
        _check(_is_number(self.ratio) and self.ratio > 0, "ratio", self.ratio, "a positive number")


@register("lora_plus")
class LoRAPlus(LoRA):
    Config = LoRAPlusConfig
    embeddings = False  # peft gives embedding adapters their own lr (loraplus_lr_embedding); not here

    def param_groups(self, model: nn.Module, lr: float, weight_decay: float = 0.0) -> list[dict]:
        norm_params = {id(p) for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()}
        a, b, b_no_decay = [], [], []
        for name, p in trainable(model):
            if "lora_B" in name or p.ndim == 1:
                no_decay = "bias" in name or id(p) in norm_params
                (b_no_decay if no_decay else b).append(p)
            else:
                a.append(p)
        lr_b = lr * self.cfg.ratio  # η_B = λ η_A (LoRA+ eq. in §4)
        groups = [{"params": a, "lr": lr, "weight_decay": weight_decay},
                  {"params": b, "lr": lr_b, "weight_decay": weight_decay},
                  {"params": b_no_decay, "lr": lr_b, "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]
