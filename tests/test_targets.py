"""Target presets by role on every model family (tiny random models, no download), checked against peft.

For every family x preset the resolved modules are exactly what peft wraps for the equivalent explicit
``target_modules`` (written out here by hand from the models' real names, not taken from targets.py), or
the preset cannot be taken whole and ``TargetError`` says why. ``python tests/test_targets.py`` prints
the families x presets table of docs/variants.md#targets.
"""

from __future__ import annotations

import copy
import functools
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import variants
from variants import TargetError
from variants.targets import ROLES, head_module_names

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

HEAD = ("classifier", "score", "lm_head")  # variants.create's default head
PRESETS = ["q", "k", "v", "o", "qv", "qkvo", "attn", "mlp"]
LM = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
          bos_token_id=0, eos_token_id=0, pad_token_id=0)
T5 = dict(vocab_size=100, d_model=32, d_kv=16, d_ff=37, num_layers=2, num_heads=2)
DISTIL = dict(vocab_size=100, dim=32, n_layers=2, n_heads=2, hidden_dim=37)
SEQ2SEQ = dict(vocab_size=100, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
               decoder_attention_heads=2, encoder_ffn_dim=37, decoder_ffn_dim=37, bos_token_id=0, eos_token_id=0,
               pad_token_id=0, decoder_start_token_id=0)

# family -> (config class, its options, model class) and the peft target_modules of each role, by hand.
# "qkv" is one fused module: a preset with some but not all of q, k, v must raise.
_BERT = {"q": ["query"], "k": ["key"], "v": ["value"], "o": ["attention.output.dense"],
         "mlp": ["intermediate.dense", "layer.0.output.dense", "layer.1.output.dense"]}
_LLAMA = {"q": ["q_proj"], "k": ["k_proj"], "v": ["v_proj"], "o": ["o_proj"],
          "mlp": ["gate_proj", "up_proj", "down_proj"]}
_OPT = {"q": ["q_proj"], "k": ["k_proj"], "v": ["v_proj"], "o": ["out_proj"], "mlp": ["fc1", "fc2"]}
_NEOX_MLP = ["dense_h_to_4h", "dense_4h_to_h"]
FAMILIES = {
    "bert": ("BertConfig", LM, "AutoModelForSequenceClassification", _BERT),
    "roberta": ("RobertaConfig", LM, "AutoModelForSequenceClassification", _BERT),
    "deberta-v2": ("DebertaV2Config", LM, "AutoModelForSequenceClassification",
                   {**_BERT, "q": ["query_proj"], "k": ["key_proj"], "v": ["value_proj"]}),
    "deberta": ("DebertaConfig", LM, "AutoModelForSequenceClassification",
                {"qkv": ["in_proj"], "o": _BERT["o"], "mlp": _BERT["mlp"]}),
    "distilbert": ("DistilBertConfig", DISTIL, "AutoModelForSequenceClassification",
                   {"q": ["q_lin"], "k": ["k_lin"], "v": ["v_lin"], "o": ["out_lin"], "mlp": ["lin1", "lin2"]}),
    "gpt2": ("GPT2Config", dict(n_embd=32, n_layer=2, n_head=2, vocab_size=100, bos_token_id=0, eos_token_id=0),
             "AutoModelForCausalLM", {"qkv": ["c_attn"], "o": ["attn.c_proj"], "mlp": ["c_fc", "mlp.c_proj"]}),
    "gpt_neox": ("GPTNeoXConfig", LM, "AutoModelForCausalLM",
                 {"qkv": ["query_key_value"], "o": ["attention.dense"], "mlp": _NEOX_MLP}),
    "falcon": ("FalconConfig", LM, "AutoModelForCausalLM",
               {"qkv": ["query_key_value"], "o": ["self_attention.dense"], "mlp": _NEOX_MLP}),
    "opt": ("OPTConfig", {**LM, "ffn_dim": 37, "word_embed_proj_dim": 32}, "AutoModelForCausalLM", _OPT),
    "bart": ("BartConfig", SEQ2SEQ, "AutoModelForSeq2SeqLM", _OPT),
    "llama": ("LlamaConfig", LM, "AutoModelForCausalLM", _LLAMA),
    "mistral": ("MistralConfig", LM, "AutoModelForCausalLM", _LLAMA),
    "qwen2": ("Qwen2Config", LM, "AutoModelForCausalLM", _LLAMA),
    "gemma": ("GemmaConfig", LM, "AutoModelForCausalLM", _LLAMA),
    "phi": ("PhiConfig", LM, "AutoModelForCausalLM",
            {"q": ["q_proj"], "k": ["k_proj"], "v": ["v_proj"], "o": ["dense"], "mlp": ["fc1", "fc2"]}),
    "phi3": ("Phi3Config", LM, "AutoModelForCausalLM",
             {"qkv": ["qkv_proj"], "o": ["o_proj"], "mlp": ["gate_up_proj", "down_proj"]}),
    "t5": ("T5Config", T5, "T5ForConditionalGeneration",
           {"q": ["q"], "k": ["k"], "v": ["v"], "o": ["o"], "mlp": ["wi", "wo"]}),
    "t5-gated": ("T5Config", {**T5, "feed_forward_proj": "gated-gelu"}, "T5ForConditionalGeneration",
                 {"q": ["q"], "k": ["k"], "v": ["v"], "o": ["o"], "mlp": ["wi_0", "wi_1", "wo"]}),
    "vit": ("ViTConfig", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                              image_size=8, patch_size=4), "ViTForImageClassification",
            {"q": ["q_proj"], "k": ["k_proj"], "v": ["v_proj"], "o": ["o_proj"], "mlp": ["fc1", "fc2"]}
            if int(transformers.__version__.split(".")[0]) >= 5 else _BERT),
}
# more model types mapped to a family above; tested, not in the docs table
MORE = {
    "xlm-roberta": ("XLMRobertaConfig", LM, "AutoModelForSequenceClassification", _BERT),
    "camembert": ("CamembertConfig", LM, "AutoModelForSequenceClassification", _BERT),
    "electra": ("ElectraConfig", LM, "AutoModelForSequenceClassification", _BERT),
    "qwen3": ("Qwen3Config", LM, "AutoModelForCausalLM", _LLAMA),
    "gemma2": ("Gemma2Config", LM, "AutoModelForCausalLM", _LLAMA),
    "gemma3_text": ("Gemma3TextConfig", {**LM, "head_dim": 16}, "AutoModelForCausalLM", _LLAMA),
    "mt5": ("MT5Config", T5, "MT5ForConditionalGeneration", FAMILIES["t5-gated"][3]),
}
MORE = {f: v for f, v in MORE.items() if hasattr(transformers, v[0])}
FAMILIES = {f: v for f, v in FAMILIES.items() if hasattr(transformers, v[0])}
ALL = {**FAMILIES, **MORE}


