"""AdaLoRA against peft's AdaLoRA (the oracle): init, forward, orthogonality penalty, gradients, the rank
allocator over a scripted run (importance EMAs, triplet scores, budgets, rank patterns, weights), merge,
parameter counts, the saved adapter (loaded back by peft) and option validation."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from tiny import MODELS, loss_of, output_of, tiny_bert, tiny_llama, token_batch

import variants
from variants.adalora import AdaLoRALinear
from variants.base import VariantError
from variants.lora import adapter_layers

peft = pytest.importorskip("peft")
from peft import AdaLoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402

F64 = torch.float64
TARGETS = ["query", "key", "value", "attention.output.dense"]  # 2 layers x 4 = 8 adapted matrices
RANK, INIT_R, ALPHA = 2, 4, 8.0
# a 16-step run: warm-up at steps 0-2; cubic budget, masks at 4, 6, 8, 10; final pattern at 11, then fixed
TOTAL, TINIT, TFINAL, DELTA_T = 16, 2, 5, 2
END = TOTAL - TFINAL
LR = 2e-2
ADA = "default"  # peft's adapter name



def make_pair(dtype=F64, seed=0, targets=TARGETS, orth_reg_weight=0.5, task_type="SEQ_CLS", model=tiny_bert):
    """(base, variant, our model, peft model); peft's init is copied into ours."""
    base = model(seed=seed, dtype=dtype)
    v = variants.create("adalora", rank=RANK, init_r=INIT_R, alpha=ALPHA, targets=targets, tinit=TINIT,
                        tfinal=TFINAL, deltaT=DELTA_T, orth_reg_weight=orth_reg_weight, dropout=0.0,
                        train_head=task_type == "SEQ_CLS")  # peft's AdaLoraConfig: lora_dropout 0
    ours = v.apply(copy.deepcopy(base))
    cfg = AdaLoraConfig(task_type=task_type, target_modules=targets, init_r=INIT_R, target_r=RANK,
                        lora_alpha=ALPHA, tinit=TINIT, tfinal=TFINAL, deltaT=DELTA_T, total_step=TOTAL,
                        beta1=0.85, beta2=0.85, orth_reg_weight=orth_reg_weight)
    pm = get_peft_model(copy.deepcopy(base), cfg)
    for n, p in pm.named_parameters():
        if ".ranknum." in n:  # peft re-wraps ranknum as a *trainable* Parameter when it casts to float64
            p.requires_grad_(False)
    copy_into_ours(pm, ours)
    return base, v, ours, pm


def inner(pm):
    return pm.base_model.model  # the transformers model inside peft, named like ours


def peft_layer(pm, name):
    return inner(pm).get_submodule(name)


@torch.no_grad()
def copy_into_ours(pm, ours):
    for name, layer in adapter_layers(ours, AdaLoRALinear):
        pl = peft_layer(pm, name)
        for p in ("lora_A", "lora_B", "lora_E"):
            getattr(layer, p).copy_(getattr(pl, p)[ADA])


def peft_params(pm) -> dict:
    """peft's trainable tensors under our names (``...query.lora_A``, ``classifier.weight``)."""
    out = {}
    for n, p in inner(pm).named_parameters():
        if p.requires_grad:
            out[n.replace(f".{ADA}", "").replace(".modules_to_save", "")] = p
    return out


def our_params(model) -> dict:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def max_diff(a: dict, b: dict, grad=False) -> float:
    assert set(a) == set(b), set(a) ^ set(b)
    get = (lambda p: p.grad) if grad else (lambda p: p.detach())
    return max((get(a[k]) - get(b[k])).abs().max().item() for k in a)


