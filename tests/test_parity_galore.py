"""GaLore: step-for-step parity with galore-torch's GaLoreAdamW, optimizer-state bytes, rank of the update,
state_dict round trip and option validation.

Models are float64 so that the comparisons are tight; galore-torch still runs its SVD in float32 for a
float64 gradient (it casts every non-float32 matrix to float32 before ``torch.linalg.svd`` and the
projector back afterwards), and so does ours: ``test_svd_runs_in_float32`` pins that down.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import variants
from tests.tiny import loss_of, mlp, mlp_batch, tiny_bert, token_batch
from variants import VariantError, optimizer_state_bytes
from variants.galore import GaLoreAdamW

galore_torch = pytest.importorskip("galore_torch")

LR, WD, EPS = 1e-3, 0.1, 1e-6
MLP_TARGETS = ["0", "4"]  # 1000x784 (tall: right projector) and 10x2000 (wide: left); "2" stays plain
MLP_RANK, MLP_GAP, MLP_STEPS = 4, 2, 5  # projector computed at steps 0, 2 and 4



def _mlp64():
    return mlp().double()


def _mlp_batches(n):
    return [{"x": b["x"].double(), "y": b["y"]} for b in (mlp_batch(seed=10 + i) for i in range(n))]


def _bert_batches(n):
    return [token_batch(seed=10 + i) for i in range(n)]


def _reference(opt: torch.optim.Optimizer, model: nn.Module, ref_model: nn.Module):
    """galore_torch.GaLoreAdamW over ``ref_model`` with exactly ``opt``'s groups and hyperparameters."""
    by_id = dict(zip([id(p) for p in model.parameters()], ref_model.parameters(), strict=True))
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [by_id[id(p)] for p in g["params"]]}
              for g in opt.param_groups]
    return galore_torch.GaLoreAdamW(groups, lr=LR, no_deprecation_warning=True)


def _train_step(model, opt, batch):
    loss_of(model, batch).backward()
    opt.step()


def _max_diff(a: nn.Module, b: nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters(), strict=True))


def _run_pair(model, variant, batches):
    """Train ``model`` with the variant's optimizer and a deepcopy with galore-torch; per-step max diffs."""
    ref_model = copy.deepcopy(model)
    opt = variant.optimizer(model, lr=LR, weight_decay=WD, eps=EPS)
    ref = _reference(opt, model, ref_model)
    diffs, snapshots = [], []
    for batch in batches:
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        _train_step(model, opt, batch)
        _train_step(ref_model, ref, batch)
        diffs.append(_max_diff(model, ref_model))
        snapshots.append((before, {id(p): {k: (v.clone() if torch.is_tensor(v) else v)
                                           for k, v in opt.state[p].items()} for p in model.parameters()}))
        opt.zero_grad()
        ref.zero_grad()
    return opt, ref, diffs, snapshots


# --------------------------------------------------------------------------------------------- MLP run


@pytest.fixture(scope="module")
def mlp_run():
    model = _mlp64()
    v = variants.create("galore", rank=MLP_RANK, targets=MLP_TARGETS, update_proj_gap=MLP_GAP)
    v.apply(model)
    opt, ref, diffs, snapshots = _run_pair(model, v, _mlp_batches(MLP_STEPS))
    return {"model": model, "variant": v, "opt": opt, "ref": ref, "diffs": diffs, "snapshots": snapshots}


def test_parity_mlp(mlp_run):
    diffs, opt, model = mlp_run["diffs"], mlp_run["opt"], mlp_run["model"]
    print(f"GaLore vs galore-torch, MLP float64, per-step max |dW|: {diffs}")
    assert max(diffs) <= 1e-12, diffs
    # the run really crossed projector refreshes, on both sides
    w0, w4 = model[0].weight, model[4].weight
    assert set(opt.state[w0]) >= {"proj_v"} and "proj_u" not in opt.state[w0]  # 1000x784: G Vᵣᵀ
    assert set(opt.state[w4]) >= {"proj_u"} and "proj_v" not in opt.state[w4]  # 10x2000: Uᵣᵀ G
    snaps = [s[1] for s in mlp_run["snapshots"]]
    pv = [s[id(w0)]["proj_v"] for s in snaps]  # projector after steps 1..5 (computed at steps 0, 2, 4)
    assert torch.equal(pv[0], pv[1]) and torch.equal(pv[2], pv[3])  # reused between refreshes
    assert not torch.allclose(pv[1], pv[2]) and not torch.allclose(pv[3], pv[4])  # recomputed
    # and the weights moved by far more than the tolerance
    assert _max_diff(model, _mlp64()) > 1e-4