@functools.cache
def model(family: str) -> nn.Module:
    config, options, cls, _ = ALL[family]
    torch.manual_seed(0)
    cfg = getattr(transformers, config)(**options)
    cls = getattr(transformers, cls)
    return (cls.from_config(cfg) if cls.__name__.startswith("Auto") else cls(cfg)).eval()


def expected(family: str, preset: str) -> list[str] | None:
    """peft's target_modules for ``preset`` on ``family``, or None where a fused module straddles it."""
    roles, ref = set(ROLES[preset]), ALL[family][3]
    if "qkv" in ref and roles & {"q", "k", "v"} and not {"q", "k", "v"} <= roles:
        return None
    return [n for role in ref if set("qkv" if role == "qkv" else [role]) <= roles for n in ref[role]]


@functools.cache
def peft_wraps(family: str, target_modules) -> frozenset[str]:
    """Names of the modules peft's get_peft_model wraps (head modules dropped, as we never adapt them)."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    spec = target_modules if isinstance(target_modules, str) else list(target_modules)
    wrapped = get_peft_model(copy.deepcopy(model(family)), LoraConfig(r=2, target_modules=spec))
    names = {n.removeprefix("base_model.model.") for n, m in wrapped.named_modules() if isinstance(m, LoraLayer)}
    head = head_module_names(model(family), HEAD)
    return frozenset(n for n in names if not any(n == h or n.startswith(h + ".") for h in head))


def resolve(family: str, spec):
    return variants.resolve_targets(model(family), spec, head=HEAD)


def in_head(family: str, names) -> list[str]:
    head = head_module_names(model(family), HEAD)
    return [n for n in names if any(n == h or n.startswith(h + ".") for h in head)]


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("family", list(ALL))
def test_preset_is_what_peft_wraps_or_an_error(family, preset):
    want = expected(family, preset)
    if want is None:
        with pytest.raises(TargetError, match=r"are fused in") as err:
            resolve(family, preset)
        assert "\n" not in str(err.value) and "qkvo" in str(err.value)
        return
    names = resolve(family, preset)
    assert len(names) == len(set(names)) and set(names) == peft_wraps(family, tuple(want))
    assert not in_head(family, names)
    # one layer's share times the number of layers: the same modules in every layer
    per_layer = {}
    for n in names:
        layer = re.match(r"(.*?\.\d+)\.", n).group(1)
        per_layer.setdefault(re.sub(r"\d+$", "N", layer), {}).setdefault(layer, set()).add(n[len(layer):])
    for stack in per_layer.values():
        assert len(stack) == 2 and len({frozenset(s) for s in stack.values()}) == 1


@pytest.mark.parametrize("family", list(ALL))
def test_all_linear_is_peft_all_linear_without_the_head(family):
    names = resolve(family, "all-linear")
    assert set(names) == peft_wraps(family, "all-linear") and not in_head(family, names)
    assert set(resolve(family, "qkvo")) | set(resolve(family, "mlp")) <= set(names)


def test_all_linear_on_gpt2_takes_the_conv1d_modules():
    from transformers.pytorch_utils import Conv1D

    names = resolve("gpt2", "all-linear")
    conv = [n for n, m in model("gpt2").named_modules() if isinstance(m, Conv1D)]
    assert len(conv) == 8 and names == conv  # lm_head (the only nn.Linear) is the head


def test_opt_qkvo_takes_out_proj():  # the bug: o_proj was looked for, 6 of 8 modules matched
    names = resolve("opt", "qkvo")
    assert names == [f"model.decoder.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in ("k", "v", "q", "out")]
    assert resolve("opt", "attn") == names and resolve("opt", "mlp")[-1] == "model.decoder.layers.1.fc2"


def test_a_list_is_names_never_a_preset():
    names = resolve("t5", ["q"])
    assert set(names) == peft_wraps("t5", ("q",)) and len(names) == 6 and all(n.endswith(".q") for n in names)
    for spec in (["qv"], ["all-linear"], ("mlp",)):
        with pytest.raises(TargetError, match="matched no module"):
            resolve("bert", spec)
    assert resolve("bert", "qv") == resolve("bert", ["query", "value"])


def test_fused_presets_say_what_to_use():
    with pytest.raises(TargetError) as err:
        resolve("gpt2", "qv")
    assert str(err.value).startswith("preset 'qv' on gpt2: q, k and v are fused in attn.c_attn; use targets=")
    assert resolve("gpt2", "qkvo") == [f"transformer.h.{i}.attn.{n}" for i in range(2) for n in ("c_attn", "c_proj")]
    assert resolve("gpt2", ["c_attn"]) == resolve("gpt2", "qkvo")[::2]  # a Conv1D named explicitly


def test_a_layer_without_the_role_is_an_error_not_a_partial_match():
    m = copy.deepcopy(model("llama"))
    del m.model.layers[1].self_attn.o_proj
    with pytest.raises(TargetError, match=r"^preset 'qkvo' on llama: model.layers.1 has no o \(o_proj\)") as err:
        variants.resolve_targets(m, "qkvo")
    assert "\n" not in str(err.value)
    assert len(variants.resolve_targets(m, "qv")) == 4 and len(variants.resolve_targets(m, "o")) == 1  # o alone


def test_layers_with_different_modules_are_an_error():
    m = copy.deepcopy(model("llama"))
    m.model.layers[0].mlp.q_proj = nn.Linear(32, 32)
    with pytest.raises(TargetError, match=r"model.layers.1 and model.layers.0 differ in mlp.q_proj"):
        variants.resolve_targets(m, "q")


def test_a_missing_role_is_an_error():
    with pytest.raises(TargetError, match=r"^preset 'mlp' on a llama-style model: no module for mlp"):
        variants.resolve_targets(Attention(), "mlp")


def test_embeddings_only_when_named():
    assert resolve("gpt2", ["wte"]) == ["transformer.wte"]
    assert resolve("t5", r"(en|de)coder\.embed_tokens") == ["encoder.embed_tokens", "decoder.embed_tokens"]
    for family in FAMILIES:
        m = model(family)
        for spec in (*PRESETS, "all-linear"):
            try:
                names = resolve(family, spec)
            except TargetError:
                continue
            assert not any(isinstance(m.get_submodule(n), nn.Embedding) for n in names), (family, spec)


def test_containers_are_still_an_error():
    with pytest.raises(TargetError, match="a GPT2MLP, not an nn.Linear, Conv1D or nn.Embedding"):
        resolve("gpt2", ["mlp"])


class Attention(nn.Module):
    """A plain nn.Module (no transformers config) with Llama-style names."""

    def __init__(self, names=("q_proj", "k_proj", "v_proj", "o_proj"), layers=2):
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleDict({n: nn.Linear(4, 4) for n in names}) for _ in range(layers))


def test_plain_modules_fall_back_to_names():
    assert variants.resolve_targets(Attention(), "qv") == [f"layers.{i}.{p}_proj" for i in range(2) for p in "qv"]
    bert_like = Attention(("query", "key", "value"))
    qv = [f"layers.{i}.{n}" for i in range(2) for n in ("query", "value")]
    assert variants.resolve_targets(bert_like, "qv") == qv
    with pytest.raises(TargetError, match=r"targets preset 'qv' knows bert, .* names; none found here"):
        variants.resolve_targets(Attention(("a", "b")), "qv")


def test_model_type_picks_the_family_and_vit_has_both_namings():
    vit4 = Attention(("query", "key", "value"))  # ViT before transformers 5 has BERT names
    vit4.config = SimpleNamespace(model_type="vit")
    assert variants.resolve_targets(vit4, "qv") == variants.resolve_targets(Attention(("query", "value")), "qv")
    phi_like = Attention(("q_proj", "k_proj", "v_proj", "dense"))  # a llama-style guess would want o_proj
    with pytest.raises(TargetError, match="no module for o"):
        variants.resolve_targets(phi_like, "o")
    phi_like.config = SimpleNamespace(model_type="phi")
    with pytest.raises(TargetError, match="preset 'o' on phi: no module for o \\(self_attn.dense\\)"):
        variants.resolve_targets(phi_like, "o")  # phi's o is self_attn.dense, not any dense


def test_resolving_needs_no_transformers():
    code = ("import sys; from torch import nn; from variants.targets import resolve_targets; "
            "before = 'transformers' in sys.modules; "
            "assert resolve_targets(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), 'all-linear') == ['0']; "
            "assert ('transformers' in sys.modules) == before")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


# -- the families x presets table of docs/variants.md ---------------------------------------------------

def _brace(inner: list[str]) -> str:
    """``attention.self.query``, ``attention.self.value`` -> ``attention.self.{query,value}``."""
    groups: dict[str, list[str]] = {}
    for n in inner:
        parent, _, leaf = n.rpartition(".")
        groups.setdefault(parent, []).append(leaf)
    return ", ".join((f"{p}." if p else "") + (ls[0] if len(ls) == 1 else "{" + ",".join(ls) + "}")
                     for p, ls in groups.items())


def _cell(names: list[str]) -> str:
    inner = (re.sub(r"^.*?\.\d+\.", "", n) for n in names)  # the name inside its layer
    return _brace(list(dict.fromkeys(re.sub(r"(^|\.)\d+\.", r"\1N.", n) for n in inner)))


def preset_table() -> str:
    """Markdown: one row per family, the module names (inside a layer) each preset resolves to."""
    cols = ["q", "k", "v", "o", "qv", "qkvo", "mlp", "all-linear"]
    rows = ["| family (model) | " + " | ".join("qkvo / attn" if c == "qkvo" else c for c in cols) + " |",
            "|" + "---|" * (len(cols) + 1)]
    for family in FAMILIES:
        cells = []
        for c in cols:
            try:
                names = resolve(family, c)
            except TargetError as e:
                why = str(e).split(": ", 1)[1].split(";")[0]
                cells.append(re.sub(r"^.* are fused in (.*)", r"error (fused in `\1`)", why))
                continue
            if c == "all-linear":
                rest = [n for n in names if n not in set(resolve(family, "qkvo")) | set(resolve(family, "mlp"))]
                cells.append("qkvo + mlp" + (f" + {_cell(rest)}" if rest else ""))
            else:
                cells.append(f"`{_cell(names)}`")
        rows.append(f"| {family} ({type(model(family)).__name__}) | " + " | ".join(cells) + " |")
    return "\n".join(rows)


@pytest.mark.skipif(int(transformers.__version__.split(".")[0]) < 5, reason="the docs table is transformers 5's")
def test_docs_table_is_up_to_date():
    docs = (Path(__file__).parents[1] / "docs" / "variants.md").read_text()
    assert preset_table() in docs, "regenerate it: python tests/test_targets.py"


if __name__ == "__main__":
    print(preset_table())
