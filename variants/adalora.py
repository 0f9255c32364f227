"""AdaLoRA (Zhang et al., ICLR 2023): an SVD-shaped update ΔW = P Λ Q whose rank budget is re-allocated
across the adapted matrices during training, by importance, from ``init_r`` per matrix down to an average
of ``rank`` (the *target* rank, so a rank sweep compares AdaLoRA at its final budget).

What happens each step (the trainer needs nothing AdaLoRA-specific, cf. peft issue #1327):

- ``extra_loss`` adds ``orth_reg_weight`` x the orthogonality penalty on P and Q;
- ``after_step(model, step, total_steps)`` (after ``optimizer.step()``, gradients still present) updates
  the importance EMAs and, every ``deltaT`` steps, zeroes the least important singular values so that the
  kept total follows the cubic budget schedule; from ``total_steps - tfinal`` on the rank pattern is fixed
  and re-applied after every step.

Semantics follow peft 0.21's ``AdaLoraModel`` / ``RankAllocator`` (``update_and_allocate(global_step)``)
step for step; ``tests/test_parity_adalora.py`` checks scores, rank patterns and weights against it.
The code here is our own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import LowRankConfig, VariantError, _check, _is_number, register
from .lora import LoRA, LoRALinear, adapter_layers
from .targets import head_module_names

# ----------------------------------------------------------------------------------------------- layer


class AdaLoRALinear(LoRALinear):
    """h = W0 x + B (A ⊙ E) dropout(x) · alpha / (ranknum + 1e-5).

    ``lora_B`` (out x r) is P, ``lora_E`` (r x 1) the diagonal of Λ, ``lora_A`` (r x in) is Q — peft's
    names and shapes. ``ranknum`` (a buffer) stays at the initial rank r, so masking singular values does
    not change the scale of the ones that are kept (as in peft, whose ``ranknum`` is never updated).
    """

    def __init__(self, base_layer: nn.Module, rank: int, alpha: float, dropout: float = 0.0):
        # LoRALinear builds A, B and calls our reset_parameters(), which also creates E
        super().__init__(base_layer, rank, alpha, dropout)
        self.register_buffer("ranknum", self.lora_A.new_full((1,), float(rank)))

    def reset_parameters(self, init: str | None = None) -> None:
        # as the paper and peft: Λ = 0 so the model starts at W0; P, Q ~ N(0, 0.02²) (peft's std)
        if "lora_E" not in self._parameters:
            self.lora_E = nn.Parameter(self.lora_A.new_zeros(self.rank, 1))
        nn.init.zeros_(self.lora_E)
        nn.init.normal_(self.lora_A, mean=0.0, std=0.02)
        nn.init.normal_(self.lora_B, mean=0.0, std=0.02)

    def lora_in(self, x: torch.Tensor) -> torch.Tensor:
        """Λ Q dropout(x) · alpha/(ranknum + 1e-5), (..., r): eq. 1's ΔW = PΛQ before P (LoRALinear.forward
        accumulates P's product into the base output)."""
        scale = self.scaling / (self.ranknum + 1e-5)
        return F.linear(self.lora_dropout(x).to(self.lora_A.dtype), self.lora_A * self.lora_E) * scale

    @property
    def update_scale(self) -> float:
        return float(self.scaling / (self.ranknum + 1e-5))

    def delta(self) -> torch.Tensor:
        """ΔW = P Λ Q · alpha/(ranknum + 1e-5) (eq. 1), (out, in)."""
        return (self.lora_B @ (self.lora_A * self.lora_E)) * self.scaling / (self.ranknum + 1e-5)

    def extra_repr(self) -> str:
        return f"init_rank={self.rank}, alpha={self.scaling:g}, merged={self.merged}"


def orthogonality_penalty(layers: list[AdaLoRALinear]) -> torch.Tensor | float:
    """Mean over the P and Q matrices of ‖PᵀP − I‖_F and ‖QQᵀ − I‖_F (eq. 4's R(P, Q)).

    Eq. 4 writes the Frobenius norms *squared*; peft (``AdaLoraModel.forward``) uses the plain norm and
    averages over the 2·(number of layers) matrices. We follow peft, so ``orth_reg_weight`` means the same.
    """
    total, count = 0.0, 0
    for layer in layers:
        r = layer.lora_A.shape[0]
        eye = torch.eye(r, dtype=layer.lora_A.dtype, device=layer.lora_A.device)
        total = total + torch.linalg.matrix_norm(layer.lora_A @ layer.lora_A.T - eye)  # Q Qᵀ − I
        total = total + torch.linalg.matrix_norm(layer.lora_B.T @ layer.lora_B - eye)  # Pᵀ P − I
        count += 2
    return total / count if count else 0.0


