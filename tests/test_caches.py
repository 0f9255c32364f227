"""Every on-disk cache survives a corrupt file: it is detected (load failure, wrong structure or checksum),
rebuilt with a warning naming it, equal to what was there, and valid on disk again. And ``task=lm`` with no
assets says so before any model is loaded or converted.

Each cache is built once on a tiny input under tmp_path, corrupted (truncated, garbage, valid but wrong),
then read again.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import compose_config
from safetensors import safe_open
from safetensors.torch import save_file
from tiny import VOCAB, tiny_llama

from experiments import assets, tasks
from experiments.hub import model_fingerprint
from experiments.tasks import TaskError, causal_lm, custom
from experiments.tasks import text_classification as tc
from experiments.train import ConfigError, run

POOLS = {"train": ["It is a truth universally acknowledged.", "Emma Woodhouse, handsome, clever."],
         "heldout": ["Sir Walter Elliot, of Kellynch Hall."]}


def half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def garbage(path: Path) -> None:
    path.write_bytes(b"\x00not what was written\xff" * 7)


def quietly(fn, *args, **kw):
    """``fn`` with every warning an error: a valid cache must load without one."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn(*args, **kw)


@pytest.fixture(scope="module")
def smollm2_tok():
    return causal_lm.load_tokenizer("smollm2", str(assets.assets_dir()))


@pytest.fixture
def lm_tok(smollm2_tok, monkeypatch):
    """SmolLM2's tokenizer; its fingerprint (a cache key, ~0.5 s a call, not under test here) made constant."""
    monkeypatch.setattr(causal_lm, "tokenizer_fingerprint", lambda tok: "smollm2")
    return smollm2_tok


@pytest.fixture(scope="module")
def minilm():
    tok = tc.load_tokenizer("minilm")
    return tok, tc.tokenizer_fingerprint(tok)


# --- causal LM: token streams (safetensors) and base perplexities (json) ---------------------------------

def _other_pools(path: Path) -> None:
    save_file({"train": torch.arange(5, dtype=torch.int32)}, str(path))


def _same_pools_other_values(path: Path) -> None:  # a valid file whose stored checksum no longer fits
    with safe_open(path, "pt") as f:
        meta, streams = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    streams["train"][0] += 1
    save_file(streams, str(path), metadata=meta)


@pytest.mark.parametrize("corrupt", [half, garbage, _other_pools, _same_pools_other_values])
def test_a_corrupt_token_cache_is_rebuilt_with_a_warning_naming_it(corrupt, lm_tok, tmp_path):
    first, fp = causal_lm.token_streams(POOLS, lm_tok, str(tmp_path), "austen")
    (path,) = (tmp_path / "causal_lm").iterdir()
    written = path.read_bytes()
    corrupt(path)
    assert path.read_bytes() != written
    with pytest.warns(UserWarning, match=rf"corrupt token cache .*{re.escape(path.name)}"):
        again, fp2 = causal_lm.token_streams(POOLS, lm_tok, str(tmp_path), "austen")
    assert fp2 == fp and again.keys() == first.keys()
    assert all(torch.equal(again[k], first[k]) for k in first)
    assert path.read_bytes() == written  # rewritten whole, checksum included
    with safe_open(path, "pt") as f:
        assert f.metadata()["sha256"] == causal_lm.streams_sha({k: f.get_tensor(k) for k in f.keys()})
    assert torch.equal(quietly(causal_lm._cached_streams, path, set(POOLS), lm_tok)["train"], first["train"].int())
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind


