"""Which modules a variant adapts.

A target spec is one of
- a list of module-name suffixes (``["query", "value"]``; ``"output.dense"`` matches any name ending in
  ``.output.dense``, as in peft's ``target_modules`` list). A list is always names, never a preset:
  ``["q"]`` on T5 is every module named ``*.q``;
- a regular expression string matched against the whole module name (peft's string form);
- ``"all-linear"``: every ``nn.Linear`` and transformers ``Conv1D`` outside the task head (peft's);
- a preset name (``q``, ``k``, ``v``, ``o``, ``qv``, ``qkvo``/``attn``, ``mlp``), resolved by role through
  the model family's names (``FAMILIES``).

A preset is all or nothing: every layer that has one of its roles has all of them, under the same names,
or it is a ``TargetError`` naming what is missing. A role fused with one outside the preset (GPT-2's
``c_attn`` is q, k and v) cannot be taken alone: ``q``/``k``/``v``/``qv`` fail there, ``qkvo`` takes it.

Head modules (``classifier``, ``score``, ``lm_head`` by default) are never adapted. A spec that matches
nothing, or matches a module that is not an ``nn.Linear`` or ``Conv1D`` (an ``nn.Embedding`` is allowed
when a suffix list or regex names it), is an error that lists what is available.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence

from torch import nn

# Per-family module names by role: q, k, v, o (attention output) and mlp; a key of several roles ("qkv")
# is one fused module that only a preset covering all of them may take. Names are suffixes as in a
# target list; "N" stands for a layer index (BERT's MLP out is layer.N.output.dense, not
# attention.output.dense). ViT is q_proj..o_proj, mlp.fc1/fc2 from transformers 5, BERT names before.
_BERT = {"q": ["query"], "k": ["key"], "v": ["value"], "o": ["attention.output.dense"],
         "mlp": ["intermediate.dense", "layer.N.output.dense"]}
FAMILIES: dict[str, dict[str, list[str]]] = {
    "bert": _BERT,  # BERT, RoBERTa, XLM-R, CamemBERT, ELECTRA; ViT before transformers 5
    "deberta-v2": {**_BERT, "q": ["query_proj"], "k": ["key_proj"], "v": ["value_proj"]},
    "deberta": {"qkv": ["attention.self.in_proj"], "o": _BERT["o"], "mlp": _BERT["mlp"]},
    "distilbert": {"q": ["q_lin"], "k": ["k_lin"], "v": ["v_lin"], "o": ["out_lin"], "mlp": ["ffn.lin1", "ffn.lin2"]},
    "gpt2": {"qkv": ["attn.c_attn"], "o": ["attn.c_proj"], "mlp": ["mlp.c_fc", "mlp.c_proj"]},  # Conv1D
    "gpt_neox": {"qkv": ["query_key_value"], "o": ["attention.dense", "self_attention.dense"],  # + Falcon
                 "mlp": ["mlp.dense_h_to_4h", "mlp.dense_4h_to_h"]},
    "llama": {"q": ["q_proj"], "k": ["k_proj"], "v": ["v_proj"], "o": ["o_proj"],  # Mistral, Qwen2/3, Gemma
              "mlp": ["gate_proj", "up_proj", "down_proj"]},
    "opt": {"q": ["q_proj"], "k": ["k_proj"], "v": ["v_proj"], "o": ["out_proj"], "mlp": ["fc1", "fc2"]},  # BART
    "phi": {"q": ["q_proj"], "k": ["k_proj"], "v": ["v_proj"], "o": ["self_attn.dense"], "mlp": ["mlp.fc1", "mlp.fc2"]},
    "phi3": {"qkv": ["qkv_proj"], "o": ["o_proj"], "mlp": ["gate_up_proj", "down_proj"]},
    "t5": {"q": ["q"], "k": ["k"], "v": ["v"], "o": ["o"], "mlp": ["wi", "wi_0", "wi_1", "wo"]},  # T5, mT5
    "vit": {"q": ["q_proj"], "k": ["k_proj"], "v": ["v_proj"], "o": ["o_proj"], "mlp": ["mlp.fc1", "mlp.fc2"]},
}
ROLES = {"q": ("q",), "k": ("k",), "v": ("v",), "o": ("o",), "qk": ("q", "k"), "qv": ("q", "v"),
         "qkvo": ("q", "k", "v", "o"),
         "attn": ("q", "k", "v", "o"), "mlp": ("mlp",)}  # preset -> roles
# config.model_type -> the families whose names it may use, first match wins (see _family)
_MODEL_TYPES = {
    **dict.fromkeys(["bert", "roberta", "xlm-roberta", "camembert", "electra"], ("bert",)),
    "deberta-v2": ("deberta-v2",), "deberta": ("deberta",), "distilbert": ("distilbert",),
    "gpt2": ("gpt2",), "gpt_neox": ("gpt_neox",), "falcon": ("gpt_neox",), "opt": ("opt",), "bart": ("opt",),
    **dict.fromkeys(["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text"], ("llama",)),
    "phi": ("phi",), "phi3": ("phi3",), "t5": ("t5",), "mt5": ("t5",), "vit": ("vit", "bert"),
}


def _roles_of(key: str) -> tuple[str, ...]:
    return ("q", "k", "v") if key == "qkv" else (key,)


def _preset_names(preset: str, fam: str) -> list[str] | None:
    """The family's names for ``preset``, or None when a fused module straddles its roles."""
    want, names = set(ROLES[preset]), []
    for key, keyed in FAMILIES[fam].items():
        got = set(_roles_of(key)) & want
        if got and got != set(_roles_of(key)):
            return None
        if got:
            names += keyed
    return names


