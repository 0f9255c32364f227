"""The causal-LM task on the real offline assets: SmolLM2-135M on Austen, forgetting on news headlines.

Fast tests use seq_len 32 and a handful of blocks; the tokenised corpus and the base model's scores are
cached in one directory per module, so only the first build pays for them.
"""

from __future__ import annotations

import math
import time
from types import SimpleNamespace

import pytest
import torch
from conftest import compose_config
from torch import nn
from torch.utils.data import DataLoader

from experiments import assets, hub, records, tasks
from experiments.assets import AssetError
from experiments.tasks import TaskError, causal_lm
from experiments.train import ConfigError, _variant, run
from experiments.trainer import OptimConfig, fit

TINY = tasks.get("lm").smoke  # seq_len 32; 8 training, 3 val, 3 test and 2 forget blocks
TINY_OVERRIDES = [f"task.{k}={v}" for k, v in TINY.items()]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("lm-cache"))


def build(cache_dir, **options):
    return tasks.build("lm", cache_dir=str(cache_dir), **{**TINY, **options})


def config(tmp_path, cache_dir, task="lm", *overrides) -> dict:
    return compose_config("logger=none", *overrides, task=task, results_dir=tmp_path / "results", cache_dir=cache_dir)


def rows(split) -> torch.Tensor:
    return torch.stack([r[0] for r in split])


def test_blocks_cut_a_stream_into_consecutive_full_pieces():
    assert causal_lm.blocks(torch.arange(10), 3).tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    picked = causal_lm.pick(torch.arange(20).view(10, 2), {"a": 3, "b": 4}, seed=0, what="x")
    a, b = picked["a"][:, 0].tolist(), picked["b"][:, 0].tolist()
    assert len(a) == 3 and len(b) == 4 and not set(a) & set(b)
    assert torch.equal(causal_lm.pick(torch.arange(20).view(10, 2), {"a": 3}, seed=0, what="x")["a"], picked["a"])
    with pytest.raises(TaskError, match=r"task.a\+task.b=11: only 10 blocks"):
        causal_lm.pick(torch.arange(20).view(10, 2), {"a": 5, "b": 6}, seed=0, what="x")


def test_splits_are_full_blocks_seeded_and_validation_text_is_never_trained_on(cache):
    task = build(cache)
    train, val, test = rows(task.train), rows(task.val), rows(task.test)
    assert train.shape == (8, 32) and val.shape == (3, 32) and test.shape == (3, 32)
    again = build(cache)
    assert torch.equal(rows(again.train), train) and torch.equal(rows(again.val), val)
    other = build(cache, data_seed=1)
    assert not torch.equal(rows(other.train), train) and not torch.equal(rows(other.val), val)
    assert not {tuple(r) for r in val.tolist()} & {tuple(r) for r in test.tolist()}

    # the text itself: validation/test blocks come from the held-out novels, training blocks from the others
    novels = assets.austen(assets.assets_dir())
    tok = causal_lm.load_tokenizer("smollm2", str(assets.assets_dir()))
    held = "".join(novels[k] for k in causal_lm.AUSTEN_HELDOUT)
    trained = "".join(v for k, v in novels.items() if k not in causal_lm.AUSTEN_HELDOUT)
    for block in torch.cat([val, test]):
        text = tok.decode(block)
        assert text in held and text not in trained
    for block in train:
        assert tok.decode(block) in trained
    assert task.info["blocks"] == {"train": 8, "val": 3, "test": 3, "forget": 2}
    assert task.info["heldout_novels"] == ["northangerabbey", "persuasion"]
    assert len(task.info["data_fingerprint"]) == 16 and task.info["blocks_available"]["heldout"] > 5000


class Bigram(nn.Module):
    """A hand-checkable LM: the logits for the next token depend only on the current token."""

    def __init__(self, vocab: int = 5):
        super().__init__()
        self.table = nn.Parameter(torch.randn(vocab, vocab, dtype=torch.float64,
                                              generator=torch.Generator().manual_seed(0)))

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.table[input_ids])


def test_perplexity_is_exp_of_the_mean_nll_over_tokens_not_batches():
    model = Bigram()
    a = torch.tensor([[0, 1, 2, 3]])
    b = torch.tensor([[4, 3, 2, 1], [1, 1, 0, 0]])
    b_labels = b.clone()
    b_labels[1, 2:] = -100  # two positions excluded from the mean
    batches = [{"input_ids": a, "attention_mask": torch.ones_like(a), "labels": a},
               {"input_ids": b, "attention_mask": torch.ones_like(b), "labels": b_labels}]
    logp = torch.log_softmax(model.table, -1)
    nlls = []
    for batch in batches:
        for ids, labels in zip(batch["input_ids"], batch["labels"], strict=True):
            nlls += [-logp[ids[t], labels[t + 1]].item() for t in range(3) if labels[t + 1] != -100]
    assert len(nlls) == 3 + 3 + 1
    with torch.no_grad():
        m = causal_lm.perplexity(model, batches)
    assert m["nll"] == pytest.approx(sum(nlls) / len(nlls), rel=1e-12)
    assert m["perplexity"] == pytest.approx(math.exp(sum(nlls) / len(nlls)), rel=1e-12)
    per_batch = [sum(nlls[:3]) / 3, sum(nlls[3:]) / 4]
    assert m["nll"] != pytest.approx(sum(per_batch) / 2)  # a mean of batch means would weigh tokens unevenly