def peft_triplet_scores(pm) -> dict[str, torch.Tensor]:
    """peft's S_i per module, assembled the way ``RankAllocator.mask_to_budget`` does, from its own EMAs."""
    ra = pm.base_model.rankallocator
    out = {}
    for n, _ in inner(pm).named_parameters():
        if n.endswith(f"lora_E.{ADA}"):
            stem = n[: -len(f".lora_E.{ADA}")]
            s_a = ra._element_score(f"{stem}.lora_A.{ADA}").mean(dim=1, keepdim=True)
            s_b = ra._element_score(f"{stem}.lora_B.{ADA}").mean(dim=0).view(-1, 1)
            out[stem] = ra._combine_ipt(ra._element_score(n), torch.cat([s_a, s_b], dim=1))
    return out


def peft_pattern(pm):
    pattern = pm.peft_config[ADA].rank_pattern
    if pattern is None:
        return None
    return {k.replace(f".lora_E.{ADA}", "").replace(".lora_E", ""): v for k, v in pattern.items()}


# ----------------------------------------------------------------------------------------------- init


def test_init_starts_at_base_like_peft():
    base = tiny_bert(dtype=F64)
    torch.manual_seed(0)
    v = variants.create("adalora", rank=RANK, init_r=INIT_R, alpha=ALPHA, targets=TARGETS)
    ours = v.apply(copy.deepcopy(base))
    torch.manual_seed(0)
    pm = get_peft_model(copy.deepcopy(base), AdaLoraConfig(task_type="SEQ_CLS", target_modules=TARGETS,
                                                           init_r=INIT_R, target_r=RANK, total_step=TOTAL))
    batch = token_batch()
    ref = output_of(base, batch)
    assert torch.equal(output_of(ours, batch), ref)  # Λ = 0: the update is exactly zero
    assert torch.equal(output_of(pm, batch), ref)
    layers = adapter_layers(ours, AdaLoRALinear)
    assert len(layers) == 8
    for name, layer in layers:
        pl = peft_layer(pm, name)
        for p in ("lora_A", "lora_B", "lora_E"):
            assert getattr(layer, p).shape == getattr(pl, p)[ADA].shape
            assert getattr(layer, p).requires_grad
        assert torch.count_nonzero(layer.lora_E) == 0
        assert 0.015 < layer.lora_A.std().item() < 0.025 and 0.015 < layer.lora_B.std().item() < 0.025
        assert layer.ranknum.item() == pl.ranknum[ADA].item() == INIT_R
        assert layer.scaling == pl.scaling[ADA] == ALPHA


def test_default_init_r_and_rank_is_target():
    v = variants.create("adalora", rank=8)
    assert v.cfg.initial_rank == 12 and v.cfg.init_r is None  # peft's 12 -> 8; the option stays as given
    assert variants.create("adalora", rank=3).cfg.initial_rank == 5  # ceil(4.5)
    assert variants.create("adalora", rank=4, init_r=4).cfg.initial_rank == 4


# ----------------------------------------------------------------------------------------------- forward


def test_forward_penalty_and_gradients_match_peft():
    _, v, ours, pm = make_pair()
    torch.manual_seed(1)
    with torch.no_grad():  # leave the init: Λ non-zero, P and Q moved
        for n, p in inner(pm).named_parameters():
            if "lora_" in n:
                p.add_(0.3 * torch.randn_like(p) if "lora_E" in n else 0.05 * torch.randn_like(p))
    copy_into_ours(pm, ours)
    batch = token_batch(n=6, seq=10, seed=7)
    out = pm(**batch)
    peft_task = F.cross_entropy(out.logits, batch["labels"])
    peft_reg = out.loss - peft_task  # AdaLoraModel.forward adds orth_reg_weight * penalty to the loss
    our_task, our_reg = loss_of(ours, batch), v.extra_loss(ours)
    d_out = (output_of(ours, batch) - out.logits).abs().max().item()
    assert d_out < 1e-12
    assert peft_reg.item() > 0.1  # far from orthogonal: the penalty matters
    assert abs(our_reg.item() - peft_reg.item()) < 1e-12
    assert abs(our_task.item() - peft_task.item()) < 1e-12
    (our_task + our_reg).backward()
    out.loss.backward()
    d_grad = max_diff(our_params(ours), peft_params(pm), grad=True)
    assert d_grad < 1e-12
    for name, layer in adapter_layers(ours, AdaLoRALinear):
        d_w = (layer.delta_weight() - peft_layer(pm, name).get_delta_weight(ADA)).abs().max().item()
        assert d_w < 1e-14
    d_reg = abs(our_reg.item() - peft_reg.item())
    print(f"\nparity f64: logits {d_out:.1e}, penalty {d_reg:.1e}, grads {d_grad:.1e}")