def test_a_token_cache_from_before_the_checksum_is_still_used(lm_tok, tmp_path, monkeypatch):
    first, _ = causal_lm.token_streams(POOLS, lm_tok, str(tmp_path), "austen")
    (path,) = (tmp_path / "causal_lm").iterdir()
    save_file({k: v.to(torch.int32) for k, v in first.items()}, str(path))  # the old layout: no metadata

    class NoEncoding:  # the real tokenizer's attributes, but tokenising again fails the test
        def __getattr__(self, name):
            return getattr(lm_tok, name)

        def __call__(self, *a, **k):
            pytest.fail("an old but valid token cache was rebuilt")

    again, _ = quietly(causal_lm.token_streams, POOLS, NoEncoding(), str(tmp_path), "austen")
    assert all(torch.equal(again[k], first[k]) for k in first)

    # the old layout, but a stream that does not end in EOS: not a token cache of ours
    save_file({"train": first["train"][:-1].to(torch.int32), "heldout": first["heldout"].to(torch.int32)}, str(path))
    with pytest.warns(UserWarning, match=rf"{re.escape(path.name)} .*'train' is not a stream of token ids"):
        again, _ = causal_lm.token_streams(POOLS, lm_tok, str(tmp_path), "austen")
    assert all(torch.equal(again[k], first[k]) for k in first)


def _wrong_shape(path: Path) -> None:
    path.write_text(json.dumps([1, 2, 3]))


def _wrong_types(path: Path) -> None:
    record = json.loads(path.read_text())
    record["metrics"]["perplexity"] = str(record["metrics"]["perplexity"])
    path.write_text(json.dumps(record))


def _other_blocks(path: Path) -> None:  # a whole record, but of other blocks (a copied or stale file)
    record = json.loads(path.read_text())
    record["blocks"] = "0" * 16
    path.write_text(json.dumps(record))


@pytest.mark.parametrize("corrupt", [half, garbage, _wrong_shape, _wrong_types, _other_blocks])
def test_a_corrupt_base_perplexity_is_recomputed_with_a_warning_naming_it(corrupt, tmp_path, monkeypatch):
    net = tiny_llama()
    split = torch.randint(1, VOCAB, (3, 16), generator=torch.Generator().manual_seed(0))
    fp = model_fingerprint(net)
    first = causal_lm.base_perplexity(net, split, fp, str(tmp_path))
    (path,) = (tmp_path / "causal_lm").iterdir()
    written = path.read_text()
    corrupt(path)
    with pytest.warns(UserWarning, match=rf"corrupt base-perplexity cache .*{re.escape(path.name)}"):
        again = causal_lm.base_perplexity(net, split, fp, str(tmp_path))
    assert again == first and path.read_text() == written
    monkeypatch.setattr(causal_lm, "perplexity", lambda *a, **k: pytest.fail("a valid cache was recomputed"))
    assert quietly(causal_lm.base_perplexity, net, split, fp, str(tmp_path)) == first


# --- text classification: the tokenised splits (a datasets folder) -----------------------------------

def _arrow(folder: Path) -> Path:
    return next(folder.glob("*.arrow"))