def test_untouched_model_has_zero_forget_increase_and_its_base_perplexity(cache):
    task = build(cache)
    loader = DataLoader(task.val, batch_size=2, collate_fn=task.collate)
    with torch.inference_mode():
        m = task.evaluate(task.model, loader)
    assert m["forget_increase"] == 0.0
    assert m["forget_perplexity"] == task.info["base_perplexity"]["forget"]
    assert m["perplexity"] == pytest.approx(task.info["base_perplexity"]["val"], rel=1e-4)  # other batch sizes
    assert 10 < m["perplexity"] < 200 and m["forget_perplexity"] > m["perplexity"]  # news is less like Austen


def test_forgetting_is_scored_once_per_state_of_the_weights(cache, monkeypatch):
    task = build(cache)
    scored = []
    fixed = causal_lm._fixed_batches
    monkeypatch.setattr(causal_lm, "_fixed_batches", lambda split, device: scored.append(1) or fixed(split, device))
    loader = DataLoader(task.val, batch_size=2, collate_fn=task.collate)
    with torch.inference_mode():
        first = task.evaluate(task.model, loader)
        again = task.evaluate(task.model, loader)  # val, then test, on the same weights: scored once
    assert len(scored) == 1 and again["forget_perplexity"] == first["forget_perplexity"]
    with torch.no_grad():
        task.model.model.norm.weight.mul_(1.5)  # an in-place update, as an optimizer step makes
    with torch.inference_mode():
        moved = task.evaluate(task.model, loader)
    assert len(scored) == 2 and moved["forget_perplexity"] != first["forget_perplexity"]


def test_tokens_and_base_perplexities_are_computed_once_and_cached(tmp_path, monkeypatch):
    torch.manual_seed(3)
    first = build(tmp_path)
    after_build = torch.rand(3)
    torch.manual_seed(3)
    assert torch.equal(after_build, torch.rand(3))  # building (model loading included) leaves the RNG alone
    files = sorted(p.name for p in (tmp_path / "causal_lm").iterdir())
    assert [f.split("-")[0] for f in files] == ["base"] * 3 + ["tokens"] * 2 and not any("tmp" in f for f in files)

    monkeypatch.setattr(causal_lm, "perplexity", lambda *a, **k: pytest.fail("base perplexity recomputed"))
    real = causal_lm.load_tokenizer

    class NoEncoding:  # the real tokenizer for fingerprints, but encoding text fails
        def __init__(self, tok):
            self.tok = tok

        def __getattr__(self, name):
            return getattr(self.tok, name)

        def __call__(self, *a, **k):
            pytest.fail("the corpus was tokenised again")

    monkeypatch.setattr(causal_lm, "load_tokenizer", lambda *a: NoEncoding(real(*a)))
    second = build(tmp_path)
    assert second.info == first.info
    assert torch.equal(rows(second.val), rows(first.val))


def test_end_to_end_lora_writes_an_ok_record_with_perplexity_and_forgetting(tmp_path, cache):
    cfg = config(tmp_path, cache, "lm", "variant=lora", *TINY_OVERRIDES, "optim.max_steps=2", "optim.batch_size=2",
                 "optim.eval_batch_size=4")
    record = run(cfg)
    assert record["status"] == "ok", record["error"]
    on_disk = records.load(records.record_path(tmp_path / "results", record["run_id"]))
    for split in ("val", "test"):
        assert set(on_disk["metrics"][split]) == {"perplexity", "nll", "forget_perplexity", "forget_increase"}
        assert math.isfinite(on_disk["metrics"][split]["forget_increase"])
    assert on_disk["model"] == "SmolLM2-135M-Instruct" and on_disk["task"] == "lm"
    assert on_disk["targets"][:2] == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    assert on_disk["cost"]["trainable_params"] == 30 * 8 * ((576 + 576) + (576 + 192))  # r(in+out), q and v
    assert set(on_disk["task_info"]["base_perplexity"]) == {"val", "test", "forget"}
    assert on_disk["history"][-1]["step"] == 2