def test_optimizer_state_bytes_mlp(mlp_run):
    model, opt, ref = mlp_run["model"], mlp_run["opt"], mlp_run["ref"]
    esize = model[0].weight.element_size()
    expected = 0
    for name, p in model.named_parameters():
        if name.rpartition(".")[0] in MLP_TARGETS and p.ndim == 2:
            m, n = p.shape
            moments = m * MLP_RANK if m >= n else MLP_RANK * n  # std: the smaller side becomes r
            projector = MLP_RANK * n if m >= n else m * MLP_RANK
            expected += (2 * moments + projector) * esize
        else:
            expected += 2 * p.numel() * esize  # plain AdamW moments; "step" is an int (0 bytes)
    ours = optimizer_state_bytes(opt)
    theirs = optimizer_state_bytes(ref)
    adamw_model = _mlp64()
    adamw = torch.optim.AdamW(adamw_model.parameters(), lr=LR)
    _train_step(adamw_model, adamw, _mlp_batches(1)[0])
    plain = optimizer_state_bytes(adamw)
    print(f"optimizer state bytes, MLP float64: GaLore {ours}, galore-torch {theirs}, AdamW {plain}")
    assert ours == expected == theirs
    assert ours < plain
    assert plain == 2 * sum(p.numel() for p in model.parameters()) * esize + 4 * len(list(model.parameters()))


def _sketched_singular_values(delta: torch.Tensor, k: int) -> torch.Tensor:
    """Singular values of delta·Ω, Ω a Gaussian n×k: rank(delta·Ω) = min(rank(delta), k) almost surely."""
    omega = torch.randn(delta.shape[1], k, generator=torch.Generator().manual_seed(0), dtype=delta.dtype)
    return torch.linalg.svdvals(delta @ omega)


def test_update_rank_mlp(mlp_run):
    """After one step W1/(1-ηλ) - W0 = -η'·α·(projected-back update) has rank <= r (plain AdamW: high)."""
    before = mlp_run["snapshots"][0][0]
    after = mlp_run["snapshots"][1][0]  # the weights before step 2 are the weights after step 1
    k = 3 * MLP_RANK
    ranks = {}
    for name in ("0.weight", "4.weight", "2.weight"):
        delta = after[name] / (1 - LR * WD) - before[name]  # undo the decoupled decay applied after it
        s = _sketched_singular_values(delta, k)
        ranks[name] = int((s > 1e-9 * s[0]).sum())
        print(f"{name}: sketched singular values / largest: {(s / s[0]).tolist()}")
    print(f"rank of the first update (r={MLP_RANK}, sketch width {k}): {ranks}")
    assert 0 < ranks["0.weight"] <= MLP_RANK and 0 < ranks["4.weight"] <= MLP_RANK
    assert ranks["2.weight"] == k  # the non-targeted 2000x1000 matrix gets an ordinary, high-rank Adam step


# --------------------------------------------------------------------------------------------- BERT


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right", "full"])
def test_parity_bert(proj_type):
    model = tiny_bert(dtype=torch.float64)
    v = variants.create("galore", rank=4, targets="all-linear", update_proj_gap=2, proj_type=proj_type)
    v.apply(model)
    opt, ref, diffs, _ = _run_pair(model, v, _bert_batches(6))
    print(f"GaLore vs galore-torch, tiny BERT float64, proj_type={proj_type}: per-step max |dW| {diffs}")
    assert max(diffs) <= 1e-12, diffs
    assert _max_diff(model, tiny_bert(dtype=torch.float64)) > 1e-4
    inter = model.bert.encoder.layer[0].intermediate.dense.weight  # 37x32, tall
    out = model.bert.encoder.layer[0].output.dense.weight  # 32x37, wide
    sides = {"std": ({"proj_v"}, {"proj_u"}), "reverse_std": ({"proj_u"}, {"proj_v"}),
             "left": ({"proj_u"}, {"proj_u"}), "right": ({"proj_v"}, {"proj_v"}),
             "full": ({"proj_u", "proj_v"}, {"proj_u", "proj_v"})}[proj_type]
    for w, keys in zip((inter, out), sides, strict=True):
        assert {k for k in opt.state[w] if k.startswith("proj_")} == keys
    assert optimizer_state_bytes(opt) == optimizer_state_bytes(ref)


