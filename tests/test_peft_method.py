"""peft's methods as contenders (variants/peft_method.py): each trains through the shared trainer and the entry
point and writes an ok record; peft's LoRA and DoRA rows equal our native ones from the same init; the head
trains as peft's modules_to_save copy, exactly ours; saved adapters load in peft; bad options are one line."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import compose_config
from tiny import VOCAB, output_of, tiny_bert, token_batch
from torch import nn

import variants
from experiments import records
from experiments.tasks import Task, TaskSpec
from experiments.tasks.text_classification import evaluate as text_evaluate
from experiments.tasks.text_classification import loss as text_loss
from experiments.train import ConfigError, check, run
from experiments.trainer import OptimConfig, fit
from variants import VariantError

peft = pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["peft_vera", "peft_lora_fa", "peft_miss", "peft_lora", "peft_dora"]
PEFT_TYPE = {"peft_vera": "VERA", "peft_lora_fa": "LORA", "peft_miss": "MISS", "peft_lora": "LORA", "peft_dora": "LORA"}
FAST = ["optim.max_steps=20", "task.n_train=256", "task.n_val=64", "task.n_test=64", "logger=none"]
QV = ["query", "value"]


def expected_trainable(name: str, rank: int, shapes, head: int) -> int:
    """Each method's trainable count from its definition; shapes are the targets' (d_in, d_out)."""
    per_layer = {
        "peft_lora": lambda i, o: rank * (i + o),  # A: r x in, B: out x r
        "peft_dora": lambda i, o: rank * (i + o) + o,  # + magnitude (out)
        "peft_lora_fa": lambda i, o: rank * o,  # B only: A is frozen at its init
        "peft_vera": lambda i, o: o + rank,  # λ_b (out), λ_d (r); the shared random A, B are frozen buffers
        "peft_miss": lambda i, o: rank * o,  # one r x out shard
    }[name]
    return head + sum(per_layer(i, o) for i, o in shapes)


def tiny_text_task(model: nn.Module, n_train: int = 48, seed: int = 0) -> Task:
    """A 3-way classification of random token sequences (the label is the first token mod 3), on tiny_bert,
    with the text tasks' own loss and metrics (``model(**batch)``)."""
    g = torch.Generator().manual_seed(seed)

    def split(n):
        ids = torch.randint(1, VOCAB, (n, 8), generator=g)
        return [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": i[0] % 3} for i in ids]

    def collate(rows):
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}

    task = Task(model=model, model_name="tiny_bert", train=split(n_train), val=split(16), test=split(16),
                loss=text_loss, evaluate=text_evaluate, collate=collate)
    task.spec = TaskSpec(name="tiny_text", build=lambda: None, metrics={"accuracy": "max", "macro_f1": "max"},
                         main_metric="accuracy", head=("classifier",))
    return task


def bert_shapes(model, names):
    return [(model.get_submodule(n).in_features, model.get_submodule(n).out_features) for n in names]


# --- every shipped method: the shared trainer, the entry point ------------------------------------------------

@pytest.mark.parametrize("name", METHODS)
def test_trains_through_the_shared_trainer_and_counts_exact(name):
    base = tiny_bert()
    v = variants.create(name, rank=4, targets=QV, head=("classifier",), train_head=True)
    model = v.apply(copy.deepcopy(base))
    assert isinstance(model, peft.PeftModel)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    result = fit(model, v, tiny_text_task(model), OptimConfig(lr=1e-2, max_steps=6, batch_size=8, warmup_ratio=0.0),
                 device="cpu", progress=False)
    assert [h["step"] for h in result["history"]] == list(range(1, 7))
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in result["history"])
    assert 0 <= result["metrics"]["test"]["accuracy"] <= 1
    for n, p in model.named_parameters():  # only the adapter and the head's copy moved
        assert torch.equal(p, before[n]) != (n in trainable), n
    assert all(".modules_to_save.default." in n for n in trainable if "classifier" in n)  # the original head stays
    names = [n for n, _ in base.named_modules() if n.endswith(tuple(QV))]
    assert v.target_modules == names and v.identity()["rank"] == 4
    head = sum(p.numel() for p in base.classifier.parameters())
    cost = result["cost"]
    assert cost["trainable_params"] == expected_trainable(name, 4, bert_shapes(base, names), head)
    assert cost["trainable_params"] == model.get_nb_trainable_parameters()[0]  # peft's own count agrees
    assert cost["base_params"] == sum(p.numel() for p in base.parameters())
    assert cost["optimizer_state_bytes"] > 0 and cost["adapter_bytes"] > 0