# preset -> family -> names (the presets a family cannot take are absent)
PRESETS: dict[str, dict[str, list[str]]] = {
    p: {f: n for f in FAMILIES if (n := _preset_names(p, f)) is not None} for p in ROLES}


class TargetError(ValueError):
    """The target spec does not fit the model."""


def _in_head(name: str, head: Sequence[str]) -> bool:
    """True if ``name`` is a head module or lies inside one: a name ending in a head name (``classifier``,
    ``classifier.out_proj``, DistilBERT's ``pre_classifier``), the suffix rule peft applies to ``modules_to_save``."""
    parts = name.split(".")
    prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))]
    return any(p.endswith(h) for p in prefixes for h in head)  # as peft matches modules_to_save


def head_module_names(model: nn.Module, head: Sequence[str]) -> list[str]:
    """Top-most modules whose name ends in one of ``head`` (their children are included implicitly)."""
    found = []
    for name, _ in model.named_modules():
        if name and _in_head(name, head) and not any(name.startswith(f + ".") for f in found):
            found.append(name)
    return found


def _linear_types() -> tuple[type, ...]:
    """``nn.Linear`` and, where transformers is loaded, its ``Conv1D`` (no model has one otherwise)."""
    utils = sys.modules.get("transformers.pytorch_utils")
    conv1d = getattr(utils, "Conv1D", None)
    return (nn.Linear,) if conv1d is None else (nn.Linear, conv1d)


def _suffix(name: str, s: str) -> bool:
    """``name`` ends in the table name ``s`` (whose ``N`` parts match any layer index)."""
    if "N" in s.split("."):
        pattern = r"\.".join(r"\d+" if part == "N" else re.escape(part) for part in s.split("."))
        return re.fullmatch(r"(.*\.)?" + pattern, name) is not None
    return name == s or name.endswith("." + s)


def _matches(name: str, spec: str | Sequence[str]) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == s or name.endswith("." + s) for s in spec)


def _model_type(model: nn.Module) -> str | None:
    for m in model.modules():  # the model itself, or the first transformers model inside a wrapper
        model_type = getattr(getattr(m, "config", None), "model_type", None)
        if isinstance(model_type, str):
            return model_type
    return None


def _family(model_type: str | None, linear: Sequence[str]) -> str | None:
    """From ``config.model_type``; else (or if its names are absent) the family with the most roles here."""
    def score(fam):
        return sum(any(_suffix(n, s) for n in linear for s in names) for names in FAMILIES[fam].values())
    for candidates in (_MODEL_TYPES.get(model_type, ()), tuple(FAMILIES)):
        best = max(candidates, key=score, default=None)  # max keeps the first of equals
        if best is not None and score(best) > 0:
            return best
    return None


def _layer(name: str) -> tuple[str, str]:
    """(layer, name inside it): ``model.layers.3.mlp.fc1`` -> (``model.layers.3``, ``mlp.fc1``)."""
    m = re.match(r"(.*?(?:^|\.)\d+)\.(.*)", name)
    return (m.group(1), m.group(2)) if m else ("", name)


def _summarise(names: Sequence[str], limit: int = 40) -> str:
    """Collapse layer indices (``layer.3.query`` -> ``layer.N.query``) so the error stays one line."""
    seen: dict[str, None] = {}
    for n in names:
        seen.setdefault(re.sub(r"(^|\.)\d+\.", r"\1N.", n), None)
    out = list(seen)
    return ", ".join(out[:limit]) + (f", ... ({len(out) - limit} more)" if len(out) > limit else "")