def test_svd_runs_in_float32():
    """For a float64 weight the projector comes from a float32 SVD (as galore-torch), cast to float64."""
    model = tiny_bert(dtype=torch.float64)
    v = variants.create("galore", rank=4, targets=["intermediate.dense"])
    v.apply(model)
    opt = v.optimizer(model, lr=LR)
    _train_step(model, opt, _bert_batches(1)[0])
    w = model.bert.encoder.layer[0].intermediate.dense.weight
    proj = opt.state[w]["proj_v"]
    assert proj.dtype == torch.float64 and proj.shape == (4, 32)
    assert torch.equal(proj, proj.float().double())  # float32 values
    torch.testing.assert_close(proj @ proj.T, torch.eye(4, dtype=torch.float64), atol=1e-6, rtol=0)


def test_state_dict_round_trip():
    """Save after 3 steps, load into a fresh optimizer, go on across a refresh: same as uninterrupted."""
    batches = _bert_batches(6)
    v = variants.create("galore", rank=4, targets="all-linear", update_proj_gap=2)
    model = v.apply(tiny_bert(dtype=torch.float64))
    opt = v.optimizer(model, lr=LR, weight_decay=WD)
    for b in batches[:3]:
        _train_step(model, opt, b)
        opt.zero_grad()
    saved = copy.deepcopy(opt.state_dict())
    resumed = copy.deepcopy(model)
    opt2 = v.optimizer(resumed, lr=LR, weight_decay=WD)
    opt2.load_state_dict(saved)
    w = resumed.bert.encoder.layer[0].output.dense.weight
    assert opt2.state[w]["step"] == 3 and opt2.state[w]["proj_u"].shape == (32, 4)
    for b in batches[3:]:
        for m, o in ((model, opt), (resumed, opt2)):
            _train_step(m, o, b)
            o.zero_grad()
    assert _max_diff(model, resumed) == 0.0


def test_variant_groups_and_cost():
    model = tiny_bert()
    v = variants.create("galore", rank=4, targets=["query", "value"])
    model.requires_grad_(False)
    v.apply(model)
    assert all(p.requires_grad for p in model.parameters())
    opt = v.optimizer(model, lr=LR, weight_decay=WD)
    assert isinstance(opt, GaLoreAdamW)
    proj = [g for g in opt.param_groups if "rank" in g]
    assert len(proj) == 1 and proj[0]["weight_decay"] == WD
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in proj[0]["params"]) == sorted(
        f"bert.encoder.layer.{i}.attention.self.{k}.weight" for i in range(2) for k in ("query", "value"))
    assert v.target_modules == [f"bert.encoder.layer.{i}.attention.self.{k}" for i in range(2)
                                for k in ("query", "value")]
    cost = v.cost(model, opt)
    assert cost["trainable_params"] == cost["base_params"] == cost["total_params"]
    assert all(g["weight_decay"] == 0.0 for g in opt.param_groups if any(p.ndim < 2 for p in g["params"]))


def test_measured_state_after_a_step_is_table_1s_count_from_the_records_summary():
    """The record's variant_state (projected shapes, rank) and trainable count give, by GaLore Table 1
    (``analysis.galore_state_elements``), exactly the optimizer state the run holds after a step, on weights
    of both orientations (BERT's 37x32 intermediate, 32x37 output)."""
    from experiments import analysis

    model = tiny_bert()
    v = variants.create("galore", rank=4, targets="all-linear")
    model.requires_grad_(False)
    v.apply(model)
    opt = v.optimizer(model, lr=LR)
    batch = token_batch(num_labels=3)
    loss_of(model, batch).backward()
    opt.step()
    summary = v.summary(model)
    shapes = list(summary["projected"].values())
    assert {tuple(s) for s in shapes} >= {(32, 32), (37, 32), (32, 37)} and summary["rank"] == 4
    elements = analysis.galore_state_elements(shapes, 4, v.cost(model, opt)["trainable_params"])
    assert optimizer_state_bytes(opt) == elements * 4  # float32; the step counters are ints (0 bytes)


