"""Causal language modelling on a real pretrained decoder: domain adaptation measured against forgetting.

A pretrained Llama-family model is fine-tuned on next-token prediction over text it was not tuned for,
and scored on held-out text of the same kind and on unrelated text:

- ``perplexity`` = exp(mean next-token NLL over every predicted token of the split) — the main metric,
  lower is better (``nll`` is the same mean, in nats);
- ``forget_perplexity``: the same on a second, unrelated text (modern news headlines), and
  ``forget_increase`` = forget_perplexity - the untouched base model's value (0 for the base model).

Configs (one module, options chosen by YAML):

- ``task=lm`` (offline): SmolLM2-135M-Instruct (``model: smollm2``, the checkpoint ``make assets``
  converts) on Jane Austen's six novels (``dataset: austen``), forgetting on Guardian headlines.
- ``task=lm_gsm8k`` (needs the Hugging Face Hub, meant for GPUs): a hub model by name on GSM8K
  (``dataset: gsm8k``, question + worked answer as plain text). Offline it fails with one line.

``model`` may also be a local directory saved with ``save_pretrained`` (loaded with no hub access); a
quantized base comes from the top-level ``model`` node (``loading``). ``lm_task`` is the part ``lm_file``
(``custom.py``, your own text) shares.

Text becomes blocks: each pool of documents is tokenised, documents are joined with the tokenizer's EOS
token into one stream, and the stream is cut into consecutive, non-overlapping blocks of ``seq_len``
tokens (the remainder is dropped). Every block is full, so no padding and no masking is needed; ``labels``
equal ``input_ids`` (the model shifts them). Token streams and the base model's perplexities are cached
under ``cache_dir`` (written atomically: parallel sweep jobs may race), so a sweep tokenises and scores the
base once; a cache file that does not read back whole (or not as what its name promises) is rebuilt with a
warning naming it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import TensorDataset

from experiments import assets, files
from experiments.files import atomic_write
from experiments.hub import (
    Hub,
    Loading,
    local_dir,
    local_or_hub,
    looks_like_path,
    model_fingerprint,
    quiet,
    tokenizer_fingerprint,
)
from experiments.tasks import Task, TaskError, register_task
from experiments.trainer import pick_device, to_device

SMOLLM2 = "smollm2"  # the offline checkpoint; any other ``model`` value is a Hugging Face Hub name
DATASETS = ("austen", "gsm8k")
FORGET_DATASETS = ("guardian",)
# Validation and test text comes from two whole novels that training never sees (the two shortest, about
# a quarter of the corpus). Holding out whole books rather than interleaved passages means no sentence,
# scene or run of text is shared with training, and the score measures Austen's style and vocabulary in
# general rather than recall of one book's plot and names.
AUSTEN_HELDOUT = ("northangerabbey", "persuasion")
EVAL_TOKENS = 1024  # tokens per batch when scoring the base model and the forgetting text (fixed: see below)


# --- text ------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=4)
def _austen(assets_dir: str) -> dict[str, str]:
    return assets.austen(assets_dir)  # ~2 s of R-data parsing: once per process (tests build many times)


@functools.lru_cache(maxsize=1)
def _guardian() -> tuple[str, ...]:
    return tuple(assets.guardian_headlines())


def text_pools(dataset: str, assets_dir: str, hub: Hub | None = None) -> dict[str, list[str]]:
    """{"train": documents, "heldout": documents}; validation and test blocks both come from "heldout"."""
    if dataset == "austen":
        novels = _austen(assets_dir)
        return {"train": [novels[k] for k in sorted(novels) if k not in AUSTEN_HELDOUT],
                "heldout": [novels[k] for k in AUSTEN_HELDOUT]}
    # GSM8K: training on the train split, validation and test from the test split (1,319 problems)
    splits = hub.load(_load_gsm8k)
    return {pool: [f"Question: {row['question']}\nAnswer: {row['answer']}" for row in rows]
            for pool, rows in splits.items()}


def _load_gsm8k() -> dict[str, list[dict]]:
    import datasets

    with quiet():
        ds = datasets.load_dataset("openai/gsm8k", "main")
    return {"train": list(ds["train"]), "heldout": list(ds["test"])}


def forget_pool(forget_dataset: str) -> list[str]:
    # one document, a headline per line: a block spans several headlines
    return ["\n".join(_guardian())]


# --- model and tokenizer ---------------------------------------------------------------------------

def _local_or_hub(model: str, assets_dir: str, hub: Hub | None, load):
    return local_or_hub(model, hub, load, (SMOLLM2, lambda: assets.smollm2_path(assets_dir)), TaskError)


def model_hub_names(model: str) -> list[str]:
    """What ``model`` needs from the hub: nothing for ``smollm2`` or a local directory."""
    return [] if model == SMOLLM2 or local_dir(model) is not None or looks_like_path(model) else [f"model {model}"]


def load_tokenizer(model: str, assets_dir: str, hub: Hub | None = None):
    from transformers import AutoTokenizer

    tok = _local_or_hub(model, assets_dir, hub,
                        lambda path, local: AutoTokenizer.from_pretrained(path, local_files_only=local))
    if tok.eos_token_id is None:  # documents are joined with EOS
        raise TaskError(f"invalid option task.model={model!r}: its tokenizer has no EOS token")
    return tok


def load_model(model: str, assets_dir: str, hub: Hub | None = None, *, loading: Loading | None = None) -> nn.Module:
    """``AutoModelForCausalLM`` in float32; ``loading``: quantized (``lm_head`` kept as it is) and/or with
    gradient checkpointing."""
    from transformers import AutoModelForCausalLM

    loading = loading or Loading()
    kw = loading.from_pretrained_kwargs(("lm_head",))

    def load(path, local):
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=local, **kw)

    # fork_rng: building the task must not move the run's RNG streams, whatever the loader initialises
    with torch.random.fork_rng(devices=[]), quiet():
        m = _local_or_hub(model, assets_dir, hub, load)
    m.config.use_cache = False  # nothing here generates; a KV cache would only cost memory in training
    return loading.prepare(m).eval()


def model_name(model: str) -> str:
    """The record's ``model``: the checkpoint's name, a local directory's own name, a hub repo's name."""
    if model == SMOLLM2:
        return "SmolLM2-135M-Instruct"
    path = local_dir(model)
    return path.name if path is not None else model.split("/")[-1]


def text_fingerprint(pools: dict[str, list[str]]) -> str:
    h = hashlib.sha256()
    for pool in sorted(pools):
        h.update(f"<{pool}:{len(pools[pool])}>".encode())
        for doc in pools[pool]:
            h.update(hashlib.sha256(doc.encode()).digest())
    return h.hexdigest()[:16]


# --- tokens and blocks -----------------------------------------------------------------------------

def token_streams(pools: dict[str, list[str]], tok, cache_dir: str, label: str) -> tuple[dict, str]:
    """Each pool as one token stream (documents joined by EOS), cached on disk; and the data fingerprint.

    The cache key is the text and the tokenizer; blocks are cut after loading, so every ``seq_len`` shares
    one file. The file carries a sha256 of its streams (metadata ``sha256``), checked on loading.
    """
    data_fp = text_fingerprint(pools)
    key = hashlib.sha256(f"{data_fp}|{tokenizer_fingerprint(tok)}".encode()).hexdigest()[:16]
    path = Path(cache_dir).expanduser() / "causal_lm" / f"tokens-{label}-{key}.safetensors"
    if path.exists():
        streams = _cached_streams(path, set(pools), tok)
        if streams is not None:
            return {k: v.long() for k, v in streams.items()}, data_fp
    streams = {}
    for pool, docs in pools.items():
        # verbose=False: whole novels are far longer than the model's context; that is expected here
        ids = tok(list(docs), add_special_tokens=False, verbose=False)["input_ids"]
        flat = [t for doc in ids for t in [*doc, tok.eos_token_id]]
        streams[pool] = torch.tensor(flat, dtype=torch.int32)  # vocabularies fit int32: half the disk
    atomic_write(path, lambda tmp: save_file(streams, str(tmp), metadata={"sha256": streams_sha(streams)}))
    return {k: v.long() for k, v in streams.items()}, data_fp


def streams_sha(streams: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(streams):
        h.update(f"<{name}:{len(streams[name])}>".encode())
        h.update(streams[name].numpy().tobytes())
    return h.hexdigest()


def _cached_streams(path: Path, pools: set[str], tok) -> dict | None:
    """The cached int32 streams, or None (with a warning naming the file) when the file does not load, holds
    other pools, or fails its checksum. Files from before the checksum are checked by shape: 1-d int32 streams,
    each ending in EOS."""
    try:
        with safe_open(path, "pt") as f:
            stored, streams = (f.metadata() or {}).get("sha256"), {k: f.get_tensor(k) for k in f.keys()}
        if set(streams) != pools:
            raise ValueError(f"pools {sorted(streams)}, expected {sorted(pools)}")
        if stored is not None and stored != streams_sha(streams):
            raise ValueError("checksum mismatch")
        for name, t in streams.items():
            if t.dtype != torch.int32 or t.dim() != 1 or (len(t) and t[-1] != tok.eos_token_id):
                raise ValueError(f"pool {name!r} is not a stream of token ids ending in EOS")
    except Exception as e:  # noqa: BLE001 - any unreadable cache entry is rebuilt, never trusted
        files.warn_corrupt(path, e, "token cache")
        return None
    return streams


def blocks(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Consecutive, non-overlapping ``seq_len``-token blocks of a stream (the remainder is dropped)."""
    n = len(stream) // seq_len
    return stream[: n * seq_len].view(n, seq_len)


