"""Bad options and bad target specs fail early with one clear line naming the problem; presets resolve."""

from __future__ import annotations

import pytest
from tiny import mlp, tiny_bert, tiny_llama

import variants
from variants import TargetError, VariantError


@pytest.mark.parametrize(
    "name, options, fragment",
    [
        ("lora", {"rank": 0}, "rank=0"),
        ("lora", {"rank": -3}, "rank=-3"),
        ("lora", {"rank": 2.5}, "rank=2.5"),
        ("dora", {"alpha": 0}, "alpha=0"),
        ("lora_plus", {"alpha": -1.0}, "alpha=-1.0"),
        ("lora", {"dropout": 1.0}, "dropout=1.0"),
        ("lora", {"scaling": "sqrt"}, "scaling='sqrt'"),
        ("lora", {"init": "xavier"}, "init='xavier'"),
        ("lora_plus", {"ratio": 0}, "ratio=0"),
        ("lora", {"rnk": 4}, "no option 'rnk'"),
        ("lora", {"targets": []}, "targets=[]"),
        ("lora", {"param_budget": 0}, "param_budget=0"),
        ("dora", {"param_budget": 1.5}, "param_budget=1.5"),
        ("adalora", {"param_budget": 1000}, "no option 'param_budget'"),  # its budget is a rank schedule
    ],
)
def test_bad_option_names_the_option(name, options, fragment):
    with pytest.raises(VariantError) as err:
        variants.create(name, **options)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_unknown_variant_lists_the_known_ones():
    with pytest.raises(VariantError, match=r"unknown variant 'lorra' \(available: .*lora_plus"):
        variants.create("lorra")


def test_targets_matching_nothing_lists_linear_modules():
    with pytest.raises(TargetError) as err:
        variants.create("lora", targets=["qproj"]).apply(tiny_bert())
    msg = str(err.value)
    assert "matched no module" in msg and "bert.encoder.layer.N.attention.self.query" in msg and "\n" not in msg


def test_targets_matching_a_non_linear_is_an_error():
    with pytest.raises(TargetError, match="BertSelfOutput, not an nn.Linear"):
        variants.create("lora", targets=["attention.output"]).apply(tiny_bert())


def test_head_is_never_wrapped_and_trains_when_asked():
    model = variants.create("lora", targets="all-linear").apply(tiny_bert())
    assert type(model.classifier).__name__ == "Linear" and model.classifier.weight.requires_grad
    model = variants.create("lora", targets="all-linear", train_head=False).apply(tiny_bert())
    assert not model.classifier.weight.requires_grad
    with pytest.raises(TargetError, match="matched no module"):  # only the head would match
        variants.create("lora", targets=["classifier"]).apply(tiny_bert())


def test_head_baseline_needs_a_head():
    with pytest.raises(VariantError, match="head="):
        variants.create("head").apply(mlp())


BERT = "bert.encoder.layer.{}."
LLAMA = "model.layers.{}."


@pytest.mark.parametrize(
    "factory, spec, prefix, leaves",
    [
        (tiny_bert, "qv", BERT, ["attention.self.query", "attention.self.value"]),
        (tiny_bert, "o", BERT, ["attention.output.dense"]),
        (tiny_bert, "mlp", BERT, ["intermediate.dense", "output.dense"]),  # not attention.output.dense
        (tiny_llama, "qkvo", LLAMA, ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]),
        (tiny_llama, "mlp", LLAMA, ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]),
        (tiny_llama, ["q_proj"], LLAMA, ["self_attn.q_proj"]),
    ],
)
def test_presets_resolve_per_family(factory, spec, prefix, leaves):
    names = variants.resolve_targets(factory(), spec, head=("classifier", "lm_head"))
    assert sorted(names) == sorted(prefix.format(i) + leaf for i in range(2) for leaf in leaves)


def test_regex_matches_whole_names():
    names = variants.resolve_targets(tiny_llama(), r".*\.0\.self_attn\.(q|v)_proj")
    assert names == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]


def test_all_linear_excludes_the_head():
    names = variants.resolve_targets(tiny_llama(), "all-linear", head=("lm_head",))
    assert len(names) == 14 and "lm_head" not in names


@pytest.mark.parametrize("name", ["lora", "lora_plus", "dora"])
@pytest.mark.parametrize("targets, rank", [("qv", 8), ("q", 16), ("qkvo", 4), ("mlp", 7)])
def test_param_budget_sets_the_largest_rank_that_fits(name, targets, rank):
    # tiny BERT: hidden 32, intermediate 37, 2 layers. The budget of r=8 on q,v: 8 x (32+32) x 2 x 2 = 2048;
    # mlp: (32+37) x 2 matrices x 2 layers = 276 per rank -> floor(2048 / 276) = 7
    model = tiny_bert()
    dims = {n: (m.in_features, m.out_features) for n, m in model.named_modules() if hasattr(m, "in_features")}
    v = variants.create(name, targets=targets, param_budget=2048, rank=1)
    v.apply(model)
    per_rank = sum(sum(dims[n]) for n in v.target_modules)
    assert v.rank == 2048 // per_rank and v.rank * per_rank <= 2048 < (v.rank + 1) * per_rank
    ab = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and ("lora_A" in n or "lora_B" in n))
    assert ab == v.rank * per_rank
    assert v.rank == rank and v.identity()["rank"] == rank
    assert v.cfg.rank == 1  # the options stay as given; the resolved rank is state
    layer = model.get_submodule(v.target_modules[0])
    assert layer.scaling == v.cfg.alpha / v.rank  # the scale follows the resolved rank


def test_param_budget_below_rank_one_is_an_error():
    with pytest.raises(VariantError, match="param_budget=10: rank 1 on these 4 targets already takes 256"):
        variants.create("lora", targets="qv", param_budget=10).apply(tiny_bert())
