"""Your own data and model: the generic tasks ``text_file`` and ``lm_file`` on tiny local files, and
``task.model`` pointing at a model directory saved by the test (no hub access at all).

Everything is written under tmp_path: the data, the models, the caches and the records.
"""

from __future__ import annotations

import csv
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import compose_config

from experiments import hub, records, tasks
from experiments.tasks import TaskError
from experiments.train import ConfigError, run

ROOT = Path(__file__).resolve().parents[1]
GOOD = ["a delight", "wonderful acting", "I loved every minute", "moving and funny", "a joy to watch",
        "smart and warm", "the best of the year", "beautifully shot"]
BAD = ["a bore", "terrible pacing", "I walked out", "flat and dull", "a waste of time", "clumsy and loud",
       "the worst of the year", "badly acted"]
SUBJECTS = ["The film", "This movie", "The sequel", "The remake", "Its second half"]


# --- data and models written by the tests ---------------------------------------------------------

def write_reviews(path: Path, rows: int | None = None) -> Path:
    """A CSV of short reviews with string labels (``negative``/``neutral``/``positive``), 96 rows."""
    out = []
    for s in SUBJECTS[:4]:
        for g, b in zip(GOOD, BAD, strict=True):
            out += [(f"{s}: {g}.", "positive"), (f"{s}: {b}.", "negative"),
                    (f"{s} runs {90 + len(out)} minutes.", "neutral")]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["review", "verdict", "stars"])
        for text, label in out[:rows]:
            w.writerow([text, label, {"negative": 1, "neutral": 3, "positive": 5}[label]])
    return path


def write_documents(path: Path, n: int = 60) -> Path:
    """A JSONL of short documents (one per line, field ``body``) in a tiny vocabulary."""
    with open(path, "w") as f:
        for i in range(n):
            s = SUBJECTS[i % len(SUBJECTS)]
            body = f"{s} was {GOOD[i % len(GOOD)]} . " * (2 + i % 3) + f"{s} was {BAD[(i * 3) % len(BAD)]} ."
            f.write(json.dumps({"id": i, "body": body}) + "\n")
    return path


