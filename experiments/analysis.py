"""Weight analyses from the papers, on saved files only: snapshots, saved adapters, rank patterns (no torch).

- LoRA §7.2 (Hu et al. 2021): subspace similarity φ of two adapters' A matrices (eq. 4, Figs. 3-4).
- LoRA §7.3, Table 7: how ΔW relates to W: ||Uᵀ W Vᵀ||_F for U, V from ΔW, from W, at random; amplification.
- DoRA §3.2 (Liu et al. 2024): magnitude / direction changes ΔM, ΔD against W0 (eqs. 2-4, Fig. 2) and their
  correlation (§4.1).
- AdaLoRA §4.4 (Zhang et al. 2023, Fig. 3): the final rank of each adapted matrix, layers x matrix types.

Inputs (written by the trainer and ``adapter_state``):

- snapshots ``<results_dir>/runs/<run_id>.snapshots/step_<NNNNNN>.safetensors``: ``<module>.weight`` (the
  effective dense weight, (out, in)), adapter tensors ``<module>.lora_{A,B,E}`` / ``.lora_magnitude_vector``,
  string metadata ``step``, ``variant``, ``run_id``, ``scaling`` (JSON {module: s}); step 0 holds W0;
- a saved adapter folder: ``adapter_model.safetensors`` (peft's keys) and ``adapter_config.json``.

Arrays are float32 on disk; every computation here runs in float64. Weights are (out, in), as torch stores them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402
from scipy import stats  # noqa: E402

from experiments import records  # noqa: E402

ADAPTER_PARTS = ("lora_A", "lora_B", "lora_E", "lora_magnitude_vector", "lora_embedding_A", "lora_embedding_B")
# peft's saved keys: base_model.model.<module>.<part>[.weight]; anything else (a trained head) is not an adapter
_ADAPTER_KEY = re.compile(
    rf"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<part>{'|'.join(ADAPTER_PARTS)})(?:\.weight)?$")
_STEP_FILE = re.compile(r"^step_(\d+)\.safetensors$")
_LAYER = re.compile(r"^(?P<prefix>.*?)\.(?P<layer>\d+)\.(?P<type>.+)$")  # the first ".<digits>." is the layer


class Snapshot(NamedTuple):
    step: int
    meta: dict  # the file's metadata; ``step`` an int, ``scaling`` a dict
    modules: dict[str, dict[str, np.ndarray]]  # {module: {"weight": W, "lora_A": A, ...}}


# --------------------------------------------------------------------------------------------- loading


def snapshot_dir(run: str | Path, results_dir: str | Path | None = None) -> Path:
    """The snapshot folder of a run: ``run`` is that folder, a record path ``runs/<id>.json``, or a run id
    (then ``results_dir`` is needed)."""
    run = Path(run)
    if run.suffix == ".snapshots" or run.is_dir():
        return run
    if run.suffix == ".json":
        return run.parent / f"{run.stem}.snapshots"
    if results_dir is None:
        raise ValueError(f"{str(run)!r} is neither a snapshot folder nor a record path: give results_dir "
                         "to read it as a run id")
    path = records.record_path(results_dir, str(run))
    return path.parent / f"{path.stem}.snapshots"


def _split(tensors: Iterable[str]) -> dict[str, list[tuple[str, str]]]:
    """{module: [(key, part)]}, ``<module>.<part>`` split at the last dot."""
    out: dict[str, list[tuple[str, str]]] = {}
    for key in tensors:
        module, _, part = key.rpartition(".")
        out.setdefault(module, []).append((key, part))
    return out


def load_snapshots(run: str | Path, results_dir: str | Path | None = None,
                   modules: str | None = None) -> list[Snapshot]:
    """A run's snapshots in step order (``run`` as in ``snapshot_dir``). ``modules``: a regex; only the
    modules whose name it matches (``re.search``) are read, which keeps a large model's snapshots small."""
    folder = snapshot_dir(run, results_dir)
    files = sorted((int(m[1]), p) for p in folder.glob("step_*.safetensors") if (m := _STEP_FILE.match(p.name)))
    if not files:
        raise FileNotFoundError(f"no step_<NNNNNN>.safetensors snapshots in {folder}")
    out = []
    for step, path in files:
        with safe_open(path, framework="np") as f:
            meta = dict(f.metadata() or {})
            if "step" in meta and int(meta["step"]) != step:
                raise ValueError(f"{path.name} says step {meta['step']} in its metadata")
            meta["step"] = step
            if "scaling" in meta:
                meta["scaling"] = json.loads(meta["scaling"])
            mods = {m: {part: f.get_tensor(key) for key, part in parts}
                    for m, parts in _split(f.keys()).items() if modules is None or re.search(modules, m)}
        out.append(Snapshot(step, meta, mods))
    return out


