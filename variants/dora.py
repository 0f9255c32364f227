"""DoRA (Liu et al. 2024, "Weight-Decomposed Low-Rank Adaptation"): W' = m · (W0 + sBA) / ||W0 + sBA||_c.

The weight is split into a trainable magnitude ``m`` (one scalar per output row, initialised to ||W0||_c)
and a direction updated by LoRA. The row norm is treated as a constant (detached, paper §4.3), so the
layer is ``g ⊙ (W0 x + s·BAx) + b`` with ``g = m / ||W0 + sBA||_c``. Semantics, parameter names and the
saved layout equal peft's ``LoraConfig(use_dora=True)``; unlike peft, the norm is computed without ever
forming an out x in matrix (see ``DoRALinear.weight_norm``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import register
from .lora import LoRA, LoRALinear, dense_weight


def _linear(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """W0 x (+ b) in the base's dtype, returned in x's: on a 16-bit base x (float32, the adapter's dtype)
    came from the base's dtype, so the round trip is exact and W0 is never copied to float32."""
    if W.dtype == x.dtype:
        return F.linear(x, W, b)
    return F.linear(x.to(W.dtype), W, b).to(x.dtype)


class DoRALinear(LoRALinear):
    """``LoRALinear`` plus the magnitude vector ``lora_magnitude_vector`` (peft's name).

    ||W0||_c² is cached at construction (W0 is frozen): if the base weights are replaced afterwards
    (e.g. a base checkpoint loaded into the wrapped model), call ``refresh_norm_cache()``.
    """

    def __init__(self, base_layer: nn.Module, rank: int, scale: float, dropout: float = 0.0,
                 init: str = "kaiming"):
        super().__init__(base_layer, rank, scale, dropout, init)
        w = dense_weight(base_layer).detach()  # (out, in); dequantized for a 4/8-bit base (as peft)
        acc = torch.promote_types(w.dtype, torch.float32)  # accumulate norms in >= float32
        # ||w_i||^2 of the frozen W0, cached (not saved: it is recomputed from the base checkpoint)
        self.register_buffer("w0_sq_norm", w.to(acc).pow(2).sum(1), persistent=False)
        # m = ||W0 + sBA||_c at init (paper eq. 5): ||W0||_c with B = 0, and still ||W0||_c after OLoRA /
        # PiSSA, whose frozen weight is the residual W0 − sBA; so the adapted layer starts exactly at W0
        self.lora_magnitude_vector = nn.Parameter(self.weight_norm().to(self.lora_A.dtype))
        self.register_buffer("merge_scale", None, persistent=False)  # g used by merge(), for unmerge()

    @torch.no_grad()
    def refresh_norm_cache(self) -> None:
        self.w0_sq_norm.copy_(dense_weight(self.base_layer).to(self.w0_sq_norm.dtype).pow(2).sum(1))

    @torch.no_grad()
    def weight_norm(self) -> torch.Tensor:
        """||W0 + sBA||_c, detached, without an out x in temporary:
        ||w_i + s b_i A||² = ||w_i||² + s b_i·(2 A w_i + s A Aᵀ b_iᵀ) for row i (b_i: row i of B)."""
        A, s, acc = self.lora_A, self.scaling, self.w0_sq_norm.dtype
        B = self.lora_B.to(acc)
        WA = F.linear(dense_weight(self.base_layer).to(acc), A.to(acc))  # (out, r): row i is A w_i
        AA = (A @ A.T).to(acc)  # (r, r)
        sq = self.w0_sq_norm + s * (B * (2 * WA + s * (B @ AA))).sum(1)
        return sq.clamp_min(0).sqrt()

    def dora_scale(self) -> torch.Tensor:
        """g = m / ||W0 + sBA||_c: gradient flows to m (and through the direction), not the norm (§4.3)."""
        return self.lora_magnitude_vector / self.weight_norm()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        W, b = dense_weight(self.base_layer), self.base_layer.bias
        dtype, x = x.dtype, x.to(self.lora_A.dtype)
        g = self.dora_scale().to(x.dtype)
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            return self.adapted(x, g, b, W).to(dtype)  # eq. 5: m/||W0 + sBA||_c · (W0 + sBA) x + b
        # dropout on the adapter input only (as peft): W0 x + b + (g − 1) ⊙ W0 x̃ + g ⊙ s·BA x̃, x̃ = drop(x),
        # i.e. eq. 5 applied to x̃ plus the part of W0 x that dropout removed
        xd = self.lora_dropout(x)
        return self.adapted(xd, g, _linear(x - xd, W, b), W).to(dtype)

    def adapted(self, x: torch.Tensor, g: torch.Tensor, shift: torch.Tensor | None,
                W: torch.Tensor | None = None) -> torch.Tensor:
        """shift + g ⊙ (W0 x + s·B A x): one base matmul, the low-rank term accumulated into it (addmm)."""
        W = dense_weight(self.base_layer) if W is None else W
        x2 = x.reshape(-1, x.shape[-1])
        h = torch.addmm(_linear(x2, W), F.linear(x2, self.lora_A) * self.scaling,
                        self.lora_B.T).view(*x.shape[:-1], -1)
        return g * h if shift is None else torch.addcmul(shift, g, h)

    @torch.no_grad()
    def effective_weight(self) -> torch.Tensor:
        """W' = m · (W0 + sBA) / ||W0 + sBA||_c (eq. 5), (out, in)."""
        W = dense_weight(self.base_layer)
        if self.merged:
            return W
        return (self.dora_scale()[:, None] * (W + self.delta().to(W.dtype))).to(W.dtype)

    def _per_row(self, g: torch.Tensor) -> torch.Tensor:
        """g shaped to scale the output rows of the stored weight (its columns for Conv1D)."""
        return g[None, :] if self.fan_in_fan_out else g[:, None]

    @torch.no_grad()
    def merge(self) -> None:
        self._check_mergeable()
        if not self.merged:
            W = self.base_layer.weight
            self.merge_scale = self.dora_scale()
            W.copy_((self._per_row(self.merge_scale) * (W + self.delta_weight())).to(W.dtype))  # W' of eq. 5
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            W = self.base_layer.weight
            W.copy_((W / self._per_row(self.merge_scale) - self.delta_weight()).to(W.dtype))
            self.merge_scale, self.merged = None, False


@register("dora")
class DoRA(LoRA):
    """LoRA's options (rank, alpha, dropout, scaling, targets, init) plus a trainable magnitude per row.

    Saved in peft's layout with ``use_dora: true``; the magnitude is stored as
    ``base_model.model.<layer>.lora_magnitude_vector``, as peft does.
    """

    layer_cls = DoRALinear
    use_dora = True
    embeddings = False
