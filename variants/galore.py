"""GaLore (Zhao et al. 2024, "Memory-Efficient LLM Training by Gradient Low-Rank Projection").

Full-parameter training whose Adam moments live in a rank-r subspace of each targeted weight's gradient:
R = Pᵀ G (or G Pᵀ), Adam on R, the normalised update is projected back and scaled by α. The projector P
holds the top-r singular vectors of G and is recomputed every ``update_proj_gap`` steps (Alg. 2).

The step semantics are those of the reference implementation (galore-torch 1.0, a transformers-style
AdamW) so that both give the same weights step for step:

- bias correction folded into the step size, η·sqrt(1-β2^t)/(1-β1^t), with ε added after the square root
  of the *uncorrected* second moment;
- decoupled weight decay applied after the update, as W ← W - η·λ·W;
- the moments are kept (not reset) when the projector is refreshed;
- the SVD runs in float32 whatever the weight's dtype (float64 included); the projector is then cast back.

The projector side follows galore-torch's ``proj_type``: ``std`` projects the smaller dimension of a
weight W ∈ R^{m×n} (right, G Vᵣᵀ, when m ≥ n; left, Uᵣᵀ G, otherwise), ``reverse_std`` the larger one,
``left``/``right`` force a side and ``full`` projects both (Uᵣᵀ G Vᵣᵀ, moments r×r).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .base import BaseConfig, Variant, VariantError, _check, _is_number, register, reject_quantized, trainable

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
_GALORE_KEYS = {"rank": 8, "update_proj_gap": 200, "scale": 0.25, "proj_type": "std"}


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_galore_options(rank, update_proj_gap, scale, proj_type) -> None:
    _check(_is_int(rank) and rank > 0, "rank", rank, "a positive integer")
    _check(_is_int(update_proj_gap) and update_proj_gap > 0, "update_proj_gap", update_proj_gap,
           "a positive integer")
    _check(_is_number(scale) and scale > 0, "scale", scale, "a positive number")
    _check(proj_type in PROJ_TYPES, "proj_type", proj_type, " | ".join(PROJ_TYPES))


# ----------------------------------------------------------------------------------------------- projector


def projection_side(proj_type: str, shape: torch.Size | tuple[int, ...]) -> str:
    """'left' (Uᵣᵀ G), 'right' (G Vᵣᵀ) or 'full' (both) for a gradient of ``shape``, as galore-torch picks."""
    tall = shape[0] >= shape[1]
    if proj_type == "std":
        return "right" if tall else "left"
    if proj_type == "reverse_std":
        return "left" if tall else "right"
    if proj_type in ("left", "right", "full"):
        return proj_type
    raise VariantError(f"invalid option proj_type={proj_type!r}: expected {' | '.join(PROJ_TYPES)}")


def orthogonal_factors(grad: torch.Tensor, rank: int, side: str, svd: str = "exact") -> dict[str, torch.Tensor]:
    """The projector(s) for ``grad``: {"proj_u": Uᵣ (m×r)} and/or {"proj_v": Vᵣᵀ (r×n)}, in grad's dtype.
    ``svd="lowrank"``: a randomized SVD (Halko et al., ``torch.svd_lowrank``, rank + 8 columns, 2 power
    iterations), cheaper than the full SVD of a large gradient; ``exact`` (galore-torch's) by default."""
    # Alg. 2: U, S, V ← SVD(G_t); the SVD runs in float32 even for float64 weights (as galore-torch)
    if svd == "lowrank":
        q = min(rank + 8, *grad.shape)
        with torch.random.fork_rng(devices=[grad.device] if grad.is_cuda else []):  # never the run's streams
            torch.manual_seed(0)
            u, _, v = torch.svd_lowrank(grad.float(), q=q, niter=2)
        vh = v.t()
    else:
        u, _, vh = torch.linalg.svd(grad.float(), full_matrices=False)
    # copy=True: a compact tensor rather than a view pinning the whole U/Vh, in LAPACK's column-major
    # layout (as galore-torch's cast leaves it), so matmuls take the same BLAS path and steps agree bitwise
    out = {}
    if side in ("left", "full"):
        out["proj_u"] = u[:, :rank].to(grad.dtype, copy=True)  # Alg. 2: P_t ← U[:, :r]
    if side in ("right", "full"):
        out["proj_v"] = vh[:rank, :].to(grad.dtype, copy=True)  # the right-side analogue, Q_t ← V[:, :r]
    return out


def project(state: dict, grad: torch.Tensor, side: str) -> torch.Tensor:
    """R_t = P_tᵀ G_t (left), G_t Q_t (right) or P_tᵀ G_t Q_t (full)  (Alg. 2: project into compact space)."""
    if side == "left":
        return torch.matmul(state["proj_u"].t(), grad)
    if side == "right":
        return torch.matmul(grad, state["proj_v"].t())
    return torch.matmul(state["proj_u"].t(), grad) @ state["proj_v"].t()


def project_back(state: dict, update: torch.Tensor, side: str, scale: float) -> torch.Tensor:
    """G̃_t = α · P_t N_t (left), α · N_t Q_tᵀ (right), α · P_t N_t Q_tᵀ (full)  (Alg. 2: project back)."""
    if side == "left":
        full = torch.matmul(state["proj_u"], update)
    elif side == "right":
        full = torch.matmul(update, state["proj_v"])
    else:
        full = torch.matmul(state["proj_u"], update) @ state["proj_v"]
    return full if scale == 1.0 else full * scale


# ----------------------------------------------------------------------------------------------- optimizer


def _dense_grad(p: torch.Tensor) -> torch.Tensor:
    if p.grad.is_sparse:
        raise RuntimeError("GaLoreAdamW does not support sparse gradients")
    return p.grad


class GaLoreAdamW(torch.optim.Optimizer):
    """AdamW whose groups holding a ``rank`` key are projected (GaLore); other groups get plain AdamW.

    A projected group may also set ``update_proj_gap`` (T), ``scale`` (α) and ``proj_type``; missing keys
    take galore-torch's defaults (200, 0.25, "std"). Its parameters must be 2-D with rank ≤ min(m, n).
    State per parameter: ``step`` (an int, as galore-torch), ``exp_avg``/``exp_avg_sq`` (projected shape
    in a projected group) and the projector tensor(s) ``proj_u`` (m×r) / ``proj_v`` (r×n).
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, correct_bias: bool = True):
        _check(_is_number(lr) and lr >= 0, "lr", lr, "a number >= 0")
        _check(len(betas) == 2 and all(_is_number(b) and 0 <= b < 1 for b in betas), "betas", betas,
               "two numbers in [0, 1)")
        _check(_is_number(eps) and eps >= 0, "eps", eps, "a number >= 0")
        _check(_is_number(weight_decay) and weight_decay >= 0, "weight_decay", weight_decay, "a number >= 0")
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay,
                    "correct_bias": correct_bias}
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if "rank" not in group:
            return
        for key, default in _GALORE_KEYS.items():
            group.setdefault(key, default)
        _check_galore_options(group["rank"], group["update_proj_gap"], group["scale"], group["proj_type"])
        for p in group["params"]:
            if p.ndim != 2:
                raise VariantError(f"GaLore projects 2-D weights only; got a {tuple(p.shape)} parameter")
            _check(group["rank"] <= min(p.shape), "rank", group["rank"],
                   f"<= min{tuple(p.shape)} = {min(p.shape)} for a {p.shape[0]}x{p.shape[1]} weight")

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if "rank" in group:
                for p in params:
                    self.update(p, group)
            elif params:
                self._adamw(params, group)
        return loss

    @torch.no_grad()
    def update(self, p: torch.Tensor, group: dict) -> None:
        """One AdamW (projected: GaLore) update of ``p`` from its ``p.grad``, with ``group``'s settings."""
        if "rank" not in group:
            self._adamw([p], group)
            return
        beta1, beta2 = group["betas"]
        grad = _dense_grad(p)
        state = self._state(p)
        side = projection_side(group["proj_type"], grad.shape)
        fresh = state["step"] % group["update_proj_gap"] == 0
        if fresh or not any(k in state for k in ("proj_u", "proj_v")):
            # Alg. 2: if t mod T = 0 then recompute P_t, else reuse P_{t-1}; moments are kept
            state.update(orthogonal_factors(grad, group["rank"], side, group.get("svd", "exact")))
        grad = project(state, grad, side)
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(grad)  # Alg. 2: M_0 ← 0 (projected shape)
            state["exp_avg_sq"] = torch.zeros_like(grad)  # Alg. 2: V_0 ← 0
        m, v = state["exp_avg"], state["exp_avg_sq"]
        state["step"] += 1
        m.mul_(beta1).add_(grad, alpha=1.0 - beta1)  # Alg. 2: M_t ← β1·M_{t-1} + (1-β1)·R_t
        v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)  # Alg. 2: V_t ← β2·V_{t-1}+(1-β2)·R_t²
        denom = v.sqrt().add_(group["eps"])
        update = torch.div(m, denom, out=denom)  # Alg. 2: N_t ← M_t / (√V_t + ε)
        # Alg. 2: G̃_t ← α·P_t N_t and W_t ← W_{t-1} + η·G̃_t (G̃ a descent direction), α folded into the step
        step_size = self._step_size(group, state["step"]) * group["scale"]
        p.add_(project_back(state, update, side, 1.0), alpha=-step_size)
        if group["weight_decay"] > 0.0:  # decoupled decay after the update (galore-torch)
            p.add_(p, alpha=-group["lr"] * group["weight_decay"])

    def _state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if "step" not in state:
            state["step"] = 0
        return state

    @staticmethod
    def _step_size(group: dict, t: int) -> float:
        """η, or η·sqrt(1-β2^t)/(1-β1^t): Alg. 2's M_t/(1-β1^t), V_t/(1-β2^t) folded into η (galore-torch)."""
        beta1, beta2 = group["betas"]
        if not group["correct_bias"]:
            return group["lr"]
        return group["lr"] * math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t)

    def _adamw(self, params: list[torch.Tensor], group: dict) -> None:
        """galore-torch's AdamW on the unprojected ``params``, all of them in one fused kernel
        (``torch._fused_adamw_``); decoupled decay after the update, as galore-torch."""
        beta1, beta2 = group["betas"]
        by_step: dict[tuple, list[torch.Tensor]] = {}  # one kernel call per (step, device, dtype)
        for p in params:
            _dense_grad(p)
            state = self._state(p)
            if "exp_avg" not in state:
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            by_step.setdefault((state["step"], p.device, p.dtype), []).append(p)
        for (t, device, _), ps in by_step.items():
            # the kernel steps by lr/(1-β1^t) · m/(√v/√(1-β2^t) + ε); with ε → ε/√(1-β2^t) this is
            # lr·√(1-β2^t)/(1-β1^t) · m/(√v + ε), galore-torch's folded form (Alg. 2's bias corrections)
            bc1, bc2 = 1.0 - beta1**t, 1.0 - beta2**t
            eps = group["eps"] / math.sqrt(bc2)
            lr = group["lr"] if group["correct_bias"] else group["lr"] * bc1 / math.sqrt(bc2)
            steps = [torch.tensor(float(t), device=device)] * len(ps)
            torch._fused_adamw_(ps, [p.grad for p in ps], [self.state[p]["exp_avg"] for p in ps],
                                [self.state[p]["exp_avg_sq"] for p in ps], [], steps, lr=lr, beta1=beta1,
                                beta2=beta2, weight_decay=0.0, eps=eps, amsgrad=False, maximize=False)
            if group["weight_decay"] > 0.0:  # decoupled decay after the update (galore-torch)
                torch._foreach_add_(ps, ps, alpha=-group["lr"] * group["weight_decay"])

    def update_in_backward(self) -> None:
        """Layer-wise updates (GaLore §4.3, "per-layer weight updates"): each parameter is updated by a
        post-accumulate-grad hook as soon as its gradient is complete, and the gradient is freed at once,
        so the gradients of all layers never exist together. ``step()`` and ``zero_grad()`` then find no
        gradient and do nothing; the learning rate a scheduler sets is read at each update, as before."""
        for group in self.param_groups:
            for p in group["params"]:
                def hook(p, group=group):
                    self.update(p, group)
                    p.grad = None

                p.register_post_accumulate_grad_hook(hook)