def word_tokenizer(texts):
    """A word-level fast tokenizer trained on ``texts`` (offline), with pad, unk and EOS tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="</s>",
                                   model_max_length=64)


def save_tiny_llama(directory: Path, texts, hidden: int = 64) -> Path:
    """A random 2-layer Llama and a word tokenizer for ``texts``, saved with ``save_pretrained``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = word_tokenizer(texts)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64,
                      tie_word_embeddings=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      bos_token_id=None)
    LlamaForCausalLM(cfg).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def save_tiny_bert(directory: Path) -> Path:
    """A random 2-layer BERT with MiniLM's tokenizer (30,522 tokens; shipped in a pip package), saved."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from experiments import assets

    tok = AutoTokenizer.from_pretrained(assets.minilm_path())
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64)
    BertModel(cfg).save_pretrained(directory)  # an encoder without a head: the task puts a new one on
    tok.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("own-data")
    docs = write_documents(root / "docs.jsonl")
    texts = [json.loads(line)["body"] for line in docs.read_text().splitlines()]
    return {"csv": write_reviews(root / "reviews.csv"), "jsonl": docs,
            "llama": save_tiny_llama(root / "tiny-llama", texts), "bert": save_tiny_bert(root / "tiny-bert")}


def text_task(files, tmp_path, **options):
    return tasks.build("text_file", **{"data": str(files["csv"]), "text_column": "review", "label_column": "verdict",
                                       "model": str(files["bert"]), "max_length": 32,
                                       "cache_dir": str(tmp_path / "cache"), **options})


def lm_task(files, tmp_path, **options):
    return tasks.build("lm_file", **{"data": str(files["jsonl"]), "text_column": "body", "model": str(files["llama"]),
                                     "seq_len": 16, "cache_dir": str(tmp_path / "cache"), **options})


def config(tmp_path, task, *overrides) -> dict:
    return compose_config("logger=none", *overrides, task=task, results_dir=tmp_path / "results",
                          cache_dir=tmp_path / "cache")


def text_overrides(files, *more):
    return [f"task.data={files['csv']}", "task.text_column=review", "task.label_column=verdict",
            f"task.model={files['bert']}", "task.max_length=32", *more]


def lm_overrides(files, *more):
    return [f"task.data={files['jsonl']}", "task.text_column=body", f"task.model={files['llama']}", "task.seq_len=16",
            *more]


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to reach the hub fails the test: the offline switches are off, ``Hub.connect`` and
    every socket connection raise."""
    for var in hub.OFFLINE_VARIABLES:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hub.Hub, "connect", classmethod(lambda cls, names, instead: pytest.fail(f"hub: {names}")))

    def refuse(self, address, *a, **k):
        raise AssertionError(f"network access to {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)


# --- classification -------------------------------------------------------------------------------

def test_text_file_splits_a_csv_with_string_labels_stratified_seeded_and_fingerprinted(files, tmp_path, no_network):
    task = text_task(files, tmp_path)
    info = task.info
    assert info["label_names"] == ["negative", "neutral", "positive"]  # sorted: ids 0, 1, 2
    # 96 rows, none repeated: test 20 % (19), val 10 % (10) of them, seeded and stratified; train the rest
    assert info["dropped"] == {"duplicates": 0, "in_test": 0}
    assert {k: info[k]["n"] for k in ("train", "val", "test")} == {"train": 67, "val": 10, "test": 19}
    for split in ("train", "val", "test"):  # a third of each class in every split (to within one row)
        assert all(abs(f - 1 / 3) <= 1 / info[split]["n"] for f in info[split]["label_frac"]), split
    rows = {s: {tuple(r["input_ids"]) for r in getattr(task, s)} for s in ("train", "val", "test")}
    assert not (rows["train"] & rows["val"] or rows["train"] & rows["test"] or rows["val"] & rows["test"])
    assert task.model.config.id2label == {0: "negative", 1: "neutral", 2: "positive"}
    assert task.model_name == "tiny-bert" and info["model"] == str(files["bert"]) and info["model_fingerprint"]
    assert info["quantize"] == "none" and info["text_columns"] == ["review"] and len(info["data_sha256"]) == 64

    again = text_task(files, tmp_path / "elsewhere")  # another cache: the same split, the same fingerprints
    assert again.info == info
    other = text_task(files, tmp_path, split_seed=1)
    assert other.info["data_sha256"] == info["data_sha256"]  # the same data...
    assert all(other.info[s]["sha256"] != info[s]["sha256"] for s in ("train", "val", "test"))  # ...split anew


def test_labels_take_the_given_order_and_numbers_sort_numerically(files, tmp_path):
    given = text_task(files, tmp_path, labels=["positive", "negative", "neutral"])
    assert given.info["label_names"] == ["positive", "negative", "neutral"]
    assert given.model.config.label2id == {"positive": 0, "negative": 1, "neutral": 2}
    default = text_task(files, tmp_path)
    sizes = ("train", "val", "test")
    assert [given.info[s]["n"] for s in sizes] == [default.info[s]["n"] for s in sizes]  # the same rows, relabelled
    stars = text_task(files, tmp_path, label_column="stars")  # 1 / 3 / 5 stars -> ids 0 / 1 / 2
    assert stars.info["label_names"] == ["1", "3", "5"]
    from experiments.tasks.custom import label_ids

    assert label_ids([10, 9, 100], None, "o", "d") == ([1, 0, 2], ["9", "10", "100"])  # not "10" < "9"
    assert label_ids(["b", "a", "B"], None, "o", "d") == ([2, 1, 0], ["B", "a", "b"])  # code-point order


def test_a_given_test_file_is_the_test_set_and_never_trained_on(files, tmp_path):
    test = write_reviews(tmp_path / "test.csv", rows=24)  # the first 24 rows of the same data
    task = text_task(files, tmp_path, test_file=str(test))
    assert task.info["test"]["n"] == 24 and task.info["test_source"] == str(test)
    assert task.info["dropped"]["in_test"] == 24  # pool rows that are also in the test file
    assert task.info["train"]["available"] + task.info["val"]["available"] == 96 - 24


def test_a_jsonl_file_classifies_with_integer_labels(files, tmp_path):
    path = tmp_path / "pairs.jsonl"
    with open(path, "w") as f:
        for i in range(40):
            f.write(json.dumps({"a": f"{SUBJECTS[i % 5]} {GOOD[i % 8]}", "b": f"{BAD[i % 8]} {i}", "y": i % 2}) + "\n")
    task = tasks.build("text_file", data=str(path), text_column="a", text_pair_column="b", label_column="y",
                       model="minilm", max_length=32, cache_dir=str(tmp_path / "cache"))
    assert task.info["label_names"] == ["0", "1"] and task.info["text_columns"] == ["a", "b"]
    assert task.train[0]["input_ids"].count(102) == 2  # [CLS] a [SEP] b [SEP]: the pair is encoded together


def test_text_file_trains_end_to_end_and_the_record_carries_the_fingerprints(files, tmp_path, no_network):
    record = run(config(tmp_path, "text_file", *text_overrides(files, "optim.max_steps=2", "optim.batch_size=8")))
    assert record["status"] == "ok", record["error"]
    on_disk = records.load(records.record_path(tmp_path / "results", record["run_id"]))
    assert on_disk["model"] == "tiny-bert" and on_disk["task"] == "text_file"
    assert on_disk["task_info"]["label_names"] == ["negative", "neutral", "positive"]
    assert len(on_disk["task_info"]["data_sha256"]) == 64 and on_disk["task_info"]["test"]["sha256"]
    assert set(on_disk["metrics"]["test"]) == {"accuracy", "macro_f1"}
    assert all(t.endswith((".query", ".value")) for t in on_disk["targets"])  # the qv preset on BERT


# --- causal LM ------------------------------------------------------------------------------------

def test_lm_file_holds_out_whole_documents_and_cuts_full_blocks(files, tmp_path, no_network):
    task = lm_task(files, tmp_path)
    info = task.info
    assert info["documents"] == {"train": 48, "heldout": 12}  # 20 % of the 60 documents, whole
    train, val, test = (torch.stack([r[0] for r in getattr(task, s)]) for s in ("train", "val", "test"))
    assert train.shape[1] == val.shape[1] == test.shape[1] == 16
    assert len(train) == info["blocks_available"]["train"]  # n_train null: every training block
    assert len(val) + len(test) == info["blocks_available"]["heldout"]
    assert task.model_name == "tiny-llama" and set(task.trivial["test"]) == {"perplexity", "nll"}
    assert lm_task(files, tmp_path / "other").info == info  # stable: the same split and fingerprints
    reseeded = lm_task(files, tmp_path, data_seed=1)
    assert reseeded.info["data_fingerprint"] != info["data_fingerprint"]  # other documents held out
    sized = lm_task(files, tmp_path, n_train=5, n_val=2, n_test=3)
    assert [len(sized.train), len(sized.val), len(sized.test)] == [5, 2, 3]


def test_lm_file_trains_end_to_end(files, tmp_path, no_network):
    record = run(config(tmp_path, "lm_file", *lm_overrides(files, "optim.max_steps=3", "optim.batch_size=2",
                                                          "optim.lr=1e-2")))
    assert record["status"] == "ok", record["error"]
    assert record["model"] == "tiny-llama" and record["task_info"]["data_fingerprint"]
    assert record["metrics"]["test"]["perplexity"] < record["trivial"]["test"]["perplexity"]


# --- one-line errors ------------------------------------------------------------------------------

@pytest.mark.parametrize("task, override, fragment", [
    ("text_file", "task.text_column=body", "task.text_column='body': "),
    ("text_file", "task.label_column=grade", "task.label_column='grade': "),
    ("text_file", "task.text_pair_column=second", "task.text_pair_column='second'"),
    ("text_file", "task.data=/nonexistent/reviews.csv", "task.data='/nonexistent/reviews.csv': no such file"),
    ("text_file", "task.data=reviews_missing.csv", "task.data='reviews_missing.csv': no such file"),
    ("text_file", "task.data=null", "missing option task.data"),
    ("text_file", "task.test_split=test", "task.test_split='test'"),
    ("text_file", "task.model=/nonexistent/model", "task.model='/nonexistent/model': no such directory"),
    ("text_file", "task.labels=[positive,negative]", "has label 'neutral', which is not listed"),
    ("lm_file", "task.text_column=review", "task.text_column='review': "),
    ("lm_file", "task.data=/nonexistent/docs.jsonl", "no such file"),
    ("lm_file", "task.seq_len=4096", "task.seq_len=4096"),
])
def test_bad_data_options_are_one_line(task, override, fragment, files, tmp_path):
    base = text_overrides(files) if task == "text_file" else lm_overrides(files)
    with pytest.raises(ConfigError) as err:
        run(config(tmp_path, task, *base, override))
    message = str(err.value)
    assert fragment in message and "\n" not in message, message
    assert not (tmp_path / "results").exists()


def test_a_missing_column_names_the_columns_there_are(files, tmp_path):
    with pytest.raises(ConfigError, match=r"has no such column \(columns: review, verdict, stars\)"):
        run(config(tmp_path, "text_file", *text_overrides(files, "task.label_column=grade")))


def test_an_unreadable_file_and_an_empty_split_are_one_line(files, tmp_path):
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"this is not parquet at all\n")
    with pytest.raises(ConfigError) as err:
        run(config(tmp_path, "text_file", *text_overrides(files, f"task.data={broken}")))
    assert "could not be read as parquet" in str(err.value) and "\n" not in str(err.value)

    odd = tmp_path / "reviews.xlsx"
    odd.write_text("x")
    with pytest.raises(ConfigError, match="unknown file type '.xlsx'"):
        run(config(tmp_path, "text_file", *text_overrides(files, f"task.data={odd}")))

    few = write_reviews(tmp_path / "few.csv", rows=4)  # 4 rows: 1 test row (20 %), no validation row (10 %)
    with pytest.raises(ConfigError) as err:
        run(config(tmp_path, "text_file", *text_overrides(files, f"task.data={few}")))
    assert "the val split is empty" in str(err.value) and "\n" not in str(err.value)

    short = write_documents(tmp_path / "short.jsonl", n=4)  # held out: 1 document, not one block of 64 tokens
    with pytest.raises(ConfigError) as err:
        run(config(tmp_path, "lm_file", *lm_overrides(files, f"task.data={short}", "task.seq_len=64")))
    assert "split is empty" in str(err.value) and "\n" not in str(err.value)