def pick(pool: torch.Tensor, sizes: dict[str, int], seed: int, what: str) -> dict[str, torch.Tensor]:
    """Disjoint, seeded random subsets of a pool's blocks: the first ``sizes[a]`` of one permutation go to
    ``a``, the next ``sizes[b]`` to ``b``, ... (so a block never lands in two splits)."""
    need = sum(sizes.values())
    if need > len(pool):
        names = "+".join(f"task.{k}" for k in sizes)
        raise TaskError(f"invalid option {names}={need}: only {len(pool)} blocks of {what} text at this seq_len")
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))
    out, start = {}, 0
    for name, n in sizes.items():
        out[name] = pool[order[start:start + n]]
        start += n
    return out


def collate(rows) -> dict[str, torch.Tensor]:
    ids = torch.stack([r[0] for r in rows])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


# --- the metric ------------------------------------------------------------------------------------

def token_nll(model: nn.Module, batches) -> tuple[float, int]:
    """Summed next-token NLL and the number of predicted tokens (position t predicts token t+1; labels of
    -100 are skipped). Summing, not averaging per batch, makes the mean a mean over tokens."""
    total, count = 0.0, 0
    for batch in batches:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        targets = batch["labels"][:, 1:]
        # at least float32 even under bf16 autocast: a 49k-way log-softmax in bf16 is visibly off
        logits = logits[:, :-1].flatten(0, 1).to(torch.promote_types(logits.dtype, torch.float32))
        nll = nn.functional.cross_entropy(logits, targets.flatten(), ignore_index=-100, reduction="sum")
        total += nll.item()
        count += int((targets != -100).sum())
    return total, count


