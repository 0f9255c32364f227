"""Any peft method as a contender: ``peft.get_peft_model`` built by a variant, trained by our trainer.

``variant=peft variant.method=<peft type> variant.config={...}`` turns any adapter-style ``PeftConfig``
(LoRA, DoRA, VeRA, MiSS, LoHa, LoKr, IA3, BOFT, ...) into a variant: the entry point, the shared trainer,
the records, the tables and the plots treat it exactly like the native methods. ``method`` is peft's PEFT
type name (case-insensitive), plus ``lora_fa``: LoRA-FA is not a ``PeftConfig`` in peft but an optimizer
(``peft.optimizers.create_lorafa_optimizer``: LoRA with A frozen and B's gradient projected), so
``lora_fa`` is a ``LoraConfig`` trained by that optimizer. ``rank`` is peft's ``r`` (one option for every
method that has one, as for the native methods); ``config`` holds that PeftConfig's other fields. The thin
subclasses (``peft_lora``, ``peft_dora``, ``peft_lora_fa``, ``peft_vera``, ``peft_miss``) fix the method and
carry its defaults as named options (``peft_lora``: ``rank``, ``alpha``, ``dropout``, ``scaling``, as our
``lora``), so every YAML composes to its dataclass and the composed config names every default.

What lorabench sets itself, so that every method trains on the same footing:
- ``target_modules``: unless ``config`` sets it, the ``targets`` spec (null: the task's default targets)
  resolved by ``resolve_targets`` to explicit module names (the task head is never targeted);
- ``modules_to_save``: the task head, when ``train_head`` (peft trains a copy of it and saves it with the
  adapter); checked after wrapping, so that exactly our head trains;
- the wrapper: a plain ``PeftModel`` (no ``task_type``), which forwards every argument to the model, so
  ``model(**batch)`` (text tasks) and ``model(x)`` (synthetic, digits) both work.

peft is imported here only, and only when such a variant is created: the native variants never import it.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .base import BaseConfig, Variant, VariantError, _check, _is_number, register
from .targets import head_module_names

LORA_FA = "lora_fa"
ADAPTER = "default"  # peft's adapter name

# methods a plain PeftModel trained by a generic loop cannot run faithfully
UNSUPPORTED = {
    "ADALORA": "its rank allocation needs update_and_allocate() every step; use variant=adalora "
               "(ours, parity-tested against peft)",
    "XLORA": "it needs pretrained LoRA experts and X-LoRA's own model wrapper",
    "POLY": "it routes by task_ids that no lorabench task provides",
    "ADAPTION_PROMPT": "a prompt method: it needs a task-specific PeftModel (task_type)",
}
# PeftConfig fields lorabench sets itself -> what sets them
RESERVED = {
    "peft_type": "variant.method",
    "task_type": "lorabench (a plain PeftModel: the task computes its own loss)",
    "modules_to_save": "variant.head and variant.train_head",
    "inference_mode": "lorabench (the adapter trains)",
    "base_model_name_or_path": "peft, from the model",
    "revision": "peft, from the model",
    "auto_mapping": "peft",
    "peft_version": "peft",
}


def _peft():
    try:
        import peft
    except ImportError as e:
        raise VariantError(f"the peft variants need peft (pip install 'peft>=0.17'): {e}") from None
    return peft


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def method_names() -> list[str]:
    """Every method name this peft accepts (lower case), ``lora_fa`` included."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    return sorted({str(getattr(t, "value", t)).lower() for t in PEFT_TYPE_TO_CONFIG_MAPPING} | {LORA_FA})


def config_class(method: str) -> type:
    """peft's ``PeftConfig`` subclass for ``method`` (``lora_fa``: ``LoraConfig``)."""
    peft = _peft()
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    if method == LORA_FA:
        return peft.LoraConfig
    by_name = {str(getattr(t, "value", t)).upper(): cls for t, cls in PEFT_TYPE_TO_CONFIG_MAPPING.items()}
    if method.upper() not in by_name:
        raise VariantError(f"invalid option method={method!r}: expected a peft method of peft {peft.__version__} "
                           f"({', '.join(method_names())})")
    return by_name[method.upper()]


