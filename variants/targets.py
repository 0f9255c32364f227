"""Which modules a variant adapts.

A target spec is one of
- a list of module-name suffixes (``["query", "value"]``; ``"output.dense"`` matches any name ending in
  ``.output.dense``, as in peft's ``target_modules`` list);
- a regular expression string matched against the whole module name (peft's string form);
- ``"all-linear"``: every ``nn.Linear`` outside the task head;
- a preset name (``qv``, ``qkvo``, ``attn``, ``mlp``, ``q``, ``k``, ``v``, ``o``) resolved per model family.

Head modules (``classifier``, ``score``, ``lm_head`` by default) are never adapted. A spec that matches
nothing, or matches a module that is not an ``nn.Linear``, is an error that lists what is available.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

# Per-family module names. BERT/RoBERTa: attention.self.{query,key,value}, attention.output.dense,
# intermediate.dense, output.dense (MLP out). Llama/Mistral/Qwen: self_attn.*_proj, mlp.*_proj.
_BERT_MLP_OUT = r".*\.layer\.\d+\.output\.dense"
PRESETS: dict[str, dict[str, list[str]]] = {
    "q": {"bert": ["query"], "llama": ["q_proj"]},
    "k": {"bert": ["key"], "llama": ["k_proj"]},
    "v": {"bert": ["value"], "llama": ["v_proj"]},
    "o": {"bert": ["attention.output.dense"], "llama": ["o_proj"]},
    "qv": {"bert": ["query", "value"], "llama": ["q_proj", "v_proj"]},
    "qkvo": {"bert": ["query", "key", "value", "attention.output.dense"],
             "llama": ["q_proj", "k_proj", "v_proj", "o_proj"]},
    "mlp": {"bert": ["intermediate.dense", _BERT_MLP_OUT], "llama": ["gate_proj", "up_proj", "down_proj"]},
}
PRESETS["attn"] = PRESETS["qkvo"]
_FAMILY_MARKERS = {"bert": "query", "llama": "q_proj"}


class TargetError(ValueError):
    """The target spec does not fit the model."""


def _in_head(name: str, head: Sequence[str]) -> bool:
    """True if ``name`` is a head module or lies inside one (``classifier``, ``classifier.out_proj``...)."""
    parts = name.split(".")
    prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))]
    return any(p == h or p.endswith("." + h) for p in prefixes for h in head)


def head_module_names(model: nn.Module, head: Sequence[str]) -> list[str]:
    """Top-most modules whose name ends in one of ``head`` (their children are included implicitly)."""
    found = []
    for name, _ in model.named_modules():
        if name and _in_head(name, head) and not any(name.startswith(f + ".") for f in found):
            found.append(name)
    return found


def _family(names: Sequence[str]) -> str | None:
    for fam, marker in _FAMILY_MARKERS.items():
        if any(n == marker or n.endswith("." + marker) for n in names):
            return fam
    return None


def _summarise(names: Sequence[str], limit: int = 40) -> str:
    """Collapse layer indices (``layer.3.query`` -> ``layer.N.query``) so the error stays one line."""
    seen: dict[str, None] = {}
    for n in names:
        seen.setdefault(re.sub(r"\.\d+\.", ".N.", n), None)
    out = list(seen)
    return ", ".join(out[:limit]) + (f", ... ({len(out) - limit} more)" if len(out) > limit else "")


def _matches(name: str, spec: str | Sequence[str]) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    for s in spec:
        if s.startswith(".*") or any(c in s for c in "\\[]()|+?^$"):  # a regex entry (used by presets)
            if re.fullmatch(s, name):
                return True
        elif name == s or name.endswith("." + s):
            return True
    return False


def resolve_targets(model: nn.Module, spec, head: Sequence[str] = ()) -> list[str]:
    """Names of the modules to adapt, in ``named_modules`` order; raises ``TargetError`` if unusable."""
    if hasattr(spec, "__iter__") and not isinstance(spec, str):
        spec = list(spec)
        if len(spec) == 1 and spec[0] in (*PRESETS, "all-linear"):
            spec = spec[0]
    modules = [(n, m) for n, m in model.named_modules() if n and not _in_head(n, head)]
    linear = [n for n, m in modules if isinstance(m, nn.Linear)]
    if spec == "all-linear":
        names = linear
    else:
        if isinstance(spec, str) and spec in PRESETS:
            fam = _family(linear)
            if fam is None:
                raise TargetError(f"targets preset {spec!r} knows BERT- and Llama-style names only; "
                                  f"Linear modules are: {_summarise(linear)}")
            spec = PRESETS[spec][fam]
        names = [n for n, _ in modules if _matches(n, spec)]
        # A suffix like "attention.output" selects a container; its own Linear children do not count.
        bad = [n for n in names if not isinstance(model.get_submodule(n), nn.Linear)]
        if bad:
            kind = type(model.get_submodule(bad[0])).__name__
            raise TargetError(f"targets={spec!r} matched {bad[0]!r}, a {kind}, not an nn.Linear; "
                              f"Linear modules are: {_summarise(linear)}")
    if not names:
        raise TargetError(f"targets={spec!r} matched no module; Linear modules are: {_summarise(linear)}")
    return names