def test_no_penalty_when_weight_zero():
    _, v, ours, _ = make_pair(orth_reg_weight=0.0)
    assert v.extra_loss(ours) == 0.0
    _, v, ours, _ = make_pair(orth_reg_weight=0.5)
    assert v.extra_loss(ours).item() > 0  # P, Q ~ N(0, 0.02²) are far from orthonormal


# ----------------------------------------------------------------------------------------------- scripted run


@pytest.fixture(scope="module")
def run():
    """The same 16 steps for peft and for us; per-step differences are collected for the tests below."""
    _, v, ours, pm = make_pair()
    opt = v.optimizer(ours, lr=LR)
    popt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    ours.train(), pm.train()
    log = {"ema": [], "scores": [], "weights": [], "loss": [], "patterns": {}, "budgets": []}
    peft_scores_prev = None
    for step in range(TOTAL):
        batch = token_batch(n=6, seq=10, seed=100 + step)
        loss = loss_of(ours, batch) + v.extra_loss(ours)
        loss.backward()
        opt.step()
        v.after_step(ours, step, TOTAL)
        out = pm(**batch)
        out.loss.backward()
        popt.step()
        pm.base_model.update_and_allocate(step)
        log["loss"].append(abs(loss.item() - out.loss.item()))
        ra = pm.base_model.rankallocator
        if step < END:
            for key, ema in v.allocator.ema_ipt.items():
                pkey = key.replace("lora_A", f"lora_A.{ADA}").replace("lora_B", f"lora_B.{ADA}")
                pkey = pkey.replace("lora_E", f"lora_E.{ADA}")
                log["ema"].append((ema - ra.exp_avg_ipt[pkey]).abs().max().item())
                log["ema"].append((v.allocator.ema_unc[key] - ra.exp_avg_unc[pkey]).abs().max().item())
            theirs = peft_triplet_scores(pm)
            mine = v.allocator.triplet_scores(v._layers(ours))
            log["scores"].append(max((mine[k] - theirs[k]).abs().max().item() for k in theirs))
            log["budgets"].append((step, v.budget, ra.budget_schedule(step)[0]))
        if v.last_scores is not None and step in (4, 6, 8, 10, END):  # the scores that set this step's mask
            theirs = peft_scores_prev if step == END else peft_triplet_scores(pm)
            diffs = [(torch.tensor(v.last_scores[k], dtype=F64) - theirs[k]).abs().max().item()
                     for k in theirs]
            log["scores"].append(max(diffs))
        if step < END:
            peft_scores_prev = peft_triplet_scores(pm)
        log["patterns"][step] = (copy.deepcopy(v.rank_pattern), peft_pattern(pm))
        log["weights"].append(max_diff(our_params(ours), peft_params(pm)))
        opt.zero_grad()
        popt.zero_grad()
    return {"v": v, "ours": ours, "pm": pm, "log": log}


def test_run_importance_scores_match(run):
    log = run["log"]
    assert len(log["ema"]) > 0 and max(log["ema"]) < 1e-14
    assert max(log["scores"]) < 1e-14
    print(f"\nrun f64: EMA {max(log['ema']):.1e}, triplet scores {max(log['scores']):.1e}, "
          f"loss {max(log['loss']):.1e}, weights {max(log['weights']):.1e}")