# --------------------------------------------------------------------------------------------- options


@pytest.mark.parametrize("options, option", [
    ({"rank": 0}, "rank"), ({"rank": -2}, "rank"), ({"rank": 2.5}, "rank"), ({"rank": True}, "rank"),
    ({"proj_type": "diagonal"}, "proj_type"),
    ({"update_proj_gap": 0}, "update_proj_gap"), ({"update_proj_gap": -5}, "update_proj_gap"),
    ({"scale": 0}, "scale"), ({"scale": -0.25}, "scale"), ({"scale": float("nan")}, "scale"),
    ({"targets": []}, "targets"),
])
def test_bad_options(options, option):
    with pytest.raises(VariantError, match=rf"^invalid option {option}="):
        variants.create("galore", **options)


def test_rank_larger_than_a_target():
    v = variants.create("galore", rank=33, targets=["query"])  # query is 32x32
    with pytest.raises(VariantError, match=r"invalid option rank=33.*<= 32"):
        v.apply(tiny_bert())
    v = variants.create("galore", rank=33, targets="all-linear")  # intermediate.dense is 37x32
    with pytest.raises(VariantError, match="rank"):
        v.optimizer(tiny_bert(), lr=LR)


@pytest.mark.parametrize("correct_bias", [True, False])
def test_plain_groups_fused_adamw_match_galore_torch(correct_bias):
    """The unprojected parameters take one fused AdamW kernel (ε and lr rearranged to galore-torch's folded
    bias correction, decay after the update): equal to galore-torch's AdamW step for step, also when the
    parameters of a group are at different step counts (one without a gradient on some steps)."""
    g = torch.Generator().manual_seed(0)
    ours = [nn.Parameter(torch.randn(7, 5, generator=g, dtype=torch.float64)),
            nn.Parameter(torch.randn(5, generator=g, dtype=torch.float64))]
    theirs = [nn.Parameter(p.detach().clone()) for p in ours]
    start = ours[0].detach().clone()
    settings = {"lr": 1e-2, "weight_decay": WD, "eps": EPS, "betas": (0.8, 0.95), "correct_bias": correct_bias}
    opt = GaLoreAdamW([{"params": ours}], **settings)
    ref = galore_torch.GaLoreAdamW([{"params": theirs}], no_deprecation_warning=True, **settings)
    for step in range(6):
        grads = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in ours]
        for ps in (ours, theirs):
            for i, (p, grad) in enumerate(zip(ps, grads, strict=True)):
                p.grad = None if (i == 1 and step in (1, 2)) else grad.clone()
        opt.step()
        ref.step()
        for p, q in zip(ours, theirs, strict=True):
            assert (p - q).abs().max().item() <= 1e-13, step
    assert [opt.state[p]["step"] for p in ours] == [6, 4]
    assert (ours[0] - start).abs().max() > 1e-3


def test_optimizer_rejects_bad_groups():
    w = nn.Parameter(torch.zeros(6, 3))
    with pytest.raises(VariantError, match="rank"):
        GaLoreAdamW([{"params": [w], "rank": 4}])
    with pytest.raises(VariantError, match="2-D"):
        GaLoreAdamW([{"params": [nn.Parameter(torch.zeros(6))], "rank": 1}])
    with pytest.raises(VariantError, match="proj_type"):
        GaLoreAdamW([{"params": [w], "rank": 2, "proj_type": "diagonal"}])
    opt = GaLoreAdamW([{"params": [w], "rank": 2}])
    assert {k: opt.param_groups[0][k] for k in ("update_proj_gap", "scale", "proj_type")} == {
        "update_proj_gap": 200, "scale": 0.25, "proj_type": "std"}
    assert opt.defaults["eps"] == 1e-6


# ------------------------------------------------------------------------- layer-wise update, low-rank SVD