# ----------------------------------------------------------------------------------------------- variant


@dataclass
class GaLoreConfig(BaseConfig):
    rank: int = 8
    targets: Any = "all-linear"  # suffix list | regex string | "all-linear" | preset name (targets.py)
    update_proj_gap: int = 200  # T: the projector is recomputed every T steps of each weight
    # α: the projected-back update is multiplied by α. 4, as in the GaLore README's GLUE fine-tuning example
    # (roberta-base, lr 3e-5); galore-torch's own default 0.25 (GaLoreAdamW's param groups) is its
    # pre-training value: at lr 1e-4 on `sentiment`, α = 0.25 never left the majority class (val acc
    # 0.578) while α = 4 reached 0.760
    scale: float = 4.0
    proj_type: str = "std"  # std | reverse_std | left | right | full (galore-torch's names)
    # update each weight inside backward and free its gradient (GaLore §4.3): gradients of all layers never
    # coexist; no global-norm clipping and no accumulation then (optim.grad_clip=0, optim.grad_accum=1)
    layerwise: bool = False
    svd: str = "exact"  # exact | lowrank: the projector refresh's SVD (lowrank: randomized, torch.svd_lowrank)

    def validate(self) -> None:
        super().validate()
        _check_galore_options(self.rank, self.update_proj_gap, self.scale, self.proj_type)
        _check(isinstance(self.layerwise, bool), "layerwise", self.layerwise, "true or false")
        _check(self.svd in ("exact", "lowrank"), "svd", self.svd, "exact | lowrank")
        _check(bool(self.targets), "targets", self.targets, "a non-empty module spec")


