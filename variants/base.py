"""The variant interface and registry.

A *variant* is one fine-tuning method. It owns exactly three things, so that the shared trainer never
needs to know which method it is running:

1. **model surgery** — ``apply(model)`` freezes what must stay frozen, wraps the targeted ``nn.Linear``
   modules and returns the model;
2. **the optimizer** — ``optimizer(model, lr, ...)`` (built from ``param_groups``; LoRA+ changes the
   groups, GaLore returns its own projected AdamW);
3. **per-step hooks** — ``after_step(model, step, total_steps)`` runs after ``optimizer.step()`` and
   before ``zero_grad()`` (AdaLoRA's rank allocation), ``extra_loss(model)`` is added to the task loss
   (AdaLoRA's orthogonality penalty), ``can_restore()`` says whether the current weights may be restored
   as the final model (``optim.select_best``).

Plus ``identity()`` (rank, alpha, scaling, targets as resolved: what names the setting in a record),
``summary(model)`` (method state for the run record), ``merge``/``unmerge`` where the method allows
it, ``adapter_state``/``save_adapter`` (safetensors) and ``cost`` (parameter counts, weight, trainable and
optimizer-state bytes).

Usage, without Hydra or the trainer::

    import variants
    v = variants.create("dora", rank=8, alpha=16, targets=["query", "value"])
    model = v.apply(model)
    opt = v.optimizer(model, lr=5e-4)
    for step, batch in enumerate(batches):
        loss = model(**batch).loss + v.extra_loss(model)
        loss.backward(); opt.step(); v.after_step(model, step, total_steps); opt.zero_grad()

Every option is a dataclass field, validated on construction; a bad value raises ``VariantError`` whose
one-line message names the option.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .targets import head_module_names, resolve_targets

_REGISTRY: dict[str, type[Variant]] = {}


class VariantError(ValueError):
    """A bad variant option or a model the variant cannot be applied to (one-line message)."""


def register(name: str):
    """Class decorator: make a variant available as ``variants.create(name, ...)``."""

    def deco(cls):
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def available() -> list[str]:
    return sorted(_REGISTRY)


def get(name: str) -> type[Variant]:
    if name not in _REGISTRY:
        raise VariantError(f"unknown variant {name!r} (available: {', '.join(available())})")
    return _REGISTRY[name]


def create(name: str, **options: Any) -> Variant:
    return get(name)(**options)


# ----------------------------------------------------------------------------------------------- configs


DEFAULT_HEAD = ("classifier", "score", "lm_head")


@dataclass
class BaseConfig:
    """Options every variant has: which modules form the task head, and whether it trains.

    ``None`` means "the task's": the entry point passes the task's head and whether it trains (a new
    classifier must train, a tied LM head must not); without a task, DEFAULT_HEAD and True.
    """

    head: tuple[str, ...] | None = None  # never wrapped by an adapter; trainable if train_head
    train_head: bool | None = None

    def validate(self) -> None:
        if isinstance(self.head, str):
            self.head = (self.head,)
        _check(self.head is None or all(isinstance(h, str) and h for h in self.head),
               "head", self.head, "null or a list of module names")
        _check(self.train_head is None or isinstance(self.train_head, bool), "train_head", self.train_head,
               "null, true or false")

    @property
    def heads(self) -> tuple[str, ...]:
        return DEFAULT_HEAD if self.head is None else tuple(self.head)

    @property
    def trains_head(self) -> bool:
        return True if self.train_head is None else self.train_head


@dataclass
class LowRankConfig(BaseConfig):
    """Options shared by the methods that add a low-rank update to targeted Linear layers."""

    # r = 8 on query/value: the LoRA paper's GLUE setting (§7.1, Table 9: alpha 8 for RoBERTa-base, 16 for
    # large; the authors' base scripts pass 16)
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05  # on the adapter's input, as in peft's examples (peft's LoraConfig default: 0)
    scaling: str = "standard"  # "standard": alpha/rank (Hu et al.); "rslora": alpha/sqrt(rank) (Kalajdzievski)
    # suffix list | regex string | "all-linear" | preset name (targets.py); None: the task's default targets
    # (text tasks: qv), and the qv preset without a task
    targets: Any = None

    def validate(self) -> None:
        super().validate()
        _check(isinstance(self.rank, int) and not isinstance(self.rank, bool) and self.rank > 0,
               "rank", self.rank, "a positive integer")
        _check(_is_number(self.alpha) and self.alpha > 0, "alpha", self.alpha, "a positive number")
        _check(_is_number(self.dropout) and 0 <= self.dropout < 1, "dropout", self.dropout, "in [0, 1)")
        _check(self.scaling in ("standard", "rslora"), "scaling", self.scaling, "'standard' or 'rslora'")
        _check(self.targets is None or bool(self.targets), "targets", self.targets,
               "null or a non-empty module spec")

    @property
    def scale(self) -> float:
        return lora_scale(self.alpha, self.rank, self.scaling)


def lora_scale(alpha: float, rank: int, scaling: str) -> float:
    """s in h = W0 x + s·BAx: alpha/r (LoRA, eq. 4) or alpha/sqrt(r) (rsLoRA, Thm 3.2)."""
    return alpha / (math.sqrt(rank) if scaling == "rslora" else rank)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check(ok: bool, option: str, value: Any, expected: str) -> None:
    if not ok:
        raise VariantError(f"invalid option {option}={value!r}: expected {expected}")


# ----------------------------------------------------------------------------------------------- variant


class Variant:
    """Base class: defaults that suit most methods (AdamW over trainable params, no hooks)."""

    name: ClassVar[str] = "?"
    Config: ClassVar[type[BaseConfig]] = BaseConfig

    def __init__(self, **options: Any):
        known = {f.name for f in dataclasses.fields(self.Config)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise VariantError(
                f"variant {self.name!r} has no option {unknown[0]!r} (options: {', '.join(sorted(known))})"
            )
        self.cfg = self.Config(**options)
        self.cfg.validate()
        # resolved state, set by apply(); the options in self.cfg are never changed
        self.base_params: int | None = None  # parameter count of the model before apply()
        self.target_modules: list[str] | None = None  # the modules apply() adapted, where targeted
        self.rank: int | None = getattr(self.cfg, "rank", None)  # the rank in use (LoRA: from param_budget)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.cfg})"

    # -- 1. model surgery ------------------------------------------------------------------------------
    def apply(self, model: nn.Module) -> nn.Module:
        """Freeze the model, adapt it, and unfreeze the head when ``train_head``. Returns the model."""
        self.base_params = count_params(model)
        model.requires_grad_(False)
        self._adapt(model)
        if self.cfg.trains_head:
            for name in head_module_names(model, self.cfg.heads):
                model.get_submodule(name).requires_grad_(True)
        return model

    def _adapt(self, model: nn.Module) -> None:
        """Method-specific surgery; the model arrives fully frozen."""

    def target_names(self, model: nn.Module) -> list[str]:
        targets = "qv" if self.cfg.targets is None else self.cfg.targets
        return resolve_targets(model, targets, head=self.cfg.heads)

    # -- 2. optimizer ---------------------------------------------------------------------------------
    optimizer_class: ClassVar[type[torch.optim.Optimizer]] = torch.optim.AdamW
    def param_groups(self, model: nn.Module, lr: float, weight_decay: float = 0.0) -> list[dict]:
        """Weight decay on matrices only (biases, norms, DoRA magnitudes and scalars are not decayed)."""
        decay, no_decay = [], []
        for _, p in trainable(model):
            (decay if p.ndim >= 2 else no_decay).append(p)
        groups = [{"params": decay, "lr": lr, "weight_decay": weight_decay},
                  {"params": no_decay, "lr": lr, "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]

    def optimizer(self, model: nn.Module, lr: float, weight_decay: float = 0.0,
                  betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> torch.optim.Optimizer:
        groups = self.param_groups(model, lr, weight_decay)
        if not groups:
            raise VariantError(f"variant {self.name!r} left no trainable parameter in the model")
        return self.optimizer_class(groups, lr=lr, betas=tuple(betas), eps=eps)

    # -- 3. per-step hooks ----------------------------------------------------------------------------
    def extra_loss(self, model: nn.Module) -> torch.Tensor | float:
        """Added to the task loss before backward (AdaLoRA's orthogonality penalty)."""
        return 0.0

    def after_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        """Runs after optimizer.step(), before zero_grad() (gradients still present)."""

    def check_optim(self, grad_clip: float, grad_accum: int) -> None:
        """Raise ``VariantError`` if the method cannot train with these optimisation options (GaLore's
        layer-wise update: no global-norm clipping, no accumulation); called before training starts."""

    def state_dict(self) -> dict:
        """The method's own state between steps, beyond the weights and the optimizer (AdaLoRA's importance
        averages and rank pattern): saved in a training checkpoint, tensors and plain Python values only."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()`` (resuming from a checkpoint, after ``apply``)."""

    def check_steps(self, total_steps: int) -> None:
        """Raise ``VariantError`` if the method cannot run for ``total_steps`` steps (AdaLoRA: its budget
        schedule must fit); called before training starts, so a bad schedule is a config error."""

    def can_restore(self) -> bool:
        """Whether the current trainable weights are a state the method may end in, i.e. a candidate for
        best-on-validation restoring (``optim.select_best``). AdaLoRA: only once its rank pattern is final."""
        return True

    def summary(self, model: nn.Module) -> dict | None:
        """Method-specific state for the run record (``variant_state``), JSON-able; None when there is none
        (AdaLoRA: the final rank pattern per module and the budget schedule)."""
        return None

    def identity(self) -> dict:
        """The fields that name this setting in a run record and a table: rank, alpha, scaling and the
        targeted modules, resolved (after ``apply``: the rank a ``param_budget`` gave, the module names the
        targets matched); None where the method has no such option. Its other options are in the record's
        config, and tables show those that vary."""
        return {"rank": self.rank, "alpha": getattr(self.cfg, "alpha", None),
                "scaling": getattr(self.cfg, "scaling", None), "targets": self.target_modules}

    # -- merge, save, cost ----------------------------------------------------------------------------
    mergeable: ClassVar[bool] = False

    def merge(self, model: nn.Module) -> nn.Module:
        raise VariantError(f"variant {self.name!r} has no separate adapter to merge")

    def unmerge(self, model: nn.Module) -> nn.Module:
        raise VariantError(f"variant {self.name!r} has no separate adapter to unmerge")

    @contextlib.contextmanager
    def merged_for_eval(self, model: nn.Module) -> Iterator[bool]:
        """The model with its adapter merged into the frozen weights for an evaluation (``eval_merged``),
        then restored exactly; yields whether it merged. Here: never (the model evaluates as it is)."""
        yield False

    def adapter_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The tensors that, with the base checkpoint, reproduce the fine-tuned model."""
        return {n: p.detach() for n, p in trainable(model)}

    def variant_config(self) -> dict:
        return {"variant": self.name, **dataclasses.asdict(self.cfg)}

    def peft_config(self, model: nn.Module) -> dict | None:
        """peft's adapter_config.json for this adapter, where peft can load it; None otherwise."""
        return None

    def save_adapter(self, model: nn.Module, directory: str | os.PathLike) -> int:
        """Write ``adapter_model.safetensors``, ``lorabench_variant.json`` (our options) and, where peft
        can load the adapter, peft's ``adapter_config.json``. Returns the tensor bytes written."""
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.adapter_state(model).items()}
        save_file(state, os.path.join(directory, "adapter_model.safetensors"))
        configs = {"lorabench_variant.json": self.variant_config(), "adapter_config.json": self.peft_config(model)}
        for fname, cfg in configs.items():
            if cfg is not None:
                with open(os.path.join(directory, fname), "w") as f:
                    json.dump(cfg, f, indent=2, default=list)
        return sum(t.numel() * t.element_size() for t in state.values())

    def cost(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
        """Parameter counts (``trainable_pct`` is relative to the base model) and optimizer-state bytes."""
        total = count_params(model)
        n_trainable = sum(p.numel() for _, p in trainable(model))
        base = self.base_params or total
        return {
            "trainable_params": n_trainable,
            "total_params": total,
            "base_params": base,
            "trainable_pct": 100.0 * n_trainable / base,
            # the static memory breakdown the LoRA and GaLore papers tabulate (gradients: measured by the trainer)
            "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            "trainable_bytes": sum(p.numel() * p.element_size() for _, p in trainable(model)),
            "optimizer_state_bytes": optimizer_state_bytes(optimizer) if optimizer is not None else None,
            "adapter_bytes": sum(t.numel() * t.element_size() for t in self.adapter_state(model).values()),
        }


def numel(p: torch.Tensor) -> int:
    """Weights in ``p``: a bitsandbytes 4-bit parameter packs two per byte, its quant_state has the shape."""
    state = getattr(p, "quant_state", None)
    return math.prod(state.shape) if state is not None and getattr(state, "shape", None) else p.numel()


def count_params(model: nn.Module) -> int:
    return sum(numel(p) for p in model.parameters())


def reject_quantized(model: nn.Module, name: str) -> None:
    """Full-parameter methods train every weight: a bitsandbytes-quantized base cannot be one of them."""
    for n, p in model.named_parameters():
        if type(p).__name__ in ("Params4bit", "Int8Params"):
            raise VariantError(f"variant {name!r} trains every weight, and {n} is quantized "
                               "(model.quantize); use model.quantize=none, or an adapter method")


def trainable(model: nn.Module) -> Iterable[tuple[str, nn.Parameter]]:
    return ((n, p) for n, p in model.named_parameters() if p.requires_grad)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor held in the optimizer state (moments, projectors, step counters)."""

    def size(x) -> int:
        if torch.is_tensor(x):
            return x.numel() * x.element_size()
        if isinstance(x, dict):
            return sum(size(v) for v in x.values())
        if isinstance(x, (list, tuple)):
            return sum(size(v) for v in x)
        if hasattr(x, "__dict__"):  # e.g. galore-torch keeps a projector object in the state
            return sum(size(v) for v in vars(x).values())
        return 0

    return sum(size(s) for s in optimizer.state.values())