# ----------------------------------------------------------------------------------------------- config


def _is_step_spec(x: Any) -> bool:
    """An int >= 0 (steps) or a float in [0, 1) (a fraction of total_steps)."""
    if isinstance(x, bool):
        return False
    if isinstance(x, int):
        return x >= 0
    return isinstance(x, float) and math.isfinite(x) and 0 <= x < 1


def _steps(spec: int | float, total_steps: int) -> int:
    return spec if isinstance(spec, int) else int(round(spec * total_steps))


@dataclass
class AdaLoRAConfig(LowRankConfig):
    """``rank`` is the TARGET average rank (peft's ``target_r``); every matrix starts at ``init_r``.

    Defaults for the schedule, as fractions of the run so they scale with any ``total_steps``: the
    paper's GLUE scripts (DeBERTaV3-base, QingruZhang/AdaLoRA NLU/scripts) use t_i ≈ 10-15 % and
    t_f ≈ 45-60 % of training (MNLI: t_i = 8000, t_f = 50000 of ~86k steps; RTE: 600 / 1800 of ~3.9k)
    and ΔT between 1 and 100 (README quick start: 500 / 1500 of 3000 steps, ΔT = 10); β1 = β2 = 0.85
    throughout. ``orth_reg_weight`` defaults to peft's 0.5 (the paper's scripts use γ = 0.1-0.3).
    """

    init_r: int | None = None  # None: ceil(1.5 · rank) (peft's default 12 -> target 8)
    tinit: int | float = 0.1  # initial warm-up at full budget: steps (int) or fraction of total_steps
    tfinal: int | float = 0.5  # final fine-tuning with the rank pattern fixed: steps or fraction
    deltaT: int = 10  # a budget allocation every deltaT steps during the cubic phase
    beta1: float = 0.85  # EMA of the sensitivity (eq. 8)
    beta2: float = 0.85  # EMA of the uncertainty (eq. 9)
    orth_reg_weight: float = 0.5  # γ: weight of the orthogonality penalty

    def validate(self) -> None:
        super().validate()
        _check(self.scaling == "standard", "scaling", self.scaling,
               "'standard' (AdaLoRA scales by alpha/init_r, as peft; rsLoRA scaling is not defined for it)")
        _check(self.init_r is None or (isinstance(self.init_r, int) and not isinstance(self.init_r, bool)
                                       and self.init_r > 0), "init_r", self.init_r, "a positive integer or None")
        if self.initial_rank < self.rank:
            raise VariantError(f"invalid option init_r={self.init_r!r}: the initial rank must be >= the "
                               f"target rank target_r (option rank={self.rank}); AdaLoRA only prunes")
        for opt in ("tinit", "tfinal"):
            _check(_is_step_spec(getattr(self, opt)), opt, getattr(self, opt),
                   "an int >= 0 (steps) or a float in [0, 1) (fraction of total_steps)")
        if isinstance(self.tinit, float) and isinstance(self.tfinal, float) and self.tinit + self.tfinal >= 1:
            raise VariantError(f"invalid options tinit={self.tinit!r}, tfinal={self.tfinal!r}: their sum "
                               "must be < 1 to leave a budgeting phase")
        _check(isinstance(self.deltaT, int) and not isinstance(self.deltaT, bool) and self.deltaT > 0,
               "deltaT", self.deltaT, "a positive integer (steps between allocations)")
        for opt in ("beta1", "beta2"):
            v = getattr(self, opt)
            _check(_is_number(v) and 0 < v < 1, opt, v, "in (0, 1)")
        _check(_is_number(self.orth_reg_weight) and self.orth_reg_weight >= 0, "orth_reg_weight",
               self.orth_reg_weight, "a number >= 0")

    @property
    def initial_rank(self) -> int:
        """init_r, resolved: ceil(1.5 · rank) where it is None."""
        return math.ceil(1.5 * self.rank) if self.init_r is None else self.init_r

    @property
    def scale(self) -> float:
        """The effective s in h = W0 x + s·PΛQx: alpha / (init_r + 1e-5), fixed for the whole run."""
        return self.alpha / (self.initial_rank + 1e-5)

    def schedule(self, total_steps: int) -> tuple[int, int]:
        """(tinit, tfinal) in steps for a run of ``total_steps``; raises unless a budgeting phase is left."""
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps <= 0:
            raise VariantError(f"adalora: total_steps={total_steps!r} must be a positive integer")
        tinit, tfinal = _steps(self.tinit, total_steps), _steps(self.tfinal, total_steps)
        if tinit + tfinal >= total_steps:
            raise VariantError(f"adalora: tinit={self.tinit!r} ({tinit} steps) + tfinal={self.tfinal!r} "
                               f"({tfinal} steps) must be < total_steps={total_steps}, to leave a budgeting "
                               "phase; lower tinit/tfinal or train longer")
        return tinit, tfinal