@pytest.mark.parametrize("name", ["full", "galore", "dora", "adalora"])
def test_other_variants_train_the_tied_model(name, tmp_path, cache):
    task = build(cache)
    model = task.model
    embed = model.model.embed_tokens.weight
    before = embed.detach().clone()
    # the YAML's defaults; GaLore on q/v only here: an SVD of every Linear's gradient is slow on a CPU
    overrides = ["variant.targets=qv"] if name == "galore" else []
    variant = _variant(config(tmp_path, cache, "lm", f"variant={name}", *overrides), task.spec)
    model = variant.apply(model)
    result = fit(model, variant, task, OptimConfig(lr=1e-3, max_steps=2, batch_size=2, eval_batch_size=4,
                                                        warmup_ratio=0.0), device="cpu", progress=False)
    assert math.isfinite(result["metrics"]["test"]["perplexity"])
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied after surgery
    trained_embedding = not torch.equal(embed.detach(), before)
    assert trained_embedding == (name in ("full", "galore"))  # adapters leave the tied head/embedding frozen


def test_hub_config_composes_and_fails_offline_in_one_line_quickly(tmp_path, cache):
    cfg = config(tmp_path, cache, "lm_gsm8k")
    assert cfg["task"]["dataset"] == "gsm8k" and cfg["task"]["model"].startswith("TinyLlama/")
    assert {"n_train", "n_val", "n_test", "n_forget", "seq_len"} <= set(cfg["task"])
    start = time.perf_counter()
    with pytest.raises(AssetError) as err:  # conftest sets HF_HUB_OFFLINE=1
        tasks.build("lm_gsm8k", **{k: v for k, v in cfg["task"].items() if k != "name"})
    message = str(err.value)
    assert "\n" not in message and "HF_HUB_OFFLINE" in message and "task=lm" in message
    assert time.perf_counter() - start < 30
    with pytest.raises(ConfigError, match="use task=lm offline"):
        run(cfg)
    assert not (tmp_path / "results").exists()


def test_hub_config_without_network_fails_in_one_line(tmp_path, cache, monkeypatch):
    for var in hub.OFFLINE_VARIABLES:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hub, "unreachable", lambda: "huggingface.co: Name or service not known")
    monkeypatch.setattr(causal_lm, "_load_gsm8k", lambda: pytest.fail("tried the hub"))
    opts = {k: v for k, v in config(tmp_path, cache, "lm_gsm8k")["task"].items() if k != "name"}
    with pytest.raises(AssetError, match="unreachable") as err:
        tasks.build("lm_gsm8k", **{**opts, **TINY})
    assert "\n" not in str(err.value)


def test_gsm8k_text_path_with_a_stand_in_dataset(cache, monkeypatch):
    problem = {"question": "Tom has 3 apples and buys 4 more. How many apples does he have?",
               "answer": "He has 3 + 4 = <<3+4=7>>7 apples.\n#### 7"}
    monkeypatch.setattr(causal_lm, "_load_gsm8k", lambda: {"train": [problem] * 40, "heldout": [problem] * 20})
    pools = causal_lm.text_pools("gsm8k", str(assets.assets_dir()), hub.Hub(["gsm8k"], "task=lm", local_only=True))
    assert pools["train"][0] == f"Question: {problem['question']}\nAnswer: {problem['answer']}"
    assert len(pools["train"]) == 40 and len(pools["heldout"]) == 20
    task = tasks.build("lm_gsm8k", model="smollm2", dataset="gsm8k", cache_dir=cache, **TINY)
    assert task.info["dataset"] == "gsm8k" and task.model_name == "SmolLM2-135M-Instruct"
    assert rows(task.train).shape == (8, 32) and rows(task.test).shape == (3, 32)


@pytest.mark.parametrize("override, fragment", [
    ("task.dataset=nope", "task.dataset='nope'"),
    ("task.seq_len=1", "task.seq_len=1"),
    ("task.n_val=0", "task.n_val=0"),
    ("task.n_forget=100000", "task.n_forget=100000: only"),
    ("task.forget_dataset=nope", "task.forget_dataset"),
    ("+task.bogus=1", "unknown option task.bogus"),
])
def test_bad_lm_options_are_one_line(override, fragment, tmp_path, cache):
    with pytest.raises(ConfigError) as err:
        run(config(tmp_path, cache, "lm", *TINY_OVERRIDES, override))
    assert fragment in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "results").exists()


@pytest.mark.slow
def test_default_lora_lowers_validation_perplexity_by_15_percent(tmp_path):
    record = run(config(tmp_path, tmp_path / "cache", "lm", "variant=lora"))
    assert record["status"] == "ok", record["error"]
    base = record["task_info"]["base_perplexity"]["val"]
    assert record["metrics"]["val"]["perplexity"] <= 0.85 * base