def jsonable(x):
    """peft's config values as JSON: sets as sorted lists, enums as their value, dataclasses as dicts."""
    if isinstance(x, enum.Enum):
        return x.value
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (set, frozenset)):
        return sorted(jsonable(v) for v in x)
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return jsonable(dataclasses.asdict(x))
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    return str(x)


@dataclass
class PeftMethodConfig(BaseConfig):
    """Options of ``variant=peft``: a peft method and its config, plus ``head``/``train_head``/``targets``."""

    method: str = "lora"  # a peft PEFT type name (lora, vera, miss, loha, ...), or lora_fa
    # peft's `r` for the methods that have one (null: the config's, else peft's default): one option across
    # methods, so that a sweep `variant.rank=4,8` means the same for all of them
    rank: int | None = None
    # that PeftConfig's other fields as a map, e.g. {lora_alpha: 16, init_lora_weights: gaussian}; null:
    # peft's defaults. Set it whole (variant.config={...}) or key by key (+variant.config.<field>=...);
    # a target_modules here wins over `targets`
    config: Any = None
    # as the native methods: suffix list | regex | all-linear | preset; None: the task's default targets
    targets: Any = None

    def validate(self) -> None:
        super().validate()
        _check(isinstance(self.method, str) and bool(self.method), "method", self.method,
               "a peft method name, e.g. lora, vera, miss, lora_fa")
        _check(self.rank is None or (isinstance(self.rank, int) and not isinstance(self.rank, bool)
                                     and self.rank > 0), "rank", self.rank, "a positive integer or null")
        _check(self.config is None or (isinstance(self.config, dict) and all(isinstance(k, str) for k in self.config)),
               "config", self.config, "null or a map of the PeftConfig's fields, e.g. {lora_alpha: 16}")
        _check(self.targets is None or bool(self.targets), "targets", self.targets,
               "null or a non-empty module spec")

    def named_fields(self) -> dict[str, tuple[str, Any]]:
        """PeftConfig field -> (our option, its value), for the options that set a peft field."""
        return {} if self.rank is None else {"r": ("rank", self.rank)}


