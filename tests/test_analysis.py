"""Weight analyses (experiments/analysis.py) on constructed cases with known answers, files in tmp_path only."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from safetensors.numpy import save_file

from experiments import analysis as an

ROOT = Path(__file__).resolve().parents[1]
BERT = "bert.encoder.layer.{}.{}"


def orthonormal(rng, n, k):
    return np.linalg.qr(rng.standard_normal((n, k)))[0]


def write_snapshots(folder: Path, steps: dict[int, dict[str, np.ndarray]], variant="lora", scaling=None):
    folder.mkdir(parents=True, exist_ok=True)
    for step, tensors in steps.items():
        meta = {"step": str(step), "variant": variant, "run_id": folder.stem}
        if scaling is not None:
            meta["scaling"] = json.dumps(scaling)
        save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()},
                  str(folder / f"step_{step:06d}.safetensors"), metadata=meta)
    return folder


def rotate_scale(W0, theta, scale, rng):
    """Each row turned by theta within a plane through it (norm kept), then multiplied by scale: ΔD = 1 − cos θ
    and ΔM = |scale − 1| · mean row norm, exactly."""
    out = np.empty_like(W0)
    for n, w in enumerate(W0):
        u = rng.standard_normal(w.shape)
        u -= (u @ w) / (w @ w) * w
        u *= np.linalg.norm(w) / np.linalg.norm(u)
        out[n] = scale * (np.cos(theta) * w + np.sin(theta) * u)
    return out


def test_importing_analysis_does_not_import_torch():
    code = "import experiments.analysis, sys; assert 'torch' not in sys.modules, 'torch was imported'"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


# --------------------------------------------------------------------------- LoRA §7.2: φ


def test_phi_is_one_on_identical_subspaces_and_ignores_rotation_and_scale_of_A():
    rng = np.random.default_rng(0)
    A = rng.standard_normal((8, 64))
    assert np.allclose(an.subspace_similarity_grid(A, A), 1.0)
    Q = orthonormal(rng, 8, 8)  # rotates A's rows: same singular values and right-singular vectors
    assert np.allclose(an.subspace_similarity_grid(A, Q @ A), 1.0)
    assert np.allclose(an.subspace_similarity_grid(3.0 * A, A), 1.0)
    # an invertible but non-orthogonal mix keeps the row space (φ(r, r) = 1), not the order of the directions
    R = np.eye(8) + np.triu(rng.standard_normal((8, 8)), 1) * 2
    grid = an.subspace_similarity_grid(A, R @ A)
    assert grid[-1, -1] == pytest.approx(1.0) and grid[0, 0] < 0.9


def test_phi_is_zero_on_orthogonal_subspaces():
    rng = np.random.default_rng(1)
    O = orthonormal(rng, 32, 32)
    A1 = rng.standard_normal((4, 4)) @ O[:4]  # rows in span(o_1..o_4)
    A2 = rng.standard_normal((6, 6)) @ O[4:10]  # rows in span(o_5..o_10)
    assert np.allclose(an.subspace_similarity_grid(A1, A2), 0.0, atol=1e-12)
    assert an.subspace_similarity(A1, A2, 4, 6) == pytest.approx(0.0, abs=1e-12)


def test_phi_with_one_shared_top_direction_is_one_over_min_i_j():
    rng = np.random.default_rng(2)
    O = orthonormal(rng, 40, 40)
    A1 = np.diag(np.arange(8, 0, -1.0)) @ O[:8]  # right-singular vectors o_1..o_8, in this order
    A2 = np.diag(np.arange(16, 0, -1.0)) @ O[[0, *range(8, 23)]]  # top direction o_1, the rest outside A1's
    i, j = np.ogrid[1:9, 1:17]
    expected = 1.0 / np.minimum(i, j)
    grid = an.subspace_similarity_grid(A1, A2)
    assert grid.shape == (8, 16) and np.allclose(grid, expected)
    assert an.subspace_similarity(A1, A2, 3, 5) == pytest.approx(grid[2, 4])
    assert an.subspace_similarity(A2, A1, 5, 3) == pytest.approx(grid[2, 4])  # symmetric in (A, i) <-> (A', j)


def test_phi_of_random_subspaces_matches_its_expectation():
    # U1 (d x i) fixed, U2 (d x j) Haar: E||U1ᵀU2||_F² = i·j/d, so E φ(i, j) = max(i, j) / d
    rng = np.random.default_rng(3)
    d, trials = 128, 1000
    mean = sum(an.subspace_similarity_grid(rng.standard_normal((4, d)), rng.standard_normal((8, d)))
               for _ in range(trials)) / trials
    i, j = np.ogrid[1:5, 1:9]
    assert np.allclose(mean, np.maximum(i, j) / d, rtol=0.2)


def test_phi_checks_its_arguments():
    rng = np.random.default_rng(4)
    with pytest.raises(ValueError, match="different spaces"):
        an.subspace_similarity_grid(rng.standard_normal((4, 10)), rng.standard_normal((4, 11)))
    with pytest.raises(ValueError, match="i <= 4"):
        an.subspace_similarity(rng.standard_normal((4, 10)), rng.standard_normal((4, 10)), 5, 1)


def test_adapter_similarity_compares_common_modules_and_B_by_left_vectors():
    rng = np.random.default_rng(5)
    A, B = rng.standard_normal((4, 20)), rng.standard_normal((30, 4))
    a1 = {"q": {"lora_A": A, "lora_B": B}, "v": {"lora_A": A}}
    a2 = {"q": {"lora_A": A[::-1], "lora_B": B @ orthonormal(rng, 4, 4)}, "k": {"lora_A": A}}
    grids = an.adapter_similarity(a1, a2)
    assert list(grids) == ["q"] and grids["q"].shape == (4, 4)
    assert np.allclose(an.adapter_similarity(a1, a2, "lora_B")["q"], 1.0)  # B rotated on the right: same span


# -------------------------------------------------------------------------- LoRA §7.3: ΔW vs W


def known_W(rng, s=(10.0, 8.0, 6.0, 4.0, 3.0, 2.0, 1.0, 0.5)):
    U, V = orthonormal(rng, 12, 8), orthonormal(rng, 8, 8)  # (out, in) = (12, 8): transposes must be right
    return U @ np.diag(s) @ V.T, U, V, np.array(s)


def test_amplification_of_an_update_along_W_s_top_versus_weakest_direction():
    rng = np.random.default_rng(6)
    W, U, V, s = known_W(rng)
    top = an.amplification(W, 5.0 * np.outer(U[:, 0], V[:, 0]), r=1)
    assert top["proj_dW"] == pytest.approx(10.0) and top["proj_W"] == pytest.approx(10.0)
    assert top["dW_norm"] == pytest.approx(5.0) and top["amplification"] == pytest.approx(0.5)
    assert top["W_norm"] == pytest.approx(np.sqrt((s**2).sum()))
    weak = an.amplification(W, 5.0 * np.outer(U[:, 7], V[:, 7]), r=1)
    assert weak["proj_dW"] == pytest.approx(0.5) and weak["amplification"] == pytest.approx(10.0)
    assert weak["proj_W"] == pytest.approx(10.0)  # W's own top direction, whatever ΔW is
    two = an.amplification(W, 3.0 * np.outer(U[:, 6], V[:, 6]) + 2.0 * np.outer(U[:, 7], V[:, 7]), r=2)
    assert two["proj_dW"] == pytest.approx(np.hypot(1.0, 0.5)) and two["proj_W"] == pytest.approx(np.hypot(10, 8))
    assert two["amplification"] == pytest.approx(np.hypot(3, 2) / np.hypot(1.0, 0.5))


def test_amplification_random_baseline_matches_its_expectation():
    # U (out x r), V (in x r) Haar and independent: E||Uᵀ W V||_F² = ||W||_F² r² / (out · in)
    # (the paper's 0.02 for r = 4: 61.95 · 4 / 12288 = 0.020 on GPT-3's 12288 x 12288 W_q)
    rng = np.random.default_rng(7)
    W, dW, r = rng.standard_normal((60, 40)), rng.standard_normal((60, 40)), 3
    sq = np.mean([an.amplification(W, dW, r, seed=k)["proj_random"] ** 2 for k in range(300)])
    assert sq == pytest.approx(np.linalg.norm(W) ** 2 * r**2 / (60 * 40), rel=0.2)
    a, b = an.amplification(W, dW, r, seed=0), an.amplification(W, dW, r, seed=0)
    assert a == b  # seeded


def test_amplification_checks_shapes_and_rank():
    with pytest.raises(ValueError, match="differ in shape"):
        an.amplification(np.ones((4, 3)), np.ones((3, 4)), 1)
    with pytest.raises(ValueError, match="r must be"):
        an.amplification(np.ones((4, 3)), np.ones((4, 3)), 4)


def test_amplification_table_takes_W0_from_step_0_and_the_rank_from_the_adapter(tmp_path):
    rng = np.random.default_rng(8)
    W0 = {m: rng.standard_normal((12, 10)) for m in ("q", "v")}
    A, B, E = rng.standard_normal((4, 10)), rng.standard_normal((12, 4)), np.array([[1.0], [0.0], [2.0], [0.0]])
    final = {"layer.0.q.weight": W0["q"] + 0.5 * B @ A, "layer.0.q.lora_A": A, "layer.0.q.lora_B": B,
             "layer.0.v.weight": W0["v"] + 0.5 * B @ (A * E), "layer.0.v.lora_A": A, "layer.0.v.lora_B": B,
             "layer.0.v.lora_E": E}
    start = {"layer.0.q.weight": W0["q"], "layer.0.v.weight": W0["v"]}
    snaps = an.load_snapshots(write_snapshots(tmp_path / "r.snapshots", {0: start, 10: final}))
    table = an.amplification_table(snaps).set_index("module")
    assert table.loc["layer.0.q", "r"] == 4 and table.loc["layer.0.v", "r"] == 2  # AdaLoRA: non-zero λ only
    W0q = snaps[0].modules["layer.0.q"]["weight"].astype(np.float64)
    direct = an.amplification(W0q, snaps[1].modules["layer.0.q"]["weight"] - W0q, 4)
    assert table.loc["layer.0.q", "amplification"] == pytest.approx(direct["amplification"])
    assert table.loc["layer.0.q", "step"] == 10 and table.loc["layer.0.q", "type"] == "q"
    full = an.load_snapshots(write_snapshots(tmp_path / "f.snapshots", {0: start, 5: start}, variant="full"))
    with pytest.raises(ValueError, match="give r"):
        an.amplification_table(full)
    assert set(an.amplification_table(full, r=2)["r"]) == {2}


# ----------------------------------------------------------------------- DoRA §3.2: ΔM, ΔD


def test_pure_magnitude_change_has_no_direction_change():
    rng = np.random.default_rng(9)
    W0 = rng.standard_normal((6, 9))
    c = np.array([1.5, 0.5, 2.0, 1.0, 1.2, 0.9])
    dm, dd = an.weight_decomposition(W0, c[:, None] * W0)  # rows scaled: one magnitude per output row
    assert dd == pytest.approx(0.0, abs=1e-12)
    assert dm == pytest.approx(np.mean(np.abs(c - 1) * np.linalg.norm(W0, axis=1)))
    # the same scaling applied to input columns turns the rows: the per-row convention is the one in use
    assert an.weight_decomposition(W0, W0 * np.r_[c, 1, 1, 1][None, :])[1] > 1e-3


def test_pure_rotation_has_no_magnitude_change():
    rng = np.random.default_rng(10)
    W0 = rng.standard_normal((6, 9))
    dm, dd = an.weight_decomposition(W0, rotate_scale(W0, 0.3, 1.0, rng))
    assert dm == pytest.approx(0.0, abs=1e-12) and dd == pytest.approx(1 - np.cos(0.3))
    dm, dd = an.weight_decomposition(W0, rotate_scale(W0, 0.3, 1.25, rng))
    assert dm == pytest.approx(0.25 * np.linalg.norm(W0, axis=1).mean()) and dd == pytest.approx(1 - np.cos(0.3))


@pytest.mark.parametrize("sign", [-1, 1])
def test_correlation_sign_follows_the_constructed_family(tmp_path, sign):
    # per step t: magnitude up by a_t; direction change rising (sign +1, LoRA-like) or falling (−1, FT-like)
    rng = np.random.default_rng(11)
    mods = [BERT.format(layer, "attention.self.query") for layer in range(3)]
    W0 = {m: rng.standard_normal((8, 16)) for m in mods}
    steps = {0: {f"{m}.weight": W0[m] for m in mods}}
    for t, a in enumerate([0.05, 0.1, 0.2, 0.3], start=1):
        theta = 0.1 * t if sign > 0 else 0.5 - 0.1 * t
        steps[100 * t] = {f"{m}.weight": rotate_scale(W0[m], theta * (1 + 0.1 * k), 1 + a, rng)
                          for k, m in enumerate(mods)}
    table = an.decomposition_table(an.load_snapshots(write_snapshots(tmp_path / "run.snapshots", steps)))
    assert len(table) == 12 and sorted(table["step"].unique()) == [100, 200, 300, 400]  # no step 0
    assert set(table["type"]) == {"attention.self.query"} and sorted(table["layer"].unique()) == [0, 1, 2]
    corr = an.decomposition_correlation(table)
    assert corr.loc[0, "n"] == 12 and np.sign(corr.loc[0, "r"]) == sign and abs(corr.loc[0, "r"]) > 0.8
    pooled = an.decomposition_correlation(table, by=None)
    assert pooled.loc[0, "r"] == pytest.approx(corr.loc[0, "r"])
    path = an.plot_decomposition(table, tmp_path / "fig" / "dm_dd.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000


@pytest.mark.parametrize("trade", [-1, 1])
def test_partial_correlation_removes_the_common_size_of_the_update(trade):
    """ΔM ∝ u·e^(+ε) and ΔD ∝ u²·e^(trade·ε) over updates u spanning 100×: the raw correlation is positive
    either way (both grow with u); given u, the correlation has the sign of ``trade``."""
    rng = np.random.default_rng(3)
    u = np.exp(rng.uniform(np.log(1e-4), np.log(1e-2), 40))
    eps = 0.3 * rng.standard_normal(40)
    table = pd.DataFrame({"type": "q", "update": u, "delta_m": u * np.exp(eps),
                          "delta_d": u ** 2 * np.exp(trade * eps + 0.05 * rng.standard_normal(40))})
    assert an.decomposition_correlation(table).loc[0, "r"] > 0.5
    partial = an.decomposition_partial_correlation(table).loc[0, "r"]
    assert np.sign(partial) == trade and abs(partial) > 0.9
    assert np.isnan(an.decomposition_partial_correlation(table.head(3)).loc[0, "r"])


def test_decomposition_needs_step_0_and_degenerate_groups_give_nan():
    snap = an.Snapshot(5, {}, {"m": {"weight": np.ones((2, 2))}})
    with pytest.raises(ValueError, match="step-0"):
        an.decomposition_table([snap])
    two = pd.DataFrame({"type": ["q", "q"], "delta_m": [0.1, 0.2], "delta_d": [0.3, 0.1]})
    assert np.isnan(an.decomposition_correlation(two).loc[0, "r"])


# ----------------------------------------------------------------------- AdaLoRA Fig. 3: ranks


def test_layer_types_parse_bert_llama_and_keep_two_stacks_apart():
    lt = an.layer_types([BERT.format(3, "attention.self.query"), BERT.format(3, "attention.output.dense"),
                         BERT.format(3, "output.dense"), "classifier"])
    assert lt[BERT.format(3, "attention.self.query")] == (3, "attention.self.query")
    assert lt[BERT.format(3, "output.dense")] == (3, "output.dense")  # the FFN output, not the attention's
    assert lt["classifier"] == (None, "classifier")
    assert an.layer_types(["model.layers.5.mlp.down_proj"]) == {"model.layers.5.mlp.down_proj": (5, "mlp.down_proj")}
    two = an.layer_types(["model.encoder.layers.0.self_attn.q_proj", "model.decoder.layers.0.self_attn.q_proj"])
    assert len({t for _, t in two.values()}) == 2


def test_rank_table_from_both_key_forms_and_counts():
    bert = {f"base_model.model.{BERT.format(0, 'attention.self.query')}.lora_E": [True, False, True, False],
            BERT.format(0, "intermediate.dense"): [True, True, True, False],
            BERT.format(1, "attention.self.query") + ".lora_E": [False, False, False, True],
            f"base_model.model.{BERT.format(1, 'intermediate.dense')}": [1, 1, 1, 1],
            "base_model.model.classifier.lora_E": [True]}
    table = an.rank_table(bert)
    assert list(table.columns) == ["attention.self.query", "intermediate.dense"] and list(table.index) == [0, 1]
    assert table.to_numpy().tolist() == [[2, 3], [1, 4]]
    assert table.attrs["unplaced"] == ["classifier"]
    llama = {f"model.layers.{i}.{t}": 2 * i + (4 if "mlp" in t else 0)
             for i in range(4) for t in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")}
    llama["model.layers.0.self_attn.v_proj"] = 0  # all pruned: a 0, not a gap
    table = an.rank_table(llama)
    assert table.loc[3, "mlp.down_proj"] == 10 and table.loc[0, "self_attn.v_proj"] == 0
    summary = an.rank_summary(table)
    assert summary["total"] == sum(llama.values())
    assert summary["per_type"].sum() == pytest.approx(1) and summary["per_layer"].sum() == pytest.approx(1)
    assert summary["per_type"].idxmax() == "mlp.down_proj" and summary["per_layer"].idxmax() == 3
    assert summary["spearman"] > 0.5
    flat = an.rank_summary(an.rank_table({f"model.layers.{i}.mlp.up_proj": 8 - i for i in range(4)}))
    assert flat["spearman"] == pytest.approx(-1.0)


def test_rank_table_from_a_saved_adaLoRA_adapter(tmp_path):
    mods = [BERT.format(layer, "attention.self.query") for layer in range(2)]
    tensors = {}
    for k, m in enumerate(mods):  # cut to the kept singular values, as adapter_state saves them
        tensors.update({f"base_model.model.{m}.lora_A": np.ones((k + 1, 6)),
                        f"base_model.model.{m}.lora_B": np.ones((6, k + 1)),
                        f"base_model.model.{m}.lora_E": np.ones((k + 1, 1))})
    save_file({k: v.astype(np.float32) for k, v in tensors.items()}, str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "ADALORA", "rank_pattern": None}))
    assert an.rank_table(tmp_path)["attention.self.query"].tolist() == [1, 2]  # no pattern: the saved λ's
    pattern = {f"{m}.lora_E": [True] * (3 - k) + [False] * (1 + k) for k, m in enumerate(mods)}
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "ADALORA", "rank_pattern": pattern}))
    table = an.rank_table(tmp_path)
    assert table["attention.self.query"].tolist() == [3, 2]
    path = an.plot_rank_pattern(table, tmp_path / "ranks.png", title="kept ranks")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000


# --------------------------------------------------------------------------------- loading


def test_load_snapshots_by_folder_record_or_run_id(tmp_path):
    runs = tmp_path / "runs"
    steps = {s: {"m.0.q.weight": np.full((3, 2), s), "m.0.q.lora_A": np.ones((1, 2)), "m.0.k.weight": np.ones((3, 2))}
             for s in (20, 0, 5)}
    folder = write_snapshots(runs / "abc.snapshots", steps, scaling={"m.0.q": 2.0})
    snaps = an.load_snapshots(folder)
    assert [s.step for s in snaps] == [0, 5, 20]
    assert snaps[1].meta == {"step": 5, "variant": "lora", "run_id": "abc", "scaling": {"m.0.q": 2.0}}
    last = snaps[2].modules["m.0.q"]["weight"]
    assert last.tolist() == [[20, 20]] * 3 and last.dtype == np.float32
    assert set(snaps[0].modules["m.0.q"]) == {"weight", "lora_A"}
    for other in (an.load_snapshots(runs / "abc.json"), an.load_snapshots("abc", results_dir=tmp_path)):
        assert [s.step for s in other] == [0, 5, 20]
    assert set(an.load_snapshots(folder, modules=r"\.q$")[0].modules) == {"m.0.q"}
    with pytest.raises(ValueError, match="results_dir"):
        an.load_snapshots("abc")
    with pytest.raises(FileNotFoundError):
        an.load_snapshots(runs / "missing.json")
    save_file({"x.weight": np.ones((1, 1), np.float32)}, str(folder / "step_000007.safetensors"),
              metadata={"step": "8"})
    with pytest.raises(ValueError, match="step 8"):
        an.load_snapshots(folder)


def test_load_adapter_reads_peft_keys_of_lora_dora_and_adalora(tmp_path):
    q, v = BERT.format(0, "attention.self.query"), BERT.format(0, "attention.self.value")
    tensors = {f"base_model.model.{q}.lora_A.weight": np.ones((2, 5)),
               f"base_model.model.{q}.lora_B.weight": np.ones((4, 2)),
               f"base_model.model.{q}.lora_magnitude_vector": np.ones(4),
               f"base_model.model.{v}.lora_A": np.ones((3, 5)), f"base_model.model.{v}.lora_E": np.ones((3, 1)),
               "base_model.model.classifier.weight": np.ones((2, 4))}  # a trained head: not an adapter
    save_file({k: val.astype(np.float32) for k, val in tensors.items()}, str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 2, "use_dora": True}))
    adapter, config = an.load_adapter(tmp_path)
    assert config == {"r": 2, "use_dora": True}
    assert set(adapter) == {q, v}
    assert set(adapter[q]) == {"lora_A", "lora_B", "lora_magnitude_vector"} and adapter[q]["lora_B"].shape == (4, 2)
    assert set(adapter[v]) == {"lora_A", "lora_E"}


# ---------------------------------------------------------------------------------- plots


def test_plot_similarity_writes_a_png_per_call(tmp_path):
    rng = np.random.default_rng(12)
    A8, A64 = rng.standard_normal((8, 50)), rng.standard_normal((32, 50))
    grids = {"ΔW_q": an.subspace_similarity_grid(A8, A64), "ΔW_v": an.subspace_similarity_grid(A64, A8)}
    for path in (an.plot_similarity(grids, tmp_path / "phi.png", title="layer 0"),
                 an.plot_similarity(grids["ΔW_q"], tmp_path / "one" / "phi.png")):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000


def test_galore_state_elements_is_table_1_on_either_orientation():
    # 4x6 at r=2: projector 4·2 + moments 2·6·2 = 32; 10 other parameters: 2·10 moments
    assert an.galore_state_elements([(4, 6)], 2, 4 * 6 + 10) == 32 + 20
    assert an.galore_state_elements([(6, 4)], 2, 4 * 6 + 10) == 32 + 20  # the smaller side is m either way
    assert an.galore_state_elements([], 2, 10) == 2 * 10  # nothing projected: full AdamW