@register("galore")
class GaLore(Variant):
    """Options: rank, targets, update_proj_gap, scale, proj_type.

    Every parameter trains (``train_head`` does not freeze anything: GaLore is full-parameter training);
    the targeted Linear weights get projected Adam states, everything else plain AdamW states.
    """

    optimizer_class = GaLoreAdamW

    Config = GaLoreConfig

    def apply(self, model: nn.Module) -> nn.Module:
        reject_quantized(model, self.name)
        self.base_params = sum(p.numel() for p in model.parameters())
        self.target_modules = list(self._targeted_weights(model))  # Linear modules whose weight is projected
        return model.requires_grad_(True)

    def _targeted_weights(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """{module name: weight} of the targeted Linear layers; checks the rank fits each of them."""
        out = {}
        for name in self.target_names(model):
            w = model.get_submodule(name).weight
            if self.cfg.rank > min(w.shape):
                raise VariantError(f"invalid option rank={self.cfg.rank}: expected <= {min(w.shape)}, "
                                   f"the smaller side of {name!r} ({w.shape[0]}x{w.shape[1]})")
            out[name] = w
        return out

    def param_groups(self, model: nn.Module, lr: float, weight_decay: float = 0.0) -> list[dict]:
        """Plain groups as the base class (decay on matrices only) plus one projected group."""
        targeted = {id(w) for w in self._targeted_weights(model).values()}
        projected, decay, no_decay = [], [], []
        for _, p in trainable(model):
            if id(p) in targeted:
                projected.append(p)
            else:
                (decay if p.ndim >= 2 else no_decay).append(p)
        c = self.cfg
        groups = [{"params": decay, "lr": lr, "weight_decay": weight_decay},
                  {"params": no_decay, "lr": lr, "weight_decay": 0.0},
                  {"params": projected, "lr": lr, "weight_decay": weight_decay, "rank": c.rank,
                   "update_proj_gap": c.update_proj_gap, "scale": c.scale, "proj_type": c.proj_type,
                   "svd": c.svd}]
        return [g for g in groups if g["params"]]

    def optimizer(self, model: nn.Module, lr: float, weight_decay: float = 0.0,
                  betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> torch.optim.Optimizer:
        opt = super().optimizer(model, lr, weight_decay, betas, eps)
        if self.cfg.layerwise:
            opt.update_in_backward()
        return opt

    def summary(self, model: nn.Module) -> dict:
        """The projected weights' shapes (out, in) and the rank: what GaLore Table 1's memory counts need."""
        return {"rank": self.cfg.rank,
                "projected": {n: list(model.get_submodule(n).weight.shape) for n in self.target_modules}}

    def check_optim(self, grad_clip: float, grad_accum: int) -> None:
        if self.cfg.layerwise and (grad_clip > 0 or grad_accum > 1):
            bad = f"optim.grad_clip={grad_clip}" if grad_clip > 0 else f"optim.grad_accum={grad_accum}"
            raise VariantError(f"galore: layerwise=true updates each weight inside backward, so it cannot clip by "
                               f"the global gradient norm or accumulate gradients ({bad}): set optim.grad_clip=0 "
                               "and optim.grad_accum=1")