def load_adapter(folder: str | Path) -> tuple[dict[str, dict[str, np.ndarray]], dict]:
    """(``{module: {"lora_A": (r, in), "lora_B": (out, r), ...}}``, adapter_config.json's fields) of a saved
    peft-layout adapter; keys with or without ``.weight`` (AdaLoRA's have none). Other tensors (trained heads
    saved beside the adapter) are left out."""
    folder = Path(folder)
    tensors = load_file(folder / "adapter_model.safetensors")
    config_path = folder / "adapter_config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    out: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        if m := _ADAPTER_KEY.match(key):
            out.setdefault(m["module"], {})[m["part"]] = value
    return out, config


def layer_types(names: Iterable[str]) -> dict[str, tuple[int | None, str]]:
    """{module: (layer index, matrix type)}: the first ``.<digits>.`` of the name is the layer, what follows
    it the type (``bert.encoder.layer.3.attention.self.query`` -> (3, "attention.self.query"),
    ``model.layers.5.mlp.down_proj`` -> (5, "mlp.down_proj")). Where the names have several stacks (an
    encoder and a decoder), the part before the index joins the type, so the two never merge. A name
    without an index: (None, name)."""
    names = list(names)
    parsed = {n: _LAYER.match(n) for n in names}
    several = len({m["prefix"] for m in parsed.values() if m}) > 1
    return {n: ((int(m["layer"]), f"{m['prefix']}.{m['type']}" if several else m["type"]) if m else (None, n))
            for n, m in parsed.items()}


# ------------------------------------------------------------------------ LoRA §7.2: subspace similarity


def _right_basis(A) -> np.ndarray:
    """(d, r): the right-singular vectors of A (r, d), by decreasing singular value, as columns."""
    return np.linalg.svd(np.asarray(A, dtype=np.float64), full_matrices=False)[2].T


def subspace_similarity(A1, A2, i: int, j: int) -> float:
    """φ(A1, A2, i, j) for A (r, d): how much of the span of A1's top-i right-singular vectors lies in that
    of A2's top-j; 1 when one contains the other, 0 when orthogonal. For B (out, r), footnote 7, pass B.T."""
    U1, U2 = _right_basis(A1), _right_basis(A2)
    if U1.shape[0] != U2.shape[0]:
        raise ValueError(f"A1 and A2 act on different spaces: {U1.shape[0]} vs {U2.shape[0]} columns")
    if not (1 <= i <= U1.shape[1] and 1 <= j <= U2.shape[1]):
        raise ValueError(f"need 1 <= i <= {U1.shape[1]} and 1 <= j <= {U2.shape[1]}, got i={i}, j={j}")
    # LoRA eq. 4: φ = ||U1[:, :i]ᵀ U2[:, :j]||_F² / min(i, j)
    return float(np.linalg.norm(U1[:, :i].T @ U2[:, :j]) ** 2 / min(i, j))


def subspace_similarity_grid(A1, A2) -> np.ndarray:
    """φ for every (i, j): an (r1, r2) array whose ``[i - 1, j - 1]`` is ``subspace_similarity(A1, A2, i, j)``."""
    U1, U2 = _right_basis(A1), _right_basis(A2)
    if U1.shape[0] != U2.shape[0]:
        raise ValueError(f"A1 and A2 act on different spaces: {U1.shape[0]} vs {U2.shape[0]} columns")
    # LoRA eq. 4 for all (i, j) at once: ||U1[:, :i]ᵀ U2[:, :j]||_F² is a 2-D prefix sum of (U1ᵀ U2)²
    overlap = np.cumsum(np.cumsum((U1.T @ U2) ** 2, axis=0), axis=1)
    i, j = np.ogrid[1:U1.shape[1] + 1, 1:U2.shape[1] + 1]
    return np.clip(overlap / np.minimum(i, j), 0.0, 1.0)  # [0, 1] up to rounding