# ----------------------------------------------------------------------------------------------- allocator


class RankAllocator:
    """Importance EMAs per adapter parameter and the budget schedule (peft's ``RankAllocator`` semantics).

    State is keyed by the parameter's name in the model, e.g. ``bert.encoder.layer.0.output.dense.lora_A``.
    """

    PARAMS = ("lora_A", "lora_B", "lora_E")

    def __init__(self, ranks: dict[str, int], target_rank: int, beta1: float, beta2: float):
        self.beta1, self.beta2 = beta1, beta2
        self.init_budget = sum(ranks.values())  # the initial rank of each adapted layer, by name
        self.target_budget = target_rank * len(ranks)
        self.reset()

    def state_dict(self) -> dict:
        return {"ipt": self.ipt, "ema_ipt": self.ema_ipt, "ema_unc": self.ema_unc}

    def load_state_dict(self, state: dict) -> None:
        self.ipt, self.ema_ipt, self.ema_unc = dict(state["ipt"]), dict(state["ema_ipt"]), dict(state["ema_unc"])

    def reset(self) -> None:
        self.ipt: dict[str, torch.Tensor] = {}  # I = |w · ∂L/∂w|, the latest sensitivity
        self.ema_ipt: dict[str, torch.Tensor] = {}  # Ī (eq. 8)
        self.ema_unc: dict[str, torch.Tensor] = {}  # Ū (eq. 9)

    def budget(self, step: int, tinit: int, tfinal: int, total_steps: int, delta_t: int) -> tuple[int, bool]:
        """(b(t), whether to mask at this step): eq. 12's cubic schedule from b(0) to b(T)."""
        if step <= tinit:
            return self.init_budget, False
        if step > total_steps - tfinal:
            return self.target_budget, True
        left = 1 - (step - tinit) / (total_steps - tfinal - tinit)
        budget = int((self.init_budget - self.target_budget) * left**3 + self.target_budget)
        return budget, step % delta_t == 0

    @torch.no_grad()
    def update(self, layers: dict[str, AdaLoRALinear]) -> None:
        for lname, layer in layers.items():
            for pname in self.PARAMS:
                p = getattr(layer, pname)
                key = f"{lname}.{pname}"
                if p.grad is None:
                    raise VariantError(f"adalora: {key} has no gradient in after_step; call it after "
                                       "optimizer.step() and before optimizer.zero_grad()")
                if key not in self.ema_ipt:
                    self.ema_ipt[key] = torch.zeros_like(p)
                    self.ema_unc[key] = torch.zeros_like(p)
                ipt = (p * p.grad).abs()  # sensitivity |w ∂L/∂w|
                self.ipt[key] = ipt
                self.ema_ipt[key] = self.beta1 * self.ema_ipt[key] + (1 - self.beta1) * ipt  # eq. 8
                self.ema_unc[key] = (self.beta2 * self.ema_unc[key]  # eq. 9
                                     + (1 - self.beta2) * (ipt - self.ema_ipt[key]).abs())

    def element_score(self, key: str) -> torch.Tensor:
        return self.ema_ipt[key] * self.ema_unc[key]  # s = Ī · Ū (eq. 10)

    def triplet_scores(self, layers: dict[str, AdaLoRALinear]) -> dict[str, torch.Tensor]:
        """S_i = s(λ_i) + mean_j s(Q_ij) + mean_k s(P_ki) per layer, a vector of length r (eq. 11)."""
        out = {}
        for lname in layers:
            s_q = self.element_score(f"{lname}.lora_A").mean(dim=1)  # Q = lora_A: r x in
            s_p = self.element_score(f"{lname}.lora_B").mean(dim=0)  # P = lora_B: out x r
            out[lname] = self.element_score(f"{lname}.lora_E").view(-1) + (s_q + s_p)
        return out


# ----------------------------------------------------------------------------------------------- variant