def _and(items: Sequence[str]) -> str:
    return ", ".join(items[:-1]) + " and " + items[-1] if len(items) > 1 else items[0]


def _resolve_preset(preset: str, model_type: str | None, linear: Sequence[str]) -> list[str]:
    """The preset's modules, checked to be the same roles under the same names in every layer."""
    fam = _family(model_type, linear)
    if fam is None:
        raise TargetError(f"targets preset {preset!r} knows {', '.join(FAMILIES)} names; none found here; "
                          f"Linear modules are: {_summarise(linear)}")
    named = model_type if fam in _MODEL_TYPES.get(model_type, ()) else f"a {fam}-style model"
    on = f"preset {preset!r} on {named}"
    table, want = FAMILIES[fam], ROLES[preset]
    by_role: dict[str, list[str]] = {}
    for key, names in table.items():
        roles = _roles_of(key)
        if not set(roles) & set(want):
            continue
        if not set(roles) <= set(want):
            takes = [p for p in ROLES if fam in PRESETS[p] and set(roles) <= set(ROLES[p])]
            raise TargetError(f"{on}: {_and(roles)} are fused in {'/'.join(names)}; use targets={names!r} "
                              f"({_and(roles)} together) or the preset {' or '.join(takes)}")
        by_role[key] = [n for n in linear if any(_suffix(n, s) for s in names)]
        if not by_role[key]:
            raise TargetError(f"{on}: no module for {key} ({'/'.join(names)}); "
                              f"Linear modules are: {_summarise(linear)}")
    layers: dict[str, dict[str, set[str]]] = {}  # layer -> role -> names inside the layer
    for key, names in by_role.items():
        for n in names:
            layer, inner = _layer(n)
            layers.setdefault(layer, {}).setdefault(key, set()).add(inner)
    first: dict[str, str] = {}  # stack (model.layers) -> its first layer with the roles
    for layer, roles in layers.items():
        missing = [k for k in by_role if k not in roles]
        if missing:
            raise TargetError(f"{on}: {layer or 'the model'} has no {', '.join(missing)} "
                              f"({'/'.join(s for k in missing for s in table[k])}) but has "
                              f"{', '.join(roles)}; a preset takes whole layers (use a list of names)")
        stack = re.sub(r"\d+$", "N", layer)
        ref = layers[first.setdefault(stack, layer)]
        if ref != roles:
            diff = sorted({x for k in by_role for x in ref[k] ^ roles[k]})
            raise TargetError(f"{on}: {layer} and {first[stack]} differ in {', '.join(diff)}; "
                              f"a preset takes the same modules in every layer (use a list of names)")
    chosen = {n for names in by_role.values() for n in names}
    return [n for n in linear if n in chosen]


def resolve_targets(model: nn.Module, spec, head: Sequence[str] = (), also: tuple[type, ...] = ()) -> list[str]:
    """Names of the modules to adapt, in ``named_modules`` order; raises ``TargetError`` if unusable.
    ``also``: more module types that count as Linear (an adapted layer, whose base layer then sits inside it)."""
    explicit = hasattr(spec, "__iter__") and not isinstance(spec, str)  # a list: names, never a preset
    if explicit:
        spec = list(spec)
    modules = [(n, m) for n, m in model.named_modules() if n and not _in_head(n, head)]
    if also:  # an adapted layer stands for the Linear it wraps: its base layer is not a module of its own here
        inside = [n for n, m in modules if isinstance(m, also)]
        modules = [(n, m) for n, m in modules if not any(n.startswith(f"{a}.") for a in inside)]
    kinds = (*_linear_types(), *also)
    linear = [n for n, m in modules if isinstance(m, kinds)]
    if spec == "all-linear":
        names = linear
    elif not explicit and spec in ROLES:
        names = _resolve_preset(spec, _model_type(model), linear)
    else:
        names = [n for n, _ in modules if _matches(n, spec)]
        # A suffix like "attention.output" selects a container; its own Linear children do not count.
        bad = [n for n in names if not isinstance(model.get_submodule(n), (*kinds, nn.Embedding))]
        if bad:
            kind = type(model.get_submodule(bad[0])).__name__
            raise TargetError(f"targets={spec!r} matched {bad[0]!r}, a {kind}, not an nn.Linear, Conv1D or "
                              f"nn.Embedding; Linear modules are: {_summarise(linear)}")
    if not names:
        raise TargetError(f"targets={spec!r} matched no module; Linear modules are: {_summarise(linear)}")
    return names