def test_a_hub_data_set_name_goes_through_the_hub_and_fails_offline_in_one_line(files, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError) as err:
        run(config(tmp_path, "text_file", *text_overrides(files, "task.data=someone/some-reviews")))
    message = str(err.value)
    assert "data set someone/some-reviews" in message and "HF_HUB_OFFLINE" in message and "\n" not in message


# --- the command line, with task.model a directory saved by the test -------------------------------

@pytest.mark.parametrize("task", ["text_file", "lm_file"])
def test_cli_end_to_end_with_a_local_model_directory(task, files, tmp_path):
    args = text_overrides(files) if task == "text_file" else lm_overrides(files)
    env = {**os.environ, "WANDB_MODE": "disabled", "LORABENCH_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "LORABENCH_CACHE": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-m", "experiments.train", f"task={task}", *args, "optim.max_steps=2",
                          "optim.batch_size=4", "logger=none", f"results_dir={tmp_path / 'results'}"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    name = files["bert" if task == "text_file" else "llama"].name
    assert re.search(r"\[lorabench\] ok \w+ lora rank=8 seed=0: test ", out.stdout), out.stdout
    (path,) = (tmp_path / "results" / "runs").glob("*.json")
    record = records.load(path)
    assert record["model"] == name and record["task"] == task and record["status"] == "ok"


def test_builders_reject_a_bad_option_directly(files, tmp_path):
    with pytest.raises(TaskError, match=r"task.val_frac=0.0"):
        text_task(files, tmp_path, val_frac=0.0)
    with pytest.raises(TaskError, match=r"give one"):
        text_task(files, tmp_path, test_file="x.csv", test_split="test")


def test_the_worked_example_of_docs_tasks_md_runs_as_written(tmp_path, monkeypatch):
    """docs/tasks.md: the Python block writes reviews.csv into the working directory, the bash line trains
    on it. Here both run in tmp_path (the command's results_dir is replaced by the test's)."""
    doc = (ROOT / "docs" / "tasks.md").read_text()
    (code,) = [c for c in re.findall(r"```python\n(.*?)```", doc, flags=re.S) if c.startswith("# make a tiny CSV")]
    (line,) = [c.strip() for c in re.findall(r"```bash\n(.*?)```", doc, flags=re.S)
               if c.startswith("python -m experiments.train task=text_file")]
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "tasks.md", "exec"), {})
    overrides = [a for a in line.split()[3:] if not a.startswith("results_dir=")]
    record = run(compose_config(*overrides, results_dir=tmp_path / "results", cache_dir=tmp_path / "cache"))
    assert record["status"] == "ok", record["error"]
    info = record["task_info"]
    assert info["label_names"] == ["negative", "positive"] and info["test_source"] == "0.2 of train"
    assert [info[s]["n"] for s in ("train", "val", "test")] == [33, 5, 10] and record["cost"]["steps"] == 15
    assert record["metrics"]["test"]["accuracy"] >= 0.9  # the docs show 1.0 (10 test reviews)