def test_run_budget_schedule_matches(run):
    budgets = run["log"]["budgets"]
    assert all(ours == theirs for _, ours, theirs in budgets)
    by_step = dict((s, b) for s, b, _ in budgets)
    init_b, target_b = 8 * INIT_R, 8 * RANK
    assert by_step[0] == by_step[TINIT] == init_b  # warm-up at the full budget
    assert init_b > by_step[4] > by_step[6] > by_step[8] >= target_b  # cubic decrease
    assert run["v"].budget == target_b


def test_run_rank_patterns_equal_peft(run):
    patterns = run["log"]["patterns"]
    changed = []
    for step, (ours, theirs) in patterns.items():
        assert ours == theirs, f"step {step}"
        if ours is not None and (not changed or ours != patterns[changed[-1]][0]):
            changed.append(step)
    assert patterns[TINIT + 1][0] is None  # no mask before the first deltaT step of the budgeting phase
    assert len(changed) >= 4 and changed[0] == 4  # masked several times during the budgeting phase
    final = patterns[END][0]
    assert all(patterns[s][0] == final for s in range(END, TOTAL))  # fixed in the final phase
    ranks = run["v"].effective_ranks()
    assert sum(ranks.values()) <= 8 * RANK  # ties at the threshold drop together
    assert len(set(ranks.values())) > 1, ranks  # the budget went unevenly: it was allocated
    assert run["v"].summary(None)["ranks"] == ranks and run["v"].final


def test_run_weights_match_and_pruned_values_stay_zero(run):
    log, v, ours, pm = run["log"], run["v"], run["ours"], run["pm"]
    assert max(log["loss"]) < 1e-12
    assert max(log["weights"]) < 1e-12
    for name, layer in adapter_layers(ours, AdaLoRALinear):
        kept = torch.tensor(v.rank_pattern[name])
        assert torch.count_nonzero(layer.lora_E[~kept]) == 0  # Adam revives them; after_step re-zeroes
        assert torch.count_nonzero(layer.lora_E[kept]) == int(kept.sum())
        assert torch.count_nonzero(peft_layer(pm, name).lora_E[ADA][~kept]) == 0
    assert not v.allocator.ema_ipt and not pm.base_model.rankallocator.exp_avg_ipt  # EMAs freed once final


def test_merge_after_run_equals_unmerged_forward(run):
    v, ours, pm = run["v"], copy.deepcopy(run["ours"]), run["pm"]
    ours.eval()
    batch = token_batch(n=5, seq=9, seed=3)
    before = {n: p.detach().clone() for n, p in ours.named_parameters() if "base_layer" in n}
    unmerged = output_of(ours, batch)
    for name, layer in adapter_layers(ours, AdaLoRALinear):
        d = (layer.delta_weight() - peft_layer(pm, name).get_delta_weight(ADA)).abs().max().item()
        assert d < 1e-12
    v.merge(ours)
    assert all(layer.merged for _, layer in adapter_layers(ours, AdaLoRALinear))
    d_merge = (output_of(ours, batch) - unmerged).abs().max().item()
    assert d_merge < 1e-12
    v.unmerge(ours)
    for n, p in ours.named_parameters():
        if n in before:
            torch.testing.assert_close(p, before[n], rtol=0, atol=1e-14)
    print(f"\nmerge f64: |merged - unmerged| {d_merge:.1e}")


