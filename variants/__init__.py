"""lorabench's fine-tuning methods behind one interface (see ``variants.base``)."""

from . import adalora, baselines, dora, galore, lora, lora_plus, peft_method  # noqa: F401  (importing registers)
from .base import Variant, VariantError, available, create, get, optimizer_state_bytes, register
from .lora import snapshot_modules, weight_snapshot
from .targets import PRESETS, TargetError, resolve_targets

__all__ = ["Variant", "VariantError", "TargetError", "PRESETS", "available", "create", "get", "register",
           "resolve_targets", "optimizer_state_bytes", "snapshot_modules", "weight_snapshot"]