DIRECTIONS = {"perplexity": "min", "nll": "min", "forget_perplexity": "min", "forget_increase": "min"}


def perplexity(model: nn.Module, batches) -> dict[str, float]:
    total, count = token_nll(model, batches)
    return {"perplexity": math.exp(total / count), "nll": total / count}


def _fixed_batches(split: torch.Tensor, device: torch.device):
    """Batches of EVAL_TOKENS tokens, whatever optim.eval_batch_size says: the base model's cached score and
    a run's score then come from the same arithmetic, so an untouched model's forget_increase is exactly 0."""
    size = max(1, EVAL_TOKENS // split.shape[1])
    for i in range(0, len(split), size):
        yield to_device(collate([(row,) for row in split[i:i + size]]), device)


def base_perplexity(model: nn.Module, split: torch.Tensor, model_fp: str, cache_dir: str) -> dict[str, float]:
    """The untouched model's perplexity on ``split``, computed once and cached, keyed by the exact blocks and
    the weights (and the device kind: CPU and CUDA kernels differ in the last bits).

    Computed in float32 on the machine's best device; a ``bf16=true`` run is scored under bf16 autocast, so
    its forget_increase includes bf16 rounding (small next to real forgetting, but not zero).
    """
    quantized = getattr(model, "is_quantized", False)  # bitsandbytes: scored where it was loaded, not moved
    device = next(model.parameters()).device if quantized else pick_device("auto")
    blocks_fp = hashlib.sha256(split.to(torch.int32).numpy().tobytes()).hexdigest()[:16]
    key = hashlib.sha256(f"{model_fp}|{blocks_fp}|{tuple(split.shape)}|{device.type}|{EVAL_TOKENS}".encode())
    path = Path(cache_dir).expanduser() / "causal_lm" / f"base-{key.hexdigest()[:16]}.json"
    if path.exists():
        try:
            record = json.loads(path.read_text())
            metrics = record["metrics"]
            if [record["model"], record["blocks"], record["shape"]] != [model_fp, blocks_fp, list(split.shape)]:
                raise ValueError("a record for other weights or blocks")
            ppl, nll = metrics["perplexity"], metrics["nll"]
            if not (type(ppl) is type(nll) is float and math.isfinite(nll) and math.isclose(ppl, math.exp(nll))):
                raise ValueError(f"perplexity {ppl!r} is not exp(nll {nll!r})")
            return metrics
        except Exception as e:  # noqa: BLE001 - any unreadable cache entry is rebuilt, never trusted
            files.warn_corrupt(path, e, "base-perplexity cache")
    model.to(device)
    with torch.inference_mode():
        metrics = perplexity(model, _fixed_batches(split, device))
    if not quantized:
        model.to("cpu")  # the trainer moves it to the run's device
    record = {"metrics": metrics, "model": model_fp, "blocks": blocks_fp, "shape": list(split.shape),
              "device": device.type}
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(record, indent=1)))
    return metrics