# peft's own quirks, also seen with an adapter peft saved itself: a module pruned to rank 0 trips its ZeRO-3
# shape check, and LoraConfig's check of *its* rank_pattern (a per-module rank) misreads AdaLoRA's.
@pytest.mark.filterwarnings("ignore:Adapter 'default'", "ignore:The following rank_pattern keys")
def test_saved_adapter_is_peft_layout_and_loads_in_peft(run, tmp_path):
    v, ours, pm = run["v"], run["ours"], run["pm"]
    state = v.adapter_state(ours)
    theirs = get_peft_model_state_dict(pm)  # cut to the rank pattern, no ranknum
    assert set(state) == set(theirs)
    for k in state:
        assert state[k].shape == theirs[k].shape, k
        torch.testing.assert_close(state[k], theirs[k], rtol=0, atol=1e-12)
    v.save_adapter(ours, tmp_path)
    loaded = PeftModel.from_pretrained(tiny_bert(dtype=F64), str(tmp_path))
    batch = token_batch(n=5, seq=9, seed=4)
    ours.eval()
    torch.testing.assert_close(output_of(loaded, batch), output_of(ours, batch), rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------------- counts


@pytest.mark.parametrize("model_name", ["bert", "llama"])
def test_trainable_count_equals_peft(model_name):
    if model_name == "bert":
        _, v, ours, pm = make_pair(dtype=torch.float32)
    else:
        _, v, ours, pm = make_pair(dtype=torch.float32, targets="all-linear", task_type=None,
                                   model=tiny_llama)
    assert v.cost(ours)["trainable_params"] == pm.get_nb_trainable_parameters()[0]


# ----------------------------------------------------------------------------------------------- options


@pytest.mark.parametrize("opts, option", [
    ({"rank": 8, "init_r": 4}, "init_r"),
    ({"beta1": 0.0}, "beta1"),
    ({"beta1": 1.0}, "beta1"),
    ({"beta2": 1.5}, "beta2"),
    ({"orth_reg_weight": -0.1}, "orth_reg_weight"),
    ({"deltaT": 0}, "deltaT"),
    ({"tinit": -1}, "tinit"),
    ({"tfinal": 1.5}, "tfinal"),
    ({"tinit": 0.6, "tfinal": 0.5}, "tinit"),
    ({"scaling": "rslora"}, "scaling"),
])
def test_bad_options_name_the_option(opts, option):
    with pytest.raises(VariantError, match=option):
        variants.create("adalora", **opts)


def test_init_r_below_target_names_both():
    with pytest.raises(VariantError, match=r"init_r=4.*target_r"):
        variants.create("adalora", rank=8, init_r=4)


def test_schedule_needs_a_budgeting_phase():
    make, batch_of, opts = MODELS["bert"]
    v = variants.create("adalora", rank=2, tinit=5, tfinal=5, **opts)
    model = v.apply(make())
    loss_of(model, batch_of()).backward()
    with pytest.raises(VariantError, match=r"tinit=5.*tfinal=5.*total_steps=10"):
        v.after_step(model, 0, 10)
    v.after_step(model, 0, 11)  # 5 + 5 < 11: fine
    assert variants.create("adalora", tinit=0.125, tfinal=0.3125).cfg.schedule(16) == (2, 5)
    with pytest.raises(VariantError, match="total_steps"):
        variants.create("adalora", tinit=0.2, tfinal=0.5).cfg.schedule(3)  # 1 + 2 >= 3


def test_after_step_without_gradients_is_a_clear_error():
    _, v, ours, _ = make_pair()
    with pytest.raises(VariantError, match="zero_grad"):
        v.after_step(ours, 0, TOTAL)


def test_init_r_equal_to_rank_never_masks():
    """init_r == rank leaves nothing to remove (peft's kthvalue(k=0) would fail); the pattern stays full."""
    make, batch_of, opts = MODELS["bert"]
    v = variants.create("adalora", rank=2, init_r=2, tinit=0, tfinal=2, deltaT=1, **opts)
    model = v.apply(make())
    opt = v.optimizer(model, lr=1e-2)
    for step in range(6):
        (loss_of(model, batch_of()) + v.extra_loss(model)).backward()
        opt.step()
        v.after_step(model, step, 6)
        opt.zero_grad()
    assert v.final and all(all(keep) for keep in v.rank_pattern.values())
    assert set(v.effective_ranks().values()) == {2}