@register("peft")
class PeftMethod(Variant):
    """``peft.get_peft_model(model, <method>Config(**config))``, trained by the shared trainer."""

    Config = PeftMethodConfig
    fixed_method: ClassVar[str | None] = None  # the thin subclasses run one method only
    fixed_fields: ClassVar[dict] = {}  # PeftConfig fields that make the subclass its method (DoRA: use_dora)
    mergeable = True  # where peft's layers merge (most adapter methods); merge() says when they do not

    def __init__(self, **options: Any):
        super().__init__(**options)
        c = self.cfg
        self.method = c.method.lower()
        if self.fixed_method is not None and self.method != self.fixed_method:
            raise VariantError(f"invalid option method={c.method!r}: variant {self.name!r} runs method "
                               f"{self.fixed_method!r} (other methods: variant=peft variant.method={c.method})")
        self.config_cls = config_class(self.method)
        self.fields = {f.name for f in dataclasses.fields(self.config_cls)}
        named = c.named_fields()
        for key, value in (c.config or {}).items():
            if key in RESERVED and not (key == "task_type" and value is None):
                raise VariantError(f"invalid option config.{key}: lorabench sets it ({RESERVED[key]})")
            if key in named or key in self.fixed_fields:
                by = f"variant.{named[key][0]}" if key in named else f"variant {self.name!r}"
                raise VariantError(f"invalid option config.{key}: set by {by}")
            if key not in self.fields:
                known = sorted(self.fields - set(RESERVED))
                raise VariantError(f"invalid option config.{key}: peft's {self.config_cls.__name__} has no field "
                                   f"{key!r} (fields: {', '.join(known)})")
        for key, (option, _) in named.items():
            if key not in self.fields:
                raise VariantError(f"invalid option {option}={getattr(c, option)!r}: peft's "
                                   f"{self.config_cls.__name__} has no {key!r}")
        r = (c.config or {}).get("r")
        if r is not None:
            _check(isinstance(r, int) and not isinstance(r, bool) and r > 0, "config.r", r, "a positive integer")
        # what reaches peft: our named options, the subclass's fixed fields, then the config map
        self.options = {**{k: v for k, (_, v) in named.items()}, **self.fixed_fields, **(c.config or {})}
        peft_type = "LORA" if self.method == LORA_FA else self.method.upper()
        if peft_type in UNSUPPORTED:
            raise VariantError(f"invalid option method={c.method!r}: not supported, {UNSUPPORTED[peft_type]}")
        if issubclass(self.config_cls, _peft().PromptLearningConfig):
            raise VariantError(f"invalid option method={c.method!r}: prompt-learning methods need a task-specific "
                               "PeftModel (task_type); lorabench runs adapter methods only")
        trial = self._peft_config({})  # peft's own checks of the values, before any model exists
        if self.method == LORA_FA:
            # LoraFAOptimizer pairs each layer's two "lora" parameters (A, B): a third one breaks the pairing
            for key in ("use_dora", "lora_bias"):
                if getattr(trial, key, False):
                    raise VariantError(f"invalid option config.{key}=True: LoRA-FA's optimizer supports plain "
                                       "LoRA layers only (A and B)")
        self.peft_cfg = trial  # replaced by the resolved config in apply()
        self.rank = self._rank(trial)

    # -- the config ----------------------------------------------------------------------------------
    def _peft_config(self, extra: dict):
        try:
            return self.config_cls(**{**self.options, **extra})
        except (TypeError, ValueError) as e:
            shown = ", ".join(f"{k}: {v}" for k, v in self.options.items())
            raise VariantError(f"invalid peft options {{{shown}}}: peft's {self.config_cls.__name__} says: "
                               f"{_first_line(e)}") from None

    @staticmethod
    def _rank(cfg) -> int | None:
        """peft's ``r`` where it is a rank (OFT's r=0 means "sized by oft_block_size": no rank)."""
        r = getattr(cfg, "r", None)
        return r if isinstance(r, int) and not isinstance(r, bool) and r > 0 else None

    def identity(self) -> dict:
        c = self.peft_cfg
        alpha = getattr(c, "lora_alpha", getattr(c, "alpha", None))
        scaling = None
        if hasattr(c, "use_rslora"):
            scaling = "rslora" if c.use_rslora else "standard"
        return {"rank": self.rank, "alpha": alpha if isinstance(alpha, (int, float)) else None,
                "scaling": scaling, "targets": self.target_modules}

    # -- 1. model surgery ----------------------------------------------------------------------------
    def apply(self, model: nn.Module) -> nn.Module:
        peft = _peft()
        from peft.utils import ModulesToSaveWrapper

        self.base_params = sum(p.numel() for p in model.parameters())
        model.requires_grad_(False)
        extra = {}
        if "target_modules" in self.fields and self.options.get("target_modules") is None:
            extra["target_modules"] = self._peft_targets(model, self.target_names(model))
        heads = head_module_names(model, self.cfg.heads) if self.cfg.trains_head else []
        if heads:
            if "modules_to_save" not in self.fields:
                raise VariantError(f"invalid option train_head=True: peft's {self.config_cls.__name__} cannot train "
                                   "the task head (no modules_to_save); set variant.train_head=false")
            extra["modules_to_save"] = heads
        config = self._peft_config(extra)
        try:
            wrapped = peft.get_peft_model(model, config)
        except (TypeError, ValueError, KeyError, NotImplementedError) as e:
            raise VariantError(f"peft could not apply method {self.method!r} to {type(model).__name__}: "
                               f"{_first_line(e)}") from None
        saved = sorted(n for n, m in wrapped.base_model.model.named_modules() if isinstance(m, ModulesToSaveWrapper))
        if saved != sorted(heads):
            raise VariantError(f"invalid option head={list(self.cfg.heads)}: peft's modules_to_save (name suffixes) "
                               f"wrapped {saved}, the head is {heads}")
        if self.method == LORA_FA:  # A stays at its init (LoRA-FA; create_lorafa_optimizer does the same)
            for n, p in wrapped.named_parameters():
                if "lora_A" in n:
                    p.requires_grad_(False)
        self.peft_cfg = wrapped.peft_config[ADAPTER]
        self.rank = self._rank(self.peft_cfg)
        self.target_modules = list(getattr(wrapped.base_model, "targeted_module_names", []) or []) or None
        return wrapped

    @staticmethod
    def _peft_targets(model: nn.Module, names: list[str]) -> list[str] | str:
        """``names`` as peft's ``target_modules``: the list itself where peft's rule (a name, or a suffix
        after a dot) matches exactly these modules; else a regex of exactly them (peft fullmatches a string)."""
        wanted = set(names)
        matched = {k for k, _ in model.named_modules() if k in wanted or any(k.endswith("." + n) for n in names)}
        return list(names) if matched == wanted else "|".join(re.escape(n) for n in names)

    # -- 2. optimizer --------------------------------------------------------------------------------
    def optimizer(self, model: nn.Module, lr: float, weight_decay: float = 0.0,
                  betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> torch.optim.Optimizer:
        if self.method != LORA_FA:
            return super().optimizer(model, lr, weight_decay, betas, eps)
        from peft.optimizers import create_lorafa_optimizer

        c = self.peft_cfg
        opt = create_lorafa_optimizer(model, r=c.r, lora_alpha=c.lora_alpha, lr=lr, weight_decay=weight_decay)
        for group in opt.param_groups:  # peft's helper fixes betas (0.9, 0.999) and eps 1e-6: use the run's
            group["betas"], group["eps"] = tuple(betas), eps
        return opt

    # -- record, merge, save -------------------------------------------------------------------------
    def summary(self, model: nn.Module) -> dict:
        peft = _peft()
        return {"method": self.method, "peft_version": peft.__version__,
                "peft_config": jsonable(self.peft_cfg.to_dict())}

    def merge(self, model: nn.Module) -> nn.Module:
        """peft's ``merge_adapter`` (in place, undone by ``unmerge``); ``model.merge_and_unload()`` then gives
        the plain base model."""
        try:
            model.merge_adapter()
        except (NotImplementedError, AttributeError) as e:
            raise VariantError(f"peft method {self.method!r} cannot merge its adapter: {_first_line(e)}") from None
        return model

    def unmerge(self, model: nn.Module) -> nn.Module:
        try:
            model.unmerge_adapter()
        except (NotImplementedError, AttributeError) as e:
            raise VariantError(f"peft method {self.method!r} cannot unmerge its adapter: {_first_line(e)}") from None
        return model

    def adapter_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """What peft's ``save_pretrained`` writes: the adapter (VeRA: with its shared projections), the head."""
        from peft.utils import get_peft_model_state_dict

        return {k: v.detach() for k, v in get_peft_model_state_dict(model).items()}

    def peft_config(self, model: nn.Module) -> dict:
        """peft's adapter_config.json (as ``save_pretrained`` writes it), so ``PeftModel.from_pretrained`` loads
        the saved adapter."""
        return {**jsonable(self.peft_cfg.to_dict()), "inference_mode": True}


# --- thin subclasses: one method, its own defaults as named options, one YAML each -----------------------


@dataclass
class PeftLoRAConfig(PeftMethodConfig):
    """rank, alpha, dropout, scaling as our lora's (LowRankConfig), and the same defaults, so that these rows
    check the native ones: r 8, alpha 16, dropout 0.05 (sources: variants/base.py)."""

    method: str = "lora"
    rank: int | None = 8
    alpha: float = 16.0  # lora_alpha
    dropout: float = 0.05  # lora_dropout
    scaling: str = "standard"  # "rslora": use_rslora

    def validate(self) -> None:
        super().validate()
        _check(self.rank is not None, "rank", self.rank, "a positive integer")
        _check(_is_number(self.alpha) and self.alpha > 0, "alpha", self.alpha, "a positive number")
        _check(_is_number(self.dropout) and 0 <= self.dropout < 1, "dropout", self.dropout, "in [0, 1)")
        _check(self.scaling in ("standard", "rslora"), "scaling", self.scaling, "'standard' or 'rslora'")

    def named_fields(self) -> dict[str, tuple[str, Any]]:
        return {**super().named_fields(), "lora_alpha": ("alpha", self.alpha),
                "lora_dropout": ("dropout", self.dropout), "use_rslora": ("scaling", self.scaling == "rslora")}


@register("peft_lora")
class PeftLoRA(PeftMethod):
    """peft's own LoRA: the cross-check row next to our ``lora``."""

    Config = PeftLoRAConfig
    fixed_method = "lora"


@register("peft_dora")
class PeftDoRA(PeftMethod):
    """peft's DoRA (``LoraConfig(use_dora=True)``): the cross-check row next to our ``dora``."""

    Config = PeftLoRAConfig  # DoRA §5 matches LoRA's hyper-parameters, as our dora
    fixed_method = "lora"
    fixed_fields = {"use_dora": True}


@dataclass
class PeftLoRAFAConfig(PeftLoRAConfig):
    # LoRA-FA (Zhang et al. 2023) keeps LoRA's hyper-parameters (peft: "the same hyper-params as AdamW, except
    # for the LoRA hyper-params"): ours, for a like-for-like row
    method: str = LORA_FA


@register("peft_lora_fa")
class PeftLoRAFA(PeftMethod):
    """LoRA-FA: LoRA with A frozen at its init, B trained by peft's projected AdamW (LoraFAOptimizer)."""

    Config = PeftLoRAFAConfig
    fixed_method = LORA_FA


@dataclass
class PeftVeRAConfig(PeftMethodConfig):
    method: str = "vera"
    # r = 256: peft's default and the VeRA paper's GLUE rank for RoBERTa-large (its GLUE table: 0.061M
    # parameters on large, 0.043M on base, i.e. r = 256 and 1024 by |Θ| = L_tuned (d_model + r)); our text
    # model, MiniLM, has d_model 384, half of base's. Each unit of r costs one parameter per layer (λ_d); the
    # shared random A, B are frozen buffers
    rank: int | None = 256


@register("peft_vera")
class PeftVeRA(PeftMethod):
    """VeRA (Kopiczko et al. 2024): frozen shared random A, B; trainable scaling vectors λ_d (r), λ_b (out)."""

    Config = PeftVeRAConfig
    fixed_method = "vera"


@dataclass
class PeftMiSSConfig(PeftMethodConfig):
    method: str = "miss"
    # r = 16: MiSS trains r x d_out per layer, LoRA r' (d_in + d_out), so r = 2 x 8 gives exactly our LoRA
    # r=8's parameter count on square matrices: a like-for-like row (peft's default, 64, is sized for 7B
    # models and exceeds d_in of small ones: peft requires r <= d_in). Even, as peft's docs advise
    rank: int | None = 16


@register("peft_miss")
class PeftMiSS(PeftMethod):
    """MiSS (Kang & Yin 2024, formerly Bone): one trainable r x d_out shard shared across d_in / r blocks."""

    Config = PeftMiSSConfig
    fixed_method = "miss"