@pytest.mark.parametrize("name", METHODS)
def test_the_entry_point_writes_an_ok_record(name, tmp_path):
    record = run(compose_config(f"variant={name}", *FAST, results_dir=tmp_path))
    assert record["status"] == "ok", record["error"]
    on_disk = records.load(records.record_path(tmp_path, record["run_id"]))
    assert on_disk["variant"] == name and on_disk["task"] == "synthetic" and on_disk["targets"] == ["fc1"]
    rank = variants.get(name).Config().rank
    assert on_disk["rank"] == rank and on_disk["history"][-1]["step"] == 20
    assert on_disk["cost"]["trainable_params"] == expected_trainable(name, rank, [(64, 64)], head=0)
    state = on_disk["variant_state"]  # peft's resolved config, as the record's method state
    assert state["peft_config"]["peft_type"] == PEFT_TYPE[name] and state["peft_config"]["r"] == rank
    assert state["peft_config"]["target_modules"] == ["fc1"] and state["peft_version"] == peft.__version__
    assert state["peft_config"].get("use_dora", False) == (name == "peft_dora")
    assert on_disk["metrics"]["test"]["fit"] > on_disk["trivial"]["test"]["fit"]  # it learned something


def test_a_text_task_trains_through_the_entry_point_with_the_head_as_modules_to_save(tmp_path):
    cfg = compose_config("variant=peft_vera", "optim.max_steps=2", "logger=none", "save_adapter=true",
                         results_dir=tmp_path, cache_dir=tmp_path, task="sentiment", smoke=True)
    record = run(cfg)
    assert record["status"] == "ok", record["error"]
    assert record["rank"] == 256 and len(record["targets"]) == 12  # query, value in 6 layers
    saved = json.loads((Path(record["adapter_dir"]) / "adapter_config.json").read_text())
    assert saved["peft_type"] == "VERA" and saved["modules_to_save"] == ["classifier"]


# --- the cross-check rows: peft's LoRA and DoRA equal ours --------------------------------------------------

def peft_name(ours: str) -> str:
    """Our parameter name -> peft's (adapter 'default'; the head's trainable copy in modules_to_save)."""
    ours = re.sub(r"\.(lora_[AB]|lora_magnitude_vector)$", r".\1.default.weight", ours)
    ours = re.sub(r"^classifier\.", "classifier.modules_to_save.default.", ours)
    return "base_model.model." + ours


@pytest.mark.parametrize("native, theirs", [("lora", "peft_lora"), ("dora", "peft_dora")])
def test_peft_rows_equal_the_native_ones_from_the_same_init(native, theirs):
    """Float64, default dropout (0.05, the same masks from the run's "train" stream), 8 steps through fit."""
    base = tiny_bert(dtype=torch.float64)
    opts = dict(rank=4, targets=QV, head=("classifier",), train_head=True)
    vn, vp = variants.create(native, **opts), variants.create(theirs, **opts)
    mn, mp = vn.apply(copy.deepcopy(base)), vp.apply(copy.deepcopy(base))
    ours = {n: p for n, p in mn.named_parameters() if p.requires_grad}
    their = {n: p for n, p in mp.named_parameters() if p.requires_grad}
    assert sorted(peft_name(n) for n in ours) == sorted(their)
    with torch.no_grad():  # the same init: their A := ours (B = 0 and the magnitude = ‖W0‖ in both already)
        for n, p in ours.items():
            their[peft_name(n)].copy_(p)
    assert vn.identity() == vp.identity()  # rank, alpha, scaling, targets: the same row name
    optim = OptimConfig(lr=2e-2, max_steps=8, batch_size=8, warmup_ratio=0.0)
    rn = fit(mn, vn, tiny_text_task(mn), optim, device="cpu", progress=False)
    rp = fit(mp, vp, tiny_text_task(mp), optim, device="cpu", progress=False)
    losses = torch.tensor([[h["loss"] for h in r["history"]] for r in (rn, rp)], dtype=torch.float64)
    torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=1e-10)
    assert losses[0, -1] < losses[0, 0] - 1e-3  # the weights did move
    for n, p in ours.items():
        torch.testing.assert_close(their[peft_name(n)], p, rtol=0, atol=1e-10)
    batch = token_batch()
    mn.eval(), mp.eval()
    torch.testing.assert_close(output_of(mp, batch), output_of(mn, batch), rtol=0, atol=1e-10)
    assert rn["metrics"] == rp["metrics"]
    assert rn["cost"]["trainable_params"] == rp["cost"]["trainable_params"]


# --- LoRA-FA: LoRA + peft's LoraFAOptimizer ------------------------------------------------------------