def adapter_similarity(a1: dict, a2: dict, part: str = "lora_A") -> dict[str, np.ndarray]:
    """{module: φ grid} for the modules both adapters (``load_adapter``'s or a ``Snapshot.modules``) adapt;
    ``part="lora_B"`` compares the B matrices' left-singular vectors (footnote 7)."""
    def mat(entry):
        return entry[part].T if part == "lora_B" else entry[part]

    return {m: subspace_similarity_grid(mat(a1[m]), mat(a2[m])) for m in a1 if m in a2 and part in a1[m]
            and part in a2[m]}


# ------------------------------------------------------------------------- LoRA §7.3: ΔW against W


def _top(M: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
    """(U (out, r), Vᵀ (r, in)): the top-r left / right singular vectors of M (out, in)."""
    U, _, Vh = np.linalg.svd(M, full_matrices=False)
    return U[:, :r], Vh[:r]


def amplification(W, dW, r: int, seed: int = 0) -> dict[str, float]:
    """LoRA Table 7 for one matrix: ``proj_dW``, ``proj_W``, ``proj_random`` = ||Uᵀ W Vᵀ||_F with U, V the
    top-r singular vectors of ΔW, of W itself, and of a random matrix (Haar-random orthonormal frames, the
    distribution of a Gaussian matrix's singular vectors; seeded); ``W_norm``, ``dW_norm``; and
    ``amplification`` = ||ΔW||_F / ||Uᵀ W Vᵀ||_F with U, V from ΔW. W, ΔW: (out, in)."""
    W, dW = np.asarray(W, dtype=np.float64), np.asarray(dW, dtype=np.float64)
    if W.shape != dW.shape:
        raise ValueError(f"W {W.shape} and ΔW {dW.shape} differ in shape")
    if not 1 <= r <= min(W.shape):
        raise ValueError(f"r must be in [1, {min(W.shape)}], got {r}")

    def proj(U, Vh):  # §7.3: ||Uᵀ W Vᵀ||_F, the paper's V being the (r, in) rows of the right singular vectors
        return float(np.linalg.norm(U.T @ W @ Vh.T))

    rng = np.random.default_rng(seed)
    U_rand = np.linalg.qr(rng.standard_normal((W.shape[0], r)))[0]
    V_rand = np.linalg.qr(rng.standard_normal((W.shape[1], r)))[0]
    out = {"r": r, "W_norm": float(np.linalg.norm(W)), "dW_norm": float(np.linalg.norm(dW)),
           "proj_dW": proj(*_top(dW, r)), "proj_W": proj(*_top(W, r)), "proj_random": proj(U_rand, V_rand.T)}
    out["amplification"] = out["dW_norm"] / out["proj_dW"]  # §7.3: 21.5 ≈ 6.91 / 0.32 for r = 4
    return out


def _adapter_rank(entry: dict[str, np.ndarray]) -> int | None:
    """Singular values an adapter keeps: AdaLoRA's non-zero λ (lora_E), else lora_A's rows; None without one."""
    if "lora_E" in entry:
        return int(np.count_nonzero(entry["lora_E"]))
    return int(entry["lora_A"].shape[0]) if "lora_A" in entry else None


def amplification_table(snapshots: list[Snapshot], r: int | None = None, step: int | None = None,
                        seed: int = 0) -> pd.DataFrame:
    """``amplification`` per module, W = W0 (the step-0 weight) and ΔW = W_step − W0 (``step``: the last
    snapshot by default). ``r``: the adapter's rank per module when None (AdaLoRA: the kept singular values;
    modules that keep none are left out); a run without adapters (full, GaLore) needs it."""
    base = _base(snapshots)
    snap = snapshots[-1] if step is None else next((s for s in snapshots if s.step == step), None)
    if snap is None or snap.step == 0:
        raise ValueError(f"no snapshot at step {step}" if snap is None else "only a step-0 snapshot: no ΔW yet")
    where = layer_types(snap.modules)
    rows = []
    for m, entry in snap.modules.items():
        if "weight" not in entry or "weight" not in base.get(m, {}):
            continue
        rank = r if r is not None else _adapter_rank(entry)
        if rank is None:
            raise ValueError(f"module {m} has no adapter tensors to take its rank from: give r")
        if rank == 0:
            continue
        W0 = base[m]["weight"]
        a = amplification(W0, entry["weight"].astype(np.float64) - W0, rank, seed)
        rows.append({"module": m, "layer": where[m][0], "type": where[m][1], "step": snap.step, **a})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------- DoRA §3.2: magnitude and direction


def weight_decomposition(W0, Wt) -> tuple[float, float]:
    """(ΔM, ΔD) of Wt against W0, both (out, in). The paper (W ∈ R^{d×k}) takes norms "across each column";
    its code (NVlabs/DoRA, peft ``get_weight_norm``) and our ``variants/dora.py`` take one magnitude per output
    unit, i.e. per row of the (out, in) weight: so do we, k = out."""
    W0, Wt = np.asarray(W0, dtype=np.float64), np.asarray(Wt, dtype=np.float64)
    if W0.shape != Wt.shape:
        raise ValueError(f"W0 {W0.shape} and Wt {Wt.shape} differ in shape")
    m0, mt = np.linalg.norm(W0, axis=1), np.linalg.norm(Wt, axis=1)  # DoRA eq. 2: m = ||W||_c
    delta_m = np.mean(np.abs(mt - m0))  # DoRA eq. 3: ΔM = Σ_n |m_t^n − m_0^n| / k
    cos = np.sum(Wt * W0, axis=1) / (mt * m0)
    delta_d = np.mean(1.0 - cos)  # DoRA eq. 4: ΔD = Σ_n (1 − cos(V_t^n, W_0^n)) / k
    return float(delta_m), float(delta_d)


def _base(snapshots: list[Snapshot]) -> dict[str, dict[str, np.ndarray]]:
    base = next((s for s in snapshots if s.step == 0), None)
    if base is None:
        raise ValueError("no step-0 snapshot: W0 is needed")
    return base.modules


def decomposition_table(snapshots: list[Snapshot]) -> pd.DataFrame:
    """One row per (module, step > 0): module, layer, type, step, delta_m, delta_d, variant; each snapshot's
    effective weight against the step-0 one, as Fig. 2 plots (merged LoRA / DoRA weights, FT weights)."""
    base = _base(snapshots)
    where = layer_types(base)
    rows = []
    for snap in snapshots:
        if snap.step == 0:
            continue
        for m, entry in snap.modules.items():
            if "weight" in entry and "weight" in base.get(m, {}):
                W0, Wt = base[m]["weight"], entry["weight"]
                dm, dd = weight_decomposition(W0, Wt)
                update = float(np.linalg.norm(np.asarray(Wt, np.float64) - W0) / np.linalg.norm(np.asarray(W0,
                                                                                                       np.float64)))
                rows.append({"module": m, "layer": where[m][0], "type": where[m][1], "step": snap.step,
                             "delta_m": dm, "delta_d": dd, "update": update, "variant": snap.meta.get("variant")})
    return pd.DataFrame(rows, columns=["module", "layer", "type", "step", "delta_m", "delta_d", "update", "variant"])


def _pearson(x, y) -> tuple[float, float]:
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return np.nan, np.nan  # no correlation to speak of
    res = stats.pearsonr(x, y)
    return float(res.statistic), float(res.pvalue)


def decomposition_correlation(table: pd.DataFrame, by: str | list[str] | None = "type") -> pd.DataFrame:
    """Pearson r (and p) of ΔD vs ΔM per group: as DoRA §4.1, which pools one matrix type (query) over the
    layers and the checkpoints after step 0 (FT −0.62, LoRA 0.83, DoRA −0.31). ``by=None`` pools all rows.
    NaN where a group has fewer than 3 points or a constant coordinate."""
    rows = []
    groups = [((), table)] if by is None else table.groupby(by, sort=True)
    keys = [] if by is None else [by] if isinstance(by, str) else list(by)
    for key, g in groups:
        key = key if isinstance(key, tuple) else (key,)
        r, p = _pearson(g["delta_d"], g["delta_m"])  # DoRA §4.1: corr(ΔD, ΔM) over Fig. 2's points
        rows.append({**dict(zip(keys, key, strict=True)), "n": len(g), "r": r, "p": p})
    return pd.DataFrame(rows)


def decomposition_partial_correlation(table: pd.DataFrame, by: str | list[str] | None = "type") -> pd.DataFrame:
    """Pearson r (and p) of log ΔD vs log ΔM per group once each is regressed on log ‖ΔW‖_F/‖W0‖_F (the
    table's ``update``): the magnitude–direction trade-off at a given size of update. Not the paper's measure
    (§4.1 correlates the raw values): over short runs every layer's ΔM and ΔD grow with its update's size,
    which makes the raw correlation positive whatever the method; this one asks how ΔM and ΔD share an
    update of a given size. NaN where a group has fewer than 4 points or a zero change."""
    rows = []
    groups = [((), table)] if by is None else table.groupby(by, sort=True)
    keys = [] if by is None else [by] if isinstance(by, str) else list(by)
    for key, g in groups:
        key = key if isinstance(key, tuple) else (key,)
        r, p = np.nan, np.nan
        cols = g[["delta_d", "delta_m", "update"]].to_numpy(float)
        if len(g) >= 4 and (cols > 0).all():
            logs = np.log(cols)
            X = np.c_[np.ones(len(g)), logs[:, 2]]
            resid = logs[:, :2] - X @ np.linalg.lstsq(X, logs[:, :2], rcond=None)[0]
            r, p = _pearson(resid[:, 0], resid[:, 1])
        rows.append({**dict(zip(keys, key, strict=True)), "n": len(g), "r": r, "p": p})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------- AdaLoRA Fig. 3: ranks


def _module_key(key: str) -> str:
    """A rank_pattern key as a module name: no ``base_model.model.`` prefix, no ``.lora_E[.<adapter>]`` tail."""
    return re.sub(r"\.lora_E(\.[^.]+)?$", "", key.removeprefix("base_model.model."))


def rank_pattern(source) -> dict[str, int]:
    """{module: kept rank} from a saved AdaLoRA adapter folder (its config's ``rank_pattern``; without one,
    the saved λ's), or from a dict {module: [kept?] * init_r} / {module: int}, either key form."""
    if isinstance(source, (str, Path)):
        adapter, config = load_adapter(source)
        pattern = config.get("rank_pattern")
        if pattern is None:  # no allocation saved: every saved singular value is kept
            return {m: int(e["lora_E"].shape[0]) for m, e in adapter.items() if "lora_E" in e}
        source = pattern
    return {_module_key(k): int(v) if isinstance(v, (int, np.integer)) else int(np.sum(np.asarray(v, dtype=bool)))
            for k, v in source.items()}


def rank_table(source) -> pd.DataFrame:
    """Kept ranks as a table: one row per layer index, one column per matrix type (in module order), NaN
    where a layer lacks that type. ``source`` as in ``rank_pattern``. Modules without a layer index are
    listed in ``table.attrs["unplaced"]``, not in the table."""
    ranks = rank_pattern(source)
    where = layer_types(ranks)
    placed = {m: lt for m, lt in where.items() if lt[0] is not None}
    table = pd.DataFrame([{"layer": lt[0], "type": lt[1], "rank": ranks[m]} for m, lt in placed.items()],
                         columns=["layer", "type", "rank"])
    types = list(dict.fromkeys(table["type"]))  # first-appearance order: q, k, v, o, ffn... as the model has them
    # AdaLoRA Fig. 3's grid (there drawn with the layer across, the matrix type down)
    table = table.pivot_table(index="layer", columns="type", values="rank", aggfunc="sum").reindex(columns=types)
    table.columns.name = "type"
    table.attrs["unplaced"] = sorted(set(where) - set(placed))
    return table


def rank_summary(table: pd.DataFrame) -> dict:
    """Where the budget went (AdaLoRA §4.4: "more budget to FFNs and top layers"): ``total`` kept rank, its
    share per matrix type (``per_type``) and per layer (``per_layer``), and the Spearman correlation of a
    matrix's kept rank with its layer index over all matrices (``spearman``, ``spearman_p``)."""
    total = float(np.nansum(table.to_numpy()))
    cells = table.reset_index().melt(id_vars="layer", value_name="rank").dropna()  # one row per matrix
    layers, ranks = cells["layer"].to_numpy(float), cells["rank"].to_numpy(float)
    rho, p = (np.nan, np.nan)
    if len(cells) >= 3 and np.ptp(layers) > 0 and np.ptp(ranks) > 0:
        res = stats.spearmanr(layers, ranks)
        rho, p = float(res.statistic), float(res.pvalue)
    return {"total": total, "per_type": table.sum() / total, "per_layer": table.sum(axis=1) / total,
            "spearman": rho, "spearman_p": p}


# ------------------------------------------------------------------------ GaLore Table 1: memory


def galore_state_elements(shapes: Iterable[Sequence[int]], rank: int, trainable: int) -> int:
    """Optimizer-state elements of GaLore by its Table 1: an m×n projected weight (m ≤ n, either orientation)
    keeps the projector (mr) and Adam's two moments of the r×n projected gradient (2nr); every other of the
    ``trainable`` parameters keeps AdamW's two full moments. (Full AdamW: 2·trainable; LoRA: the same over
    its adapter, Table 1's 2mr + 2nr.)"""
    projected = state = 0
    for shape in shapes:
        m, n = sorted(int(x) for x in shape)
        projected += m * n
        state += m * rank + 2 * n * rank  # GaLore Table 1: optimizer states mr + 2nr
    return state + 2 * (trainable - projected)


# --------------------------------------------------------------------------------------------- plots


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_similarity(grids: dict[str, np.ndarray] | np.ndarray, path: str | Path, title: str | None = None) -> Path:
    """Heat maps of φ grids (LoRA Figs. 3-4), one panel per ``{label: grid}``: i down, j across, scale [0, 1]."""
    grids = {"": grids} if isinstance(grids, np.ndarray) else grids
    fig, axes = plt.subplots(1, len(grids), figsize=(3.6 * len(grids) + 0.8, 3.4), squeeze=False)
    for ax, (label, g) in zip(axes[0], grids.items(), strict=True):
        im = ax.imshow(g, vmin=0, vmax=1, cmap="viridis", aspect="auto",
                       extent=(0.5, g.shape[1] + 0.5, g.shape[0] + 0.5, 0.5))
        ax.set_xlabel("j")
        ax.set_ylabel("i")
        ax.set_title(label, fontsize=9)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.9, label="φ(i, j)")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_decomposition(table: pd.DataFrame, path: str | Path, types: list[str] | None = None) -> Path:
    """ΔM against ΔD (DoRA Fig. 2), one panel per matrix type: colour by layer, marker by step, the least
    squares line and Pearson r in the title."""
    types = types or sorted(table["type"].unique())
    fig, axes = plt.subplots(1, len(types), figsize=(4.4 * len(types), 3.8), squeeze=False)
    markers, steps = "os^DvP*X", sorted(table["step"].unique())
    layers = table["layer"].dropna()
    norm = plt.Normalize(layers.min(), max(layers.max(), layers.min() + 1)) if len(layers) else None
    for ax, t in zip(axes[0], types, strict=True):
        g = table[table["type"] == t]
        for k, s in enumerate(steps):
            gs = g[g["step"] == s]
            color = plt.cm.viridis(norm(gs["layer"].fillna(0))) if norm else "C0"
            ax.scatter(gs["delta_d"], gs["delta_m"], c=color, marker=markers[k % len(markers)], s=30,
                       label=f"step {s}")
        r, _ = _pearson(g["delta_d"], g["delta_m"])
        if len(g) >= 2 and np.ptp(g["delta_d"]) > 0:
            slope, icept = np.polyfit(g["delta_d"], g["delta_m"], 1)
            xs = np.linspace(g["delta_d"].min(), g["delta_d"].max(), 2)
            ax.plot(xs, slope * xs + icept, color="k", lw=1, ls="--")
        ax.set_xlabel("ΔD")
        ax.set_ylabel("ΔM")
        ax.set_title(f"{t}: r = {r:.2f}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if norm:
        fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap="viridis"), ax=axes[0].tolist(), label="layer")
    return _save(fig, path)


def plot_rank_pattern(table: pd.DataFrame, path: str | Path, title: str | None = None) -> Path:
    """AdaLoRA Fig. 3: kept rank per matrix, layer index across, matrix type down, each cell annotated."""
    data = table.T.to_numpy(dtype=float)  # (types, layers)
    fig, ax = plt.subplots(figsize=(0.55 * data.shape[1] + 2.5, 0.45 * data.shape[0] + 1.2))
    im = ax.imshow(np.ma.masked_invalid(data), cmap="YlGnBu", aspect="auto")
    for (i, j), v in np.ndenumerate(data):
        if not np.isnan(v):
            ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7,
                    color="white" if v > np.nanmax(data) * 0.6 else "black")
    ax.set_xticks(range(data.shape[1]), [str(c) for c in table.index])
    ax.set_yticks(range(data.shape[0]), list(table.columns))
    ax.set_xlabel("layer")
    fig.colorbar(im, ax=ax, label="kept rank")
    if title:
        ax.set_title(title)
    return _save(fig, path)