@pytest.mark.parametrize("make", [_mlp64, lambda: tiny_bert().double()], ids=["mlp", "bert"])
def test_layerwise_update_is_the_same_step_bit_for_bit_and_frees_every_gradient(make):
    """GaLore §4.3's per-layer weight update: each weight updated by its post-accumulate-grad hook inside
    backward equals the usual step after backward, exactly; and no gradient is left after backward."""
    targets = MLP_TARGETS if make is _mlp64 else "all-linear"
    batches = _mlp_batches(4) if make is _mlp64 else [b for b in _bert_batches(4)]
    models, opts = [], []
    for layerwise in (False, True):
        model = make()
        v = variants.create("galore", rank=2, targets=targets, update_proj_gap=2, layerwise=layerwise)
        v.apply(model)
        models.append(model)
        opts.append(v.optimizer(model, lr=LR, weight_decay=WD, eps=EPS))
    plain, layerwise = models
    sched = torch.optim.lr_scheduler.LambdaLR(opts[1], lambda s: 1.0 / (s + 1))  # the lr is read at each update
    sched_plain = torch.optim.lr_scheduler.LambdaLR(opts[0], lambda s: 1.0 / (s + 1))
    for batch in batches:
        loss_of(plain, batch).backward()
        opts[0].step()
        opts[0].zero_grad()
        sched_plain.step()
        loss_of(layerwise, batch).backward()
        assert all(p.grad is None for p in layerwise.parameters())  # freed inside backward
        opts[1].step()  # finds no gradient: a no-op, as the trainer calls it
        sched.step()
        for (n, p), q in zip(plain.named_parameters(), layerwise.parameters(), strict=True):
            assert torch.equal(p, q), n
    assert opts[0].state_dict()["state"].keys() == opts[1].state_dict()["state"].keys()


def test_layerwise_refuses_clipping_and_accumulation_in_one_line():
    v = variants.create("galore", layerwise=True)
    v.check_optim(grad_clip=0, grad_accum=1)
    for clip, accum, bad in ((1.0, 1, "optim.grad_clip=1.0"), (0, 2, "optim.grad_accum=2")):
        with pytest.raises(VariantError, match=bad) as e:
            v.check_optim(grad_clip=clip, grad_accum=accum)
        assert "\n" not in str(e.value)
    variants.create("galore").check_optim(grad_clip=1.0, grad_accum=4)  # the usual update: both fine


def test_layerwise_through_the_trainer_matches_the_usual_step_and_holds_no_gradients(tmp_path):
    from conftest import compose_config

    from experiments import train

    common = ["variant=galore", "variant.rank=4", "optim.grad_clip=0", "optim.max_steps=8", "logger=none"]
    plain = train.run(compose_config(*common, results_dir=tmp_path / "a"))
    layerwise = train.run(compose_config(*common, "variant.layerwise=true", results_dir=tmp_path / "b"))
    assert plain["status"] == layerwise["status"] == "ok"
    assert layerwise["metrics"] == plain["metrics"]
    assert layerwise["cost"]["gradient_bytes"] == 0 < plain["cost"]["gradient_bytes"]


def test_lowrank_svd_finds_the_subspace_of_a_low_rank_gradient_and_spares_the_run_rng():
    from variants.galore import orthogonal_factors

    g = torch.Generator().manual_seed(3)
    grad = torch.randn(60, 3, generator=g) @ torch.randn(3, 40, generator=g)  # exactly rank 3
    exact = orthogonal_factors(grad, 3, "full")
    state = torch.get_rng_state()
    fast = orthogonal_factors(grad, 3, "full", svd="lowrank")
    assert torch.equal(torch.get_rng_state(), state)  # dropout and data streams untouched
    for key in ("proj_u", "proj_v"):
        a, b = (exact[key], fast[key]) if key == "proj_u" else (exact[key].t(), fast[key].t())
        assert torch.allclose(b.t() @ b, torch.eye(3), atol=1e-5)  # orthonormal columns
        assert torch.allclose(a @ a.t(), b @ b.t(), atol=1e-4)  # the same subspace (signs may differ)
    assert torch.equal(orthogonal_factors(grad, 3, "full", svd="lowrank")["proj_u"], fast["proj_u"])  # repeatable