def test_lora_fa_is_peft_lorafa_optimizer_with_the_runs_adam_settings():
    from peft.optimizers import create_lorafa_optimizer
    from peft.optimizers.lorafa import LoraFAOptimizer

    def build():
        torch.manual_seed(0)
        v = variants.create("peft_lora_fa", rank=4, dropout=0.0, targets=QV)
        return v, v.apply(tiny_bert(dtype=torch.float64))

    (v, ours), (_, ref) = build(), build()
    a_init = {n: p.detach().clone() for n, p in ours.named_parameters() if "lora_A" in n}
    assert a_init and not any(p.requires_grad for n, p in ours.named_parameters() if "lora_A" in n)
    opt = v.optimizer(ours, lr=1e-2, weight_decay=0.01, eps=1e-6)  # peft's helper: eps 1e-6, betas fixed
    ref_opt = create_lorafa_optimizer(ref, r=4, lora_alpha=16, lr=1e-2, weight_decay=0.01)
    assert isinstance(opt, LoraFAOptimizer)
    batch = token_batch()
    for _ in range(3):
        for model, o in ((ours, opt), (ref, ref_opt)):
            o.zero_grad()
            model(**batch).loss.backward()
            o.step()
    ref_params = dict(ref.named_parameters())
    for n, p in ours.named_parameters():
        torch.testing.assert_close(p, ref_params[n], rtol=0, atol=0)
        if n in a_init:
            assert torch.equal(p, a_init[n])  # A never moves
    b = [p for n, p in ours.named_parameters() if "lora_B" in n]
    assert all(p.abs().sum() > 0 for p in b)
    # the run's optim.betas and optim.eps reach it, as they reach every other method's AdamW
    group = v.optimizer(ours, lr=1e-3, betas=(0.8, 0.99), eps=1e-8).param_groups[0]
    assert (group["betas"], group["eps"], group["lr"]) == ((0.8, 0.99), 1e-8, 1e-3)


# --- saving, merging, the head -------------------------------------------------------------------------

@pytest.mark.parametrize("name", METHODS)
def test_peft_loads_the_saved_adapter(name, tmp_path):
    base = tiny_bert(dtype=torch.float64)
    v = variants.create(name, rank=4, targets=QV, head=("classifier",), train_head=True)
    model = v.apply(copy.deepcopy(base))
    opt = v.optimizer(model, lr=1e-2)
    batch = token_batch()
    for _ in range(3):
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()
    nbytes = v.save_adapter(model, tmp_path)
    assert nbytes == v.cost(model)["adapter_bytes"] > 0
    assert json.loads((tmp_path / "lorabench_variant.json").read_text())["variant"] == name
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    model.eval()
    torch.testing.assert_close(output_of(loaded, batch), output_of(model, batch), rtol=0, atol=1e-12)
    assert not torch.allclose(output_of(model, batch), output_of(base, batch))  # it had trained


def test_merge_is_peft_merge_adapter_and_merge_and_unload_gives_the_plain_model():
    base = tiny_bert(dtype=torch.float64)
    v = variants.create("peft_vera", rank=4, targets=QV)
    model = v.apply(copy.deepcopy(base)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    batch = token_batch()
    unmerged = output_of(model, batch)
    v.merge(model)
    torch.testing.assert_close(output_of(model, batch), unmerged, rtol=0, atol=1e-10)
    plain = model.merge_and_unload()
    assert not any("vera" in n for n, _ in plain.named_parameters())
    torch.testing.assert_close(output_of(plain, batch), unmerged, rtol=0, atol=1e-10)


class Net(nn.Module):
    def __init__(self, pre: bool = False):
        super().__init__()
        self.fc1, self.classifier = nn.Linear(4, 4), nn.Linear(4, 2)
        if pre:
            self.pre_classifier = nn.Linear(4, 4)

    def forward(self, x):
        x = self.fc1(x)
        return self.classifier(self.pre_classifier(x) if hasattr(self, "pre_classifier") else x)


def test_exactly_the_head_trains_as_peft_modules_to_save_or_it_is_an_error(monkeypatch):
    v = variants.create("peft_lora", targets=["fc1"])
    model = v.apply(Net())
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n) == [
        f"base_model.model.classifier.modules_to_save.default.{p}" for p in ("bias", "weight")]
    assert v.peft_cfg.modules_to_save == ["classifier"]
    assert not variants.create("peft_lora", targets=["fc1"], train_head=False).apply(Net()).peft_config[
        "default"].modules_to_save
    # peft matches modules_to_save by plain suffix ("classifier" also takes "pre_classifier"): where that
    # would train more than the head, it is an error, never a silently larger contender
    monkeypatch.setattr(variants.peft_method, "head_module_names", lambda model, head: ["classifier"])
    with pytest.raises(VariantError, match=r"wrapped \['classifier', 'pre_classifier'\], the head is \['classifier'\]"):
        variants.create("peft_lora", targets=["fc1"]).apply(Net(pre=True))


