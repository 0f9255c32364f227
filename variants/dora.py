"""DoRA (Liu et al. 2024, "Weight-Decomposed Low-Rank Adaptation"): W' = m · (W0 + sBA) / ||W0 + sBA||_c.

The weight is split into a trainable magnitude ``m`` (one scalar per output row, initialised to ||W0||_c)
and a direction updated by LoRA. The row norm is treated as a constant (detached, paper §4.3), so the
layer is ``g ⊙ (W0 x + s·BAx) + b`` with ``g = m / ||W0 + sBA||_c``. Semantics, parameter names and the
saved layout equal peft's ``LoraConfig(use_dora=True)``; unlike peft, the norm is computed without ever
forming an out x in matrix (see ``DoRALinear.weight_norm``), and the dropout-free layer has a hand-written
backward (``_DoRAFunction``) that skips the out-sized elementwise passes autograd would spend on it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from .base import register
from .lora import LoRA, LoRALinear, dense_weight


def _linear(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """W0 x (+ b) in the base's dtype, returned in x's: on a 16-bit base x (float32, the adapter's dtype)
    came from the base's dtype, so the round trip is exact and W0 is never copied to float32."""
    if W.dtype == x.dtype:
        return F.linear(x, W, b)
    return F.linear(x.to(W.dtype), W, b).to(x.dtype)


class _DoRAFunction(torch.autograd.Function):
    """y = g ⊙ h + b, h = W0 x + B u, u = s·A x, for 2-D x (N x in): DoRA's dropout-free layer (eq. 5 with the
    detached norm, §4.3: g = m / ||W0 + sBA||_c enters as a given vector; its gradient flows on to m through
    ``dora_scale``). W0 is (out, in) in the adapter's dtype, b may be None, s is a number.

    Forward as ``DoRALinear.adapted``, bit for bit, except that the low-rank product is accumulated into
    W0 x in place (no copy of it); it saves x, u and h, as autograd would. The backward is written out
    (grad = dL/dy, N x out):

        dL/dh   = grad ⊙ g                               formed only where smaller than g ⊙ W0 (dL/dx)
        dL/du   = (grad ⊙ g) B = grad (g ⊙ B)            N x r
        dL/dx   = (grad ⊙ g) W0 + dL/du · s A            grad (g ⊙ W0) where out x in <= N x out, else
                                                          (grad ⊙ g) W0: the smaller elementwise pass
        dL/dA   = s · (dL/du)ᵀ x
        dL/dB   = g ⊙ (gradᵀ u)                          rows of an out x r product scaled
        dL/dg_i = Σ_n grad_ni h_ni                       one ``linalg.vecdot``; exact, with no division by
                                                          g (h is saved, not recovered from y = g ⊙ h + b)
        dL/dW0  = g ⊙ (gradᵀ x),  dL/db = Σ_n grad_n     only if asked (W0 and b are frozen here)

    Autograd's graph for ``adapted`` spends, besides the same matmuls, four N x out passes on addcmul's
    backward (h·value, grad ⊙ that, its sum over N, grad ⊙ g), an N x in add of the two x-gradients and, in
    the forward, a copy of W0 x for the out-of-place addmm; here: vecdot (a product and a sum), an
    in-place addmm for dL/dx, and g applied to out x r (and out x in) tensors.
    """

    @staticmethod
    def forward(ctx, x, W, A, B, g, b, s):
        u = F.linear(x, A) * s
        h = F.linear(x, W).addmm_(u, B.T)
        ctx.save_for_backward(x, u, h, W, A, B, g)
        ctx.s, ctx.has_bias = s, b is not None
        return g * h if b is None else torch.addcmul(b, g, h)

    @staticmethod
    @once_differentiable  # x, u and h carry no graph here: a double backward raises rather than being wrong
    def backward(ctx, grad):
        x, u, h, W, A, B, g = ctx.saved_tensors
        need_x, need_W, need_A, need_B, need_g, need_b, _ = ctx.needs_input_grad
        gx = gW = gA = gB = gg = gb = None
        gc = g[:, None]
        # g folded into the rows of W0 (out x in) or into grad's columns (N x out, dL/dh): the smaller pass
        gs = grad * g if need_x and W.numel() > grad.numel() else None
        if need_x or need_A:
            gu = (grad @ (gc * B) if gs is None else gs @ B) * ctx.s  # s·dL/du, N x r
            if need_x:
                gx = (grad @ (gc * W) if gs is None else gs @ W).addmm_(gu, A)
            if need_A:
                gA = gu.T @ x
        if need_B:
            gB = (grad.T @ u).mul_(gc) if gs is None else gs.T @ u
        if need_g:
            gg = torch.linalg.vecdot(grad, h, dim=0)
        if need_W:
            gW = (grad.T @ x).mul_(gc)
        if need_b and ctx.has_bias:
            gb = grad.sum(0)
        return gx, gW, gA, gB, gg, gb, None


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
            if self.fused_backward(x, W):
                x2 = x.reshape(-1, x.shape[-1])
                y = _DoRAFunction.apply(x2, W, self.lora_A, self.lora_B, g, b, self.scaling)
                return y.view(*x.shape[:-1], -1).to(dtype)
            return self.adapted(x, g, b, W).to(dtype)  # eq. 5: m/||W0 + sBA||_c · (W0 + sBA) x + b
        # dropout on the adapter input only (as peft): W0 x + b + (g − 1) ⊙ W0 x̃ + g ⊙ s·BA x̃, x̃ = drop(x),
        # i.e. eq. 5 applied to x̃ plus the part of W0 x that dropout removed
        xd = self.lora_dropout(x)
        return self.adapted(xd, g, _linear(x - xd, W, b), W).to(dtype)

    def fused_backward(self, x: torch.Tensor, W: torch.Tensor) -> bool:
        """Whether the dropout-free layer runs as ``_DoRAFunction``: a float32/float64 base in the adapter's
        dtype (not 16-bit, not quantized) and no autocast (which would recast its matmuls in the forward
        only). Otherwise ``adapted``, the same values through autograd (which, unlike _DoRAFunction, also
        takes a second derivative: create_graph=True)."""
        device = x.device.type
        return (not self.quantized and W.dtype == x.dtype == self.lora_A.dtype
                and not (torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)))

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

    def restore_unmerged(self, weight: torch.Tensor) -> None:
        super().restore_unmerged(weight)
        self.merge_scale = None


@register("dora")
class DoRA(LoRA):
    """LoRA's options (rank, alpha, dropout, scaling, targets, init) plus a trainable magnitude per row.

    Saved in peft's layout with ``use_dora: true``; the magnitude is stored as
    ``base_model.model.<layer>.lora_magnitude_vector``, as peft does.
    """

    layer_cls = DoRALinear
    use_dora = True
    embeddings = False