@register("adalora")
class AdaLoRA(LoRA):
    """Options: rank (TARGET average rank), init_r, alpha, dropout, targets, tinit, tfinal, deltaT, beta1,
    beta2, orth_reg_weight.

    After training, ``rank_pattern`` ({module: [kept?] * init_r}) and ``effective_ranks()`` tell where
    the budget went; ``summary()`` gathers them, with the budget schedule, for a run record.
    """

    Config = AdaLoRAConfig
    layer_cls = AdaLoRALinear
    mergeable = True

    def __init__(self, **options: Any):
        super().__init__(**options)
        self.allocator: RankAllocator | None = None
        self.rank_pattern: dict[str, list[bool]] | None = None  # the latest allocation (None: none yet)
        self.last_scores: dict[str, list[float]] | None = None  # triplet scores S_i used for it
        self.budget: int | None = None  # the budget b(t) of the latest after_step
        self.final: bool = False  # the rank pattern is fixed (step >= total_steps - tfinal)
        self.total_steps: int | None = None
        self.budgets: list[tuple[int, int]] = []  # (step, b(t)) at every allocation, the final one included
        self._layer_ranks: dict[str, int] = {}

    embeddings = False

    def check_steps(self, total_steps: int) -> None:
        self.cfg.schedule(total_steps)  # raises unless tinit + tfinal leave a budgeting phase

    def make_layer(self, linear: nn.Module) -> AdaLoRALinear:
        if isinstance(linear, nn.Embedding):
            raise VariantError("variant 'adalora' cannot adapt an nn.Embedding (LoRA can); leave it out of the "
                               "targets")
        c = self.cfg
        return AdaLoRALinear(linear, c.initial_rank, c.alpha, c.dropout)

    def _adapt(self, model: nn.Module) -> None:
        super()._adapt(model)
        self._layer_ranks = {n: layer.rank for n, layer in adapter_layers(model, AdaLoRALinear)}

    @staticmethod
    def _layers(model: nn.Module) -> dict[str, AdaLoRALinear]:
        return dict(adapter_layers(model, AdaLoRALinear))

    # -- hooks ----------------------------------------------------------------------------------------
    def extra_loss(self, model: nn.Module) -> torch.Tensor | float:
        if self.cfg.orth_reg_weight == 0:
            return 0.0
        return self.cfg.orth_reg_weight * orthogonality_penalty(list(self._layers(model).values()))

    def after_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        """peft's ``update_and_allocate(global_step=step)`` with ``total_step=total_steps``."""
        tinit, tfinal = self.cfg.schedule(total_steps)
        layers = self._layers(model)
        if not layers:
            raise VariantError("adalora: after_step found no AdaLoRA layer in the model (apply() it first)")
        if self.allocator is None:
            self.allocator = self._new_allocator()
        self.total_steps = total_steps
        end = total_steps - tfinal  # the step at which the rank pattern becomes final
        alloc = self.allocator
        if step < end:  # budgeting phase (and the initial warm-up)
            alloc.update(layers)
            self.budget, mask_now = alloc.budget(step, tinit, tfinal, total_steps, self.cfg.deltaT)
            if mask_now:
                self._mask_to_budget(layers, self.budget)
                self.budgets.append((step, self.budget))
        elif not self.final:  # step == end: fix the final pattern (also reached if step `end` was skipped)
            if not alloc.ema_ipt:  # no score yet (after_step never ran before the final phase)
                alloc.update(layers)
            self.budget = alloc.target_budget
            self._mask_to_budget(layers, self.budget)  # with the scores of the previous step, as peft
            self.budgets.append((step, self.budget))
            self.final = True
            alloc.reset()
        else:  # final fine-tuning: keep the pruned singular values at zero
            self.budget = alloc.target_budget
            self._apply_pattern(layers)

    _STATE = ("rank_pattern", "last_scores", "budget", "final", "total_steps", "budgets")

    def _new_allocator(self) -> RankAllocator:
        return RankAllocator(self._layer_ranks, self.cfg.rank, self.cfg.beta1, self.cfg.beta2)

    def state_dict(self) -> dict:
        return {**{k: getattr(self, k) for k in self._STATE},
                "allocator": None if self.allocator is None else self.allocator.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        for k in self._STATE:
            setattr(self, k, state[k])
        self.budgets = [tuple(b) for b in self.budgets]
        self.allocator = None
        if state["allocator"] is not None:
            self.allocator = self._new_allocator()
            self.allocator.load_state_dict(state["allocator"])

    @torch.no_grad()
    def _mask_to_budget(self, layers: dict[str, AdaLoRALinear], budget: int) -> None:
        """Zero λ_i for every triplet whose score is among the (b(0) − b(t)) lowest (ties included)."""
        scores = self.allocator.triplet_scores(layers)
        k = self.allocator.init_budget - budget
        if k > 0:
            threshold = torch.kthvalue(torch.cat(list(scores.values())), k).values.item()
        else:  # nothing to remove (init_r == rank); peft's kthvalue(k=0) would raise here
            threshold = -math.inf
        self.rank_pattern = {}
        for lname, layer in layers.items():
            drop = scores[lname] <= threshold
            layer.lora_E.masked_fill_(drop.view(-1, 1), 0.0)
            self.rank_pattern[lname] = (~drop).tolist()
        self.last_scores = {n: s.tolist() for n, s in scores.items()}

    @torch.no_grad()
    def _apply_pattern(self, layers: dict[str, AdaLoRALinear]) -> None:
        for lname, layer in layers.items():
            keep = torch.tensor(self.rank_pattern[lname], device=layer.lora_E.device)
            layer.lora_E.masked_fill_(~keep.view(-1, 1), 0.0)

    # -- reporting ------------------------------------------------------------------------------------
    def effective_ranks(self) -> dict[str, int]:
        """Singular values each adapted module keeps under the latest allocation (init_r before any)."""
        if self.rank_pattern is None:
            return dict(self._layer_ranks)
        return {n: int(sum(keep)) for n, keep in self.rank_pattern.items()}

    def can_restore(self) -> bool:
        """Only weights under the final rank pattern are a model AdaLoRA may end with: an earlier state
        holds more singular values than the final budget allows (``optim.select_best`` skips it)."""
        return self.final

    def summary(self, model: nn.Module) -> dict:
        """The final allocation and the budget schedule b(t), JSON-able, for the run record."""
        ranks = self.effective_ranks()
        schedule = None
        if self.total_steps is not None:
            tinit, tfinal = self.cfg.schedule(self.total_steps)
            schedule = {"total_steps": self.total_steps, "tinit": tinit, "tfinal": tfinal, "deltaT": self.cfg.deltaT,
                        "budgets": [list(b) for b in self.budgets]}
        return {
            "final": self.final,
            "budget": self.budget,
            "init_budget": sum(self._layer_ranks.values()),
            "target_budget": self.cfg.rank * len(self._layer_ranks),
            "ranks": ranks,
            "mean_rank": sum(ranks.values()) / len(ranks) if ranks else None,
            "rank_pattern": self.rank_pattern,
            "schedule": schedule,
        }

    # -- saving: peft's AdaLoRA layout ----------------------------------------------------------------
    def adapter_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Keys ``base_model.model.<module>.lora_{A,B,E}`` (no ``.weight``), cut to the kept singular values
        when an allocation exists — what peft's ``save_pretrained`` writes for AdaLoRA (no ``ranknum``)."""
        state = {}
        for name, layer in adapter_layers(model, AdaLoRALinear):
            a, b, e = layer.lora_A.detach(), layer.lora_B.detach(), layer.lora_E.detach()
            if self.rank_pattern is not None and name in self.rank_pattern:
                keep = torch.tensor(self.rank_pattern[name], dtype=torch.bool, device=a.device)
                a, b, e = a[keep], b[:, keep], e[keep]
            prefix = f"base_model.model.{name}"
            state.update({f"{prefix}.lora_A": a, f"{prefix}.lora_B": b, f"{prefix}.lora_E": e})
        return {**state, **self.head_state(model)}

    def peft_config(self, model: nn.Module) -> dict:
        """peft's AdaLoraConfig fields, so that ``PeftModel.from_pretrained`` loads the saved adapter."""
        c = self.cfg
        heads = head_module_names(model, c.heads) if c.trains_head else []
        if self.total_steps is not None:
            total = self.total_steps
            tinit, tfinal = c.schedule(total)
        else:  # never trained: any valid schedule (it does not affect inference)
            total, tinit, tfinal = 1, 0, 0
        layers = adapter_layers(model, AdaLoRALinear)
        pattern = None
        if self.rank_pattern is not None:
            pattern = {f"{n}.lora_E": keep for n, keep in self.rank_pattern.items()}
        return {
            "peft_type": "ADALORA", "task_type": None, "base_model_name_or_path": None,
            "target_r": c.rank, "init_r": c.initial_rank, "tinit": tinit, "tfinal": tfinal, "deltaT": c.deltaT,
            "beta1": c.beta1, "beta2": c.beta2, "orth_reg_weight": c.orth_reg_weight, "total_step": total,
            "rank_pattern": pattern, "lora_alpha": c.alpha, "lora_dropout": c.dropout,
            "target_modules": [n for n, _ in layers],
            "modules_to_save": [h.rpartition(".")[2] for h in heads] or None,
            "init_lora_weights": True, "bias": "none", "use_dora": False,
            "fan_in_fan_out": bool(layers) and all(m.fan_in_fan_out for _, m in layers),  # Conv1D (GPT-2)
        }