def test_resolved_targets_reach_peft_exactly():
    """peft's list rule also takes a dotted suffix: the names go as a regex where the list would take more."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4)))  # modules "0", "1", "1.0"
    v = variants.create("peft_lora", rank=2, targets="0")  # a regex spec: module "0" only
    v.apply(model)
    assert v.target_modules == ["0"]
    v = variants.create("peft_lora", rank=2, config={"target_modules": ["0"]})  # peft's own spec wins, as given
    v.apply(nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4))))
    assert sorted(v.target_modules) == ["0", "1.0"]


# --- options: Hydra syntax, one-line errors, lazy import ----------------------------------------------

def test_any_peft_method_from_the_command_line(tmp_path):
    cfg = compose_config("variant=peft", "variant.method=vera", "variant.rank=64", "variant.config={d_initial:0.2}",
                         results_dir=tmp_path)
    _, v = check(cfg)
    assert type(v.peft_cfg).__name__ == "VeraConfig" and (v.peft_cfg.r, v.peft_cfg.d_initial) == (64, 0.2)
    _, v = check(compose_config("variant=peft", "variant.method=VeRA", "variant.config={r:32}", results_dir=tmp_path))
    assert v.rank == 32 and v.method == "vera"
    _, v = check(compose_config("variant=peft_lora", "+variant.config.init_lora_weights=gaussian",
                                "variant.scaling=rslora", results_dir=tmp_path))
    c = v.peft_cfg
    assert (c.r, c.lora_alpha, c.lora_dropout, c.use_rslora, c.init_lora_weights) == (8, 16, 0.05, True, "gaussian")
    _, v = check(compose_config("variant=peft", results_dir=tmp_path))  # peft's LoraConfig defaults
    assert (v.peft_cfg.r, v.peft_cfg.lora_alpha, v.peft_cfg.lora_dropout) == (8, 8, 0.0)


@pytest.mark.parametrize("overrides, fragment", [
    (["variant=peft", "variant.method=nope"], "invalid option method='nope': expected a peft method"),
    (["variant=peft", "variant.config={nope:1}"], "invalid option config.nope: peft's LoraConfig has no field 'nope'"),
    (["variant=peft_vera", "variant.config={lora_alpha:8}"], "VeraConfig has no field 'lora_alpha'"),
    (["variant=peft_lora", "variant.config={r:4}"], "invalid option config.r: set by variant.rank"),
    (["variant=peft_dora", "variant.config={use_dora:false}"], "invalid option config.use_dora: set by variant"),
    (["variant=peft_vera", "variant.method=miss"], "variant 'peft_vera' runs method 'vera'"),
    (["variant=peft", "variant.method=ia3", "variant.rank=4"], "invalid option rank=4: peft's IA3Config has no 'r'"),
    (["variant=peft", "variant.method=prompt_tuning"], "prompt-learning methods need a task-specific PeftModel"),
    (["variant=peft", "variant.method=adalora"], "not supported, its rank allocation"),
    (["variant=peft", "variant.config={modules_to_save:[fc1]}"], "config.modules_to_save: lorabench sets it"),
    (["variant=peft", "variant.config={r:0}"], "invalid option config.r=0"),
    (["variant=peft_lora_fa", "+variant.config.use_dora=true"], "LoRA-FA's optimizer supports plain LoRA"),
    (["variant=peft", "variant.config={lora_dropout:abc}"], "peft could not apply method 'lora'"),  # at build
])
def test_bad_options_raise_one_line_and_write_nothing(overrides, fragment, tmp_path):
    with pytest.raises(ConfigError) as err:
        run(compose_config(*overrides, *FAST, results_dir=tmp_path))
    assert fragment in str(err.value) and "\n" not in str(err.value)
    assert not any(tmp_path.iterdir())


def test_cli_bad_method_is_one_error_line_and_exit_2(tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled", "LORABENCH_NO_PROGRESS": "1"}
    out = subprocess.run([sys.executable, "-m", "experiments.train", "variant=peft", "variant.method=nope",
                          f"results_dir={tmp_path}", "logger=none"], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("error: invalid option method='nope': expected a peft method")


def test_peft_is_imported_only_by_the_peft_variants(monkeypatch):
    code = ("import sys; sys.path.insert(0, 'tests'); import variants, experiments.train; from tiny import tiny_bert\n"
            "for name in ('lora', 'dora', 'adalora', 'lora_plus', 'full'):\n"
            "    v = variants.create(name); v.optimizer(v.apply(tiny_bert()), lr=1e-3)\n"
            "assert 'peft' not in sys.modules, 'a native variant imported peft'\n"
            "variants.create('peft_vera'); assert 'peft' in sys.modules")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    monkeypatch.setitem(sys.modules, "peft", None)  # as if peft were not installed
    with pytest.raises(VariantError, match=r"^the peft variants need peft \(pip install") as err:
        variants.create("peft_vera")
    assert "\n" not in str(err.value)