# --- the task --------------------------------------------------------------------------------------

# the LM head is tied to the input embeddings (SmolLM2): adapters never wrap it and it stays frozen;
# full fine-tuning and GaLore train it through the shared embedding matrix
_LM = dict(metrics=DIRECTIONS, main_metric="perplexity", head=("lm_head",), train_head=False, default_targets="qv")


# TinyLlama-1.1B on GSM8K (conf/task/lm_gsm8k.yaml says why): a problem with its answer is ~100-300 tokens;
# 2000 of ~2,200 training blocks; validation + test from ~340 blocks of the test split
_GSM8K = {"model": "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T", "dataset": "gsm8k", "seq_len": 512,
          "n_train": 2000, "n_val": 64, "n_test": 128, "n_forget": 64}


@register_task("lm_gsm8k", hub=True, defaults=_GSM8K, **_LM)
@register_task("lm", smoke={"seq_len": 32, "n_train": 8, "n_val": 3, "n_test": 3, "n_forget": 2}, **_LM)
def build(model: str = SMOLLM2, dataset: str = "austen", forget_dataset: str | None = "guardian",
          seq_len: int = 128, n_train: int = 2048, n_val: int = 32, n_test: int = 32, n_forget: int = 32,
          data_seed: int = 0, cache_dir: str = "~/.cache/lorabench", assets_dir: str | None = None, *,
          loading: Loading | None = None) -> Task:
    if dataset not in DATASETS:
        raise TaskError(f"invalid option task.dataset={dataset!r}: expected one of {', '.join(DATASETS)}")
    if forget_dataset is not None and forget_dataset not in FORGET_DATASETS:
        raise TaskError(f"invalid option task.forget_dataset={forget_dataset!r}: expected null or "
                        f"{', '.join(FORGET_DATASETS)}")
    check_seq_len(seq_len)
    for name, n in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test), ("n_forget", n_forget)):
        if not isinstance(n, int) or n < 1:
            raise TaskError(f"invalid option task.{name}={n!r}: expected an integer >= 1")
    assets_dir = str(assets.assets_dir(assets_dir))

    from_hub = model_hub_names(model) + ["dataset openai/gsm8k"] * (dataset == "gsm8k")
    hub = Hub.connect(from_hub, instead="task=lm") if from_hub else None  # unreachable: fail before any work

    # the data first, then the tokenizer: both are cheap and the likeliest to be missing, and a missing assets
    # directory must be one line before SmolLM2 is converted (the tokenizer comes from the converted folder)
    pools = text_pools(dataset, assets_dir, hub)
    forget_docs = None if forget_dataset is None else forget_pool(forget_dataset)
    tok = load_tokenizer(model, assets_dir, hub)
    streams, data_fp = token_streams(pools, tok, cache_dir, dataset)
    info = {"dataset": dataset}
    if dataset == "austen":
        info["heldout_novels"] = list(AUSTEN_HELDOUT)
    forget = None
    if forget_docs is not None:
        f_streams, f_fp = token_streams({"all": forget_docs}, tok, cache_dir, forget_dataset)
        forget = {"name": forget_dataset, "fingerprint": f_fp, "stream": f_streams["all"], "n": n_forget}
    return lm_task(model=model, tok=tok, streams=streams, data_fp=data_fp, info=info, seq_len=seq_len,
                   sizes={"n_train": n_train, "n_val": n_val, "n_test": n_test}, data_seed=data_seed,
                   cache_dir=cache_dir, assets_dir=assets_dir, hub=hub, loading=loading, forget=forget,
                   what=dataset)