def _flip_middle(folder: Path) -> None:  # same size, still loads: only the checksum sees it
    arrow = _arrow(folder)
    data = bytearray(arrow.read_bytes())
    data[len(data) // 2] ^= 0xFF
    arrow.write_bytes(bytes(data))


def _old_layout_other_rows(folder: Path) -> None:  # no checksums (an older cache) and not this split's rows
    import datasets

    shutil.rmtree(folder)
    datasets.Dataset.from_dict({"input_ids": [[101, 102]], "attention_mask": [[1, 1]], "labels": [0]}).save_to_disk(
        str(folder))


@pytest.mark.parametrize("corrupt", [lambda f: half(_arrow(f)), lambda f: garbage(f / "state.json"), _flip_middle,
                                     _old_layout_other_rows], ids=["half-arrow", "garbage-state", "flipped-byte",
                                                                   "other-rows"])
def test_a_corrupt_token_folder_is_rebuilt_with_a_warning_naming_it(corrupt, minilm, tmp_path, monkeypatch):
    rows = pd.DataFrame({"text": [f"{w} film number {i}" for i, w in enumerate(["a fine", "a dull"] * 12)],
                         "label": [1, 0] * 12})
    tok, tok_sha = minilm

    def tokens():
        return tc.cached_tokens(rows, tok, 32, ("text",), tmp_path, tc.fingerprint(rows, ("text",)), tok_sha)

    first = tokens()[:]
    (folder,) = (tmp_path / "text_classification").iterdir()
    corrupt(folder)
    with pytest.warns(UserWarning, match=rf"corrupt token cache .*{re.escape(folder.name)}") as caught:
        again = tokens()
    assert again[:] == first
    if corrupt is _flip_middle:
        assert "checksum mismatch: data-00000-of-00001.arrow" in str(caught[0].message)
    assert json.loads((folder / tc.CHECKSUMS).read_text()) == tc.file_shas(folder)
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # the corrupt copy is gone
    monkeypatch.setattr(tc, "tokenize", lambda *a, **k: pytest.fail("a valid cache was tokenised again"))
    assert quietly(tokens)[:] == first
    (folder / tc.CHECKSUMS).unlink()  # a folder from before the checksums: used as it is
    assert quietly(tokens)[:] == first


# --- your own data: datasets' Arrow copy of a local file ---------------------------------------------------

@pytest.mark.parametrize("what", ["half-arrow", "garbage-info"])
def test_a_corrupt_datasets_copy_of_a_local_file_is_rebuilt_with_a_warning(what, tmp_path):
    data = tmp_path / "reviews.csv"
    data.write_text("text,label\n" + "".join(f"review number {i},{'ab'[i % 2]}\n" for i in range(20)))
    first = custom.load_splits(str(data), "task.data", str(tmp_path))["train"][:]
    (info,) = (tmp_path / "datasets").rglob("dataset_info.json")
    copy = info.parent
    if what == "half-arrow":
        half(next(copy.glob("*.arrow")))
    else:
        garbage(info)
    with pytest.warns(UserWarning, match=rf"corrupt datasets cache .*{re.escape(copy.name)}"):
        again = custom.load_splits(str(data), "task.data", str(tmp_path))["train"][:]
    assert again == first
    assert quietly(custom.load_splits, str(data), "task.data", str(tmp_path))["train"][:] == first
    bad = tmp_path / "bad.parquet"  # a file that does not parse is still the file's fault, with no warning
    bad.write_bytes(b"this is not parquet at all\n")
    with pytest.raises(TaskError, match="could not be read as parquet"):
        quietly(custom.load_splits, str(bad), "task.data", str(tmp_path))


# --- assets: the converted SmolLM2 checkpoint and the unpacked Debian data ---------------------------------

@pytest.fixture
def fake_conversion(monkeypatch):
    """The GGUF conversion (~40 s) replaced by saving a tiny Llama: what is under test is the detection."""
    calls = []

    def convert(src, tmp):
        calls.append(tmp)
        tiny_llama().save_pretrained(tmp)

    monkeypatch.setattr(assets, "convert_smollm2", convert)
    return calls


@pytest.mark.parametrize("manifest", [True, False], ids=["manifest", "converted-before-the-manifest"])
@pytest.mark.parametrize("corrupt", [half, garbage])
def test_a_corrupt_smollm2_conversion_is_converted_again(corrupt, manifest, fake_conversion, tmp_path):
    out = assets.smollm2_path(tmp_path)
    weights = out / "model.safetensors"
    written = weights.read_bytes()
    assert assets.checkpoint_problem(out) is None and len(fake_conversion) == 1
    if not manifest:
        (out / assets.MANIFEST).unlink()
    corrupt(weights)
    with pytest.raises(assets.AssetError, match=r"corrupt SmolLM2 checkpoint at .*run `make assets`") as err:
        assets.smollm2_path(tmp_path, convert=False)
    assert "\n" not in str(err.value)
    cause = "model.safetensors" if manifest else "SafetensorError"
    with pytest.warns(UserWarning, match=rf"corrupt SmolLM2 checkpoint .*{re.escape(str(out))} \({cause}"):
        assert assets.smollm2_path(tmp_path) == out
    assert len(fake_conversion) == 2 and weights.read_bytes() == written
    assert assets.checkpoint_problem(out) is None
    assert quietly(assets.smollm2_path, tmp_path, convert=False) == out and len(fake_conversion) == 2
    assert [p.name for p in tmp_path.iterdir()] == [out.name]


def test_corrupt_debian_data_is_one_line_at_load_and_fetched_again_by_make_assets(tmp_path, monkeypatch):
    real = assets.assets_dir() / "debian" / "janeaustenr"
    dest = tmp_path / "debian" / "janeaustenr"
    shutil.copytree(real, dest)
    rdb = dest / "data" / "Rdata.rdb"
    half(rdb)
    with pytest.raises(assets.AssetError, match=r"corrupt janeaustenr data at .*Rdata.*re-run `make assets`") as err:
        assets.austen(tmp_path)
    assert "\n" not in str(err.value)

    def fake_run(cmd, cwd=None, check=False, **kw):  # apt-get download / dpkg-deb -x, offline: the real files
        if cmd[:2] == ["apt-get", "download"]:
            (Path(cwd) / "r-cran-janeaustenr.deb").write_bytes(b"deb")
        else:
            shutil.copytree(real, Path(cmd[3]) / "usr" / "lib" / "R" / "site-library" / "janeaustenr")
        return type("Done", (), {"returncode": 0, "stdout": "", "stderr": ""})()

    monkeypatch.setattr(assets.subprocess, "run", fake_run)
    with pytest.warns(UserWarning, match=r"corrupt janeaustenr data .*Rdata\.rdb .*fetching it again"):
        assert assets.fetch_debian("janeaustenr", tmp_path) == dest
    assert rdb.read_bytes() == (real / "data" / "Rdata.rdb").read_bytes()
    monkeypatch.setattr(assets.subprocess, "run", lambda *a, **k: pytest.fail("valid data fetched again"))
    assert quietly(assets.fetch_debian, "janeaustenr", tmp_path) == dest


# --- task=lm without its data: one line, before any model ----------------------------------------------------

@pytest.fixture
def no_model(monkeypatch):
    """Loading the tokenizer or the model, or converting SmolLM2, fails the test."""
    for name in ("load_model", "load_tokenizer"):
        monkeypatch.setattr(causal_lm, name, lambda *a, _n=name, **k: pytest.fail(f"{_n} ran before the data check"))
    monkeypatch.setattr(assets, "smollm2_path", lambda *a, **k: pytest.fail("SmolLM2 converted before the data check"))


def test_lm_without_its_data_fails_in_one_line_before_any_model(no_model, tmp_path):
    missing = tmp_path / "no-assets"
    with pytest.raises(assets.AssetError) as err:
        tasks.build("lm", cache_dir=str(tmp_path), assets_dir=str(missing), **tasks.get("lm").smoke)
    message = str(err.value)
    assert "\n" not in message and str(missing / "debian" / "janeaustenr") in message and "`make assets`" in message


def test_lm_from_the_cli_config_with_an_empty_assets_dir_is_a_config_error(no_model, tmp_path, monkeypatch):
    monkeypatch.setenv("LORABENCH_ASSETS", str(tmp_path / "empty"))  # as a user's shell would set it
    cfg = compose_config("logger=none", task="lm", smoke=True, results_dir=tmp_path / "results",
                         cache_dir=tmp_path / "cache")
    assert cfg["task"]["assets_dir"] == str(tmp_path / "empty")
    with pytest.raises(ConfigError, match=r"janeaustenr data missing at .*empty.*run `make assets`"):
        run(cfg)
    assert not (tmp_path / "results").exists()


def test_lm_file_with_a_missing_file_fails_before_the_tokenizer(no_model, tmp_path):
    with pytest.raises(TaskError, match="no such file"):
        tasks.build("lm_file", data=str(tmp_path / "missing.csv"), cache_dir=str(tmp_path))