def _resolve_sizes(sizes: dict, available: dict, seq_len: int, data_option: str) -> dict:
    """Block counts with None resolved (see ``lm_task``); an empty split is one line."""
    n_val, n_test, held = sizes["n_val"], sizes["n_test"], available["heldout"]
    if n_val is None and n_test is None:
        n_val, n_test = held // 2, held - held // 2
    elif n_val is None or n_test is None:
        n_val, n_test = (held - n_test, n_test) if n_val is None else (n_val, held - n_val)
    out = {"n_train": available["train"] if sizes["n_train"] is None else sizes["n_train"], "n_val": n_val,
           "n_test": n_test}
    for name, n in out.items():
        if n < 1:
            raise TaskError(f"invalid option {data_option}: the {name[2:]} split is empty (blocks of "
                            f"task.seq_len={seq_len} tokens: {available['train']} training, {held} held-out; give "
                            "more text or a shorter seq_len)")
    return out


def check_seq_len(seq_len) -> None:
    if not isinstance(seq_len, int) or seq_len < 2:
        raise TaskError(f"invalid option task.seq_len={seq_len!r}: expected an integer >= 2")


def lm_task(*, model: str, tok, streams: dict, data_fp: str, info: dict, seq_len: int, sizes: dict,
            data_seed: int, cache_dir: str, assets_dir: str, hub: Hub | None, loading: Loading | None,
            forget: dict | None, what: str, data_option: str = "task.dataset") -> Task:
    """What every causal-LM task shares once its token streams are known: the model, the seeded blocks,
    the untouched model's perplexities, the metrics, the Task. ``streams``: {"train", "heldout"} token
    streams; ``sizes``: {"n_train", "n_val", "n_test"} in blocks (None: every training block; half the
    held-out blocks each, or what the other leaves); ``forget``: None, or {"name", "fingerprint",
    "stream", "n"} for the forgetting text."""
    loading = loading or Loading()
    net = load_model(model, assets_dir, hub, loading=loading)
    loaded = loading.info(net)  # before any forward pass: bitsandbytes' int8 layers move their scales then
    max_len = getattr(net.config, "max_position_embeddings", None)
    if max_len is not None and seq_len > max_len:
        raise TaskError(f"invalid option task.seq_len={seq_len}: {model} handles at most {max_len} tokens")
    available = {"train": len(streams["train"]) // seq_len, "heldout": len(streams["heldout"]) // seq_len}
    sizes = _resolve_sizes(sizes, available, seq_len, data_option)

    # the split depends only on data_seed, never on the run's seed: every run of a sweep sees the same blocks
    train = pick(blocks(streams["train"], seq_len), {"n_train": sizes["n_train"]}, data_seed, f"{what} training")
    held = pick(blocks(streams["heldout"], seq_len), {"n_val": sizes["n_val"], "n_test": sizes["n_test"]},
                data_seed + 1, f"{what} held-out")
    model_fp = model_fingerprint(net)
    base = {"val": base_perplexity(net, held["n_val"], model_fp, cache_dir)["perplexity"],
            "test": base_perplexity(net, held["n_test"], model_fp, cache_dir)["perplexity"]}
    info = {**info, "data_fingerprint": data_fp, "tokenizer": tokenizer_fingerprint(tok),
            "model_fingerprint": model_fp, "seq_len": seq_len, "data_seed": data_seed,
            "blocks": {"train": sizes["n_train"], "val": sizes["n_val"], "test": sizes["n_test"]},
            "blocks_available": dict(available)}

    forget_blocks = None
    if forget is not None:
        forget_blocks = pick(blocks(forget["stream"], seq_len), {"n_forget": forget["n"]}, data_seed + 2,
                             forget["name"])["n_forget"]
        base["forget"] = base_perplexity(net, forget_blocks, model_fp, cache_dir)["perplexity"]
        info.update(forget_dataset=forget["name"], forget_fingerprint=forget["fingerprint"])
        info["blocks"]["forget"] = forget["n"]
        info["blocks_available"]["forget"] = len(forget["stream"]) // seq_len
    info["base_perplexity"] = base
    info.update(loaded)

    def loss(model, batch):
        return model(**batch).loss

    scored = {}  # the forgetting score of the weights as they were last scored

    def evaluate(model, loader) -> dict:
        metrics = perplexity(model, loader)
        if forget_blocks is not None:
            # the trainer scores val and then test on the same weights: score the forgetting text once.
            # Every in-place update (optimizer step, restoring the best weights) bumps a tensor's _version.
            weights = (id(model), tuple(p._version for p in model.parameters()))
            if scored.get("weights") != weights:
                after = perplexity(model, _fixed_batches(forget_blocks, next(model.parameters()).device))
                scored.update(weights=weights, after=after["perplexity"])
            metrics.update(forget_perplexity=scored["after"], forget_increase=scored["after"] - base["forget"])
        return metrics

    untouched = {"name": "the untouched model"}
    for split in ("val", "test"):
        untouched[split] = {"perplexity": base[split], "nll": math.log(base[split])}
        if forget_blocks is not None:
            untouched[split].update(forget_perplexity=base["forget"], forget_increase=0.0)
    return Task(model=net, model_name=model_name(model), train=TensorDataset(train["n_train"]),
                val=TensorDataset(held["n_val"]), test=TensorDataset(held["n_test"]), loss=loss, evaluate=evaluate,
                trivial=untouched, collate=collate, info=info)
