"""Side-by-side speed and memory benchmark: each of our methods against its reference implementation.

Contenders (``--methods`` picks methods; a method brings its reference):

| method | ours | reference |
|---|---|---|
| lora | ``variants.create("lora")`` | peft ``LoraConfig`` + ``get_peft_model``, ``torch.optim.AdamW`` |
| lora_plus | ``variants.create("lora_plus")`` | the peft LoRA model, ``peft.optimizers.create_loraplus_optimizer`` |
| dora | ``variants.create("dora")`` | peft ``LoraConfig(use_dora=True)`` |
| adalora | ``variants.create("adalora")`` (its hooks) | peft ``AdaLoraConfig``, ``update_and_allocate`` each step |
| galore | ``variants.create("galore")`` | ``galore_torch.GaLoreAdamW`` (same groups, rank, gap, scale) |
| full | ``variants.create("full")``: AdamW over every weight | – |
| head | ``variants.create("head")``: only the classifier trains | – |
| floor | nothing trains; the input embeddings' output requires grad, backward from the loss | – |
| trainer | our LoRA through ``experiments.trainer.fit`` (its ``step_time_median_ms``) | the bare loop, same model |

Everything runs on one model, one batch (random token ids) and one target list, in one process; the
contenders are interleaved (the order rotates every round), warm-up steps are not timed, and torch's CPU
threads are fixed (the trainer contender runs after the others, alternating with its own bare-loop twin).
A training step is forward + backward + optimizer step (+ the method's hooks), in the
trainer's order: ``loss = task loss + extra_loss``, backward, ``opt.step()``, ``after_step``,
``zero_grad``. Eval is a forward pass under ``inference_mode``, unmerged and merged where the method can
merge. Peak memory is measured with each contender alone in its own process (forked from a server that
has only imported the libraries), over the training window only (``trainer.PeakMemory``: VmHWM reset
through /proc/self/clear_refs on CPU, ``torch.cuda.max_memory_allocated`` on CUDA). Timings are
printed and saved (JSON + markdown under results/bench/), never asserted.

    python -m experiments.bench                          # MiniLM, CPU, 2 threads (`make bench`)
    python -m experiments.bench --workload smollm2       # SmolLM2-135M, batch 4 x 128, causal LM loss
    python -m experiments.bench --device cuda            # bf16 autocast on the GPU
    python -m experiments.bench --quick --workload tiny  # a seconds-long smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import importlib.metadata
import json
import math
import multiprocessing as mp
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import variants
from variants import optimizer_state_bytes

# --------------------------------------------------------------------------------------------- workloads

BERT_SIX = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    batch: int
    seq: int
    targets: object  # our target spec; the reference gets the module names it resolves to
    head: tuple[str, ...]
    train_head: bool
    causal_lm: bool  # labels = input_ids (the model shifts them) instead of class labels


WORKLOADS = {
    "minilm": Workload("minilm", "all-MiniLM-L6-v2 + a new 2-way classifier (task=sentiment's model)",
                       16, 64, BERT_SIX, ("classifier",), True, False),
    "smollm2": Workload("smollm2", "SmolLM2-135M-Instruct (make assets), causal LM loss", 4, 128, "all-linear",
                        ("lm_head",), False, True),
    "tiny": Workload("tiny", "a random 2-layer BERT (hidden 32) + 3-way classifier, for tests", 4, 16, BERT_SIX,
                     ("classifier",), True, False),
}


def load_base(workload: Workload) -> nn.Module:
    """The workload's model, float32, on the CPU. Each contender trains a copy in train mode (the base
    model's own dropout on, as in training; the warm-up steps seed it alike for every contender)."""
    torch.manual_seed(0)  # the new classifier head
    if workload.name == "minilm":
        from experiments.tasks.text_classification import load_model

        model = load_model("minilm", num_labels=2)
    elif workload.name == "smollm2":
        from experiments.tasks.causal_lm import SMOLLM2, load_model

        model = load_model(SMOLLM2, assets_dir=None)
    else:
        from transformers import BertConfig, BertForSequenceClassification

        cfg = BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=37, max_position_embeddings=64, num_labels=3,
                         problem_type="single_label_classification")  # as load_model: no recompile
        model = BertForSequenceClassification(cfg)
    return model.float().eval()


def make_batch(workload: Workload, model: nn.Module, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    ids = torch.randint(min(1000, vocab // 2), vocab, (workload.batch, workload.seq), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if workload.causal_lm:
        batch["labels"] = ids.clone()
    else:
        batch["labels"] = torch.randint(0, model.config.num_labels, (workload.batch,), generator=g)
    return {k: v.to(device) for k, v in batch.items()}


# --------------------------------------------------------------------------------------------- contenders

# key -> (label, method, implementation, the key it is compared with)
CONTENDERS = {
    "lora": ("ours LoRA", "lora", "ours", "peft-lora"),
    "peft-lora": ("peft LoRA", "lora", "peft", None),
    "lora_plus": ("ours LoRA+", "lora_plus", "ours", "peft-lora_plus"),
    "peft-lora_plus": ("peft LoRA+ (create_loraplus_optimizer)", "lora_plus", "peft", None),
    "dora": ("ours DoRA", "dora", "ours", "peft-dora"),
    "peft-dora": ("peft DoRA", "dora", "peft", None),
    "adalora": ("ours AdaLoRA", "adalora", "ours", "peft-adalora"),
    "peft-adalora": ("peft AdaLoRA (update_and_allocate)", "adalora", "peft", None),
    "galore": ("ours GaLore", "galore", "ours", "galore-torch"),
    "galore-torch": ("galore-torch GaLoreAdamW", "galore", "galore-torch", None),
    "full": ("full FT (AdamW, all weights)", "full", "ours", None),
    "head": ("head only", "head", "ours", None),
    "floor": ("frozen floor (grad to inputs only)", "floor", "torch", None),
    "trainer-lora": ("ours LoRA via trainer.fit", "trainer", "ours", None),  # against its own bare twin
    # --methods options: the run options, each against the same method without it
    "lora-ckpt": ("ours LoRA + gradient checkpointing", "options", "ours", "lora"),
    "lora-compile": ("ours LoRA, compile=true", "options", "ours", "lora"),
    "full-ckpt": ("full FT + gradient checkpointing", "options", "ours", "full"),
    "galore-layerwise": ("ours GaLore, layerwise=true", "options", "ours", "galore"),
    "galore-refresh": ("ours GaLore, SVD refresh every step (T=1)", "options", "ours", None),
    "galore-refresh-lowrank": ("ours GaLore, svd=lowrank refresh every step (T=1)", "options", "ours",
                               "galore-refresh"),
}
# option contender -> (method, variant options on top of the method's, gradient checkpointing, torch.compile)
OPTIONS = {"lora-ckpt": ("lora", {}, True, False), "lora-compile": ("lora", {}, False, True),
           "full-ckpt": ("full", {}, True, False), "galore-layerwise": ("galore", {"layerwise": True}, False, False),
           "galore-refresh": ("galore", {"update_proj_gap": 1}, False, False),
           "galore-refresh-lowrank": ("galore", {"update_proj_gap": 1, "svd": "lowrank"}, False, False)}
METHODS = ("lora", "lora_plus", "dora", "adalora", "galore", "full", "head", "floor", "trainer", "options")
# eval (forward only) of the adapted models, and of the plain model once (the floor's: full FT, head-only
# and GaLore models are the same plain model; LoRA+ is the LoRA model)
EVAL = ("lora", "peft-lora", "dora", "peft-dora", "adalora", "peft-adalora", "floor")
LR = 1e-4
# the goals: (contender, against, at most); "against" a contender key
GOALS = [("lora", "peft-lora", 0.95), ("lora", "floor", 1.10), ("dora", "lora", 1.10),
         ("adalora", "peft-adalora", 1.0), ("galore", "galore-torch", 0.95)]


def contender_keys(methods: list[str], workload: Workload | None = None) -> list[str]:
    """The contenders of ``methods`` (a head-only run needs a head that trains: not SmolLM2's tied one)."""
    skip = {"head"} if workload is not None and not workload.train_head else set()
    keys = [k for k, (_, method, _, _) in CONTENDERS.items() if method in methods and method not in skip]
    for k in list(keys):  # an option's row needs the row it is compared with
        ref = CONTENDERS[k][3]
        if CONTENDERS[k][1] == "options" and ref is not None and ref not in keys:
            keys.insert(keys.index(k), ref)
    return keys


def adalora_schedule(total_timed_steps: int) -> dict:
    """A run long enough that every bench step lies in AdaLoRA's budgeting phase (importance EMAs every
    step, a re-allocation every deltaT = 10 steps): the phase where its per-step hook costs the most."""
    total = 10 * (total_timed_steps + 100)
    return {"tinit": total // 10, "tfinal": total // 2, "deltaT": 10, "total": total}


class Contender:
    """A model, its optimizer and one training step; ``step()`` returns the loss tensor."""

    def __init__(self, key: str, model: nn.Module, step: Callable[[], torch.Tensor], opt=None, variant=None,
                 merge=None, unmerge=None):
        self.key, self.model, self._step, self.opt, self.variant = key, model, step, opt, variant
        self.merge, self.unmerge = merge, unmerge
        self.times: list[float] = []  # wall ms per step, one per round
        self.cpu_times: list[float] = []  # process CPU ms per step, one per round
        self.eval_times: dict[str, list[float]] = {"unmerged": [], "merged": []}
        self.warmup_losses: list[float] = []

    def step(self) -> torch.Tensor:
        return self._step()

    def train_round(self, n: int, device: torch.device) -> tuple[float, float | None]:
        """(wall ms, process CPU ms) per step over ``n`` steps. The CPU time (every thread of the process)
        is what a busy, shared machine disturbs least: time spent descheduled is not in it."""
        sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(n):
            self.step()
        sync(device)
        return (time.perf_counter() - t0) * 1000 / n, (time.process_time() - c0) * 1000 / n

    def eval_round(self, n: int, batch: dict, device: torch.device, autocast) -> float:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        self.model.eval()
        with torch.inference_mode(), autocast():
            sync(device)
            t0 = time.perf_counter()
            for _ in range(n):
                self.model(**inputs)
            sync(device)
            ms = (time.perf_counter() - t0) * 1000 / n
        self.model.train()
        return ms

    def trainable(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast_factory(device: torch.device, bf16: bool):
    def factory():
        if bf16 and device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    return factory


def build(key: str, base: nn.Module, batch: dict, workload: Workload, args, device: torch.device,
          copy_base: bool = True) -> Contender:
    """Contender ``key`` on (a copy of) ``base``, moved to ``device``."""
    model = copy.deepcopy(base) if copy_base else base
    autocast = _autocast_factory(device, args.bf16)
    _, method, impl, _ = CONTENDERS[key]
    r, alpha = args.rank, 2.0 * args.rank
    head = {"head": workload.head, "train_head": workload.train_head}
    sched = adalora_schedule(args.total_steps)

    if key == "floor":  # no weight trains; gradients flow from the loss back to the input embeddings
        model.requires_grad_(False)
        model.enable_input_require_grads()
        model.to(device).train()

        def floor_step():
            with autocast():
                loss = model(**batch).loss
            loss.backward()
            return loss.detach()

        return Contender(key, model, floor_step)

    if impl == "ours" and key != "trainer-lora":
        method, extra, checkpointing, compiled = OPTIONS.get(key, (method, {}, False, False))
        options = {"lora": {"rank": r, "alpha": alpha, "dropout": 0.0, "targets": workload.targets},
                   "galore": {"rank": r, "targets": workload.targets, "update_proj_gap": args.update_proj_gap,
                              "scale": args.galore_scale}}
        options["lora_plus"] = options["dora"] = options["lora"]
        options["adalora"] = {**options["lora"], "tinit": sched["tinit"], "tfinal": sched["tfinal"],
                              "deltaT": sched["deltaT"]}
        v = variants.create(method, **{**options.get(method, {}), **extra}, **head)
        model = v.apply(model).to(device).train()
        if checkpointing:  # what model.gradient_checkpointing=true does to a loaded model
            from experiments.hub import Loading

            Loading(gradient_checkpointing=True).prepare(model)
        opt = v.optimizer(model, lr=LR)
        counter = iter(range(sched["tinit"] + 1, sched["total"]))  # AdaLoRA's global step
        total = sched["total"]
        net = model
        if compiled:  # as the trainer's compile=true: the forward compiled, dropout drawn as in eager
            from torch._inductor import config as inductor

            inductor.fallback_random = True
            net = torch.compile(model)

        def our_step():  # experiments.trainer.fit's order
            with autocast():
                loss = net(**batch).loss + v.extra_loss(model)
            loss.backward()
            opt.step()
            v.after_step(model, next(counter), total)
            opt.zero_grad(set_to_none=True)
            return loss.detach()

        merge = (lambda: v.merge(model)) if v.mergeable else None
        unmerge = (lambda: v.unmerge(model)) if v.mergeable else None
        return Contender(key, model, our_step, opt, v, merge, unmerge)

    if key == "trainer-lora":
        return _trainer_contender(model, batch, workload, args, device)

    if impl == "galore-torch":
        import galore_torch

        v = variants.create("galore", rank=r, targets=workload.targets, **head)
        names = v.target_names(model)
        model.requires_grad_(True).to(device).train()
        projected = {id(model.get_submodule(n).weight) for n in names}
        plain = [p for p in model.parameters() if id(p) not in projected]
        weights = [model.get_submodule(n).weight for n in names]
        opt = galore_torch.GaLoreAdamW(
            [{"params": plain}, {"params": weights, "rank": r, "update_proj_gap": args.update_proj_gap,
                                 "scale": args.galore_scale, "proj_type": "std"}],
            lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, no_deprecation_warning=True)

        def galore_step():
            with autocast():
                loss = model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()

        return Contender(key, model, galore_step, opt)

    # peft: the module names our targets resolve to, so both wrap exactly the same layers
    import peft

    names = variants.create("lora", targets=workload.targets, **head).target_names(model)
    to_save = list(workload.head) if workload.train_head else None
    # task_type: PeftModelFor<Task>.forward goes through the tuner's forward, where AdaLoRA adds its
    # orthogonality penalty (a plain PeftModel calls the transformers model directly and skips it)
    task_type = "CAUSAL_LM" if workload.causal_lm else "SEQ_CLS"
    if method == "adalora":
        cfg = peft.AdaLoraConfig(target_modules=names, init_r=math.ceil(1.5 * r), target_r=r, lora_alpha=alpha,
                                 lora_dropout=0.0, tinit=sched["tinit"], tfinal=sched["tfinal"],
                                 deltaT=sched["deltaT"], total_step=sched["total"], beta1=0.85, beta2=0.85,
                                 orth_reg_weight=0.5, modules_to_save=to_save, task_type=task_type)
    else:
        cfg = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=names,
                              use_dora=method == "dora", modules_to_save=to_save, task_type=task_type)
    pm = peft.get_peft_model(model, cfg).to(device).train()
    if method == "lora_plus":
        from peft.optimizers import create_loraplus_optimizer

        opt = create_loraplus_optimizer(pm, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=16.0, weight_decay=0.0)
    else:
        opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    counter = iter(range(sched["tinit"] + 1, sched["total"]))

    def peft_step():
        with autocast():
            loss = pm(**batch).loss  # AdaLoRA: peft adds the orthogonality penalty inside forward
        loss.backward()
        opt.step()
        if method == "adalora":
            pm.base_model.update_and_allocate(next(counter))
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return Contender(key, pm, peft_step, opt, merge=pm.merge_adapter, unmerge=pm.unmerge_adapter)


def _trainer_contender(model: nn.Module, batch: dict, workload: Workload, args, device: torch.device) -> Contender:
    """Our LoRA trained by ``experiments.trainer.fit``, against the bare loop on the same model. A round is
    one ``fit`` call of n + 1 steps (``fit`` leaves its first step, which creates the optimizer state, out
    of ``step_time_median_ms``) and one bare-loop run of 1 untimed + n timed steps, in alternating order, so
    both time steps that follow a step of the same model. Constant lr and no gradient clipping: the
    arithmetic is the bare loop's, the rest is the trainer's (data loader, loss checks, scheduler...)."""
    from experiments.tasks import Task, TaskSpec
    from experiments.trainer import OptimConfig, fit

    v = variants.create("lora", rank=args.rank, alpha=2.0 * args.rank, dropout=0.0, targets=workload.targets,
                        head=workload.head, train_head=workload.train_head)
    model = v.apply(model).to(device).train()
    rows = [{k: t[i].cpu() for k, t in batch.items()} for i in range(workload.batch)]
    spec = TaskSpec(name="bench", build=lambda: None, metrics={"none": "max"}, main_metric="none",
                    head=workload.head, train_head=workload.train_head)
    task = Task(model=model, model_name=workload.name, train=rows, val=rows[:1], test=rows[:1],
                loss=lambda m, b: m(**b).loss, evaluate=lambda m, loader: {"none": 0.0},
                collate=lambda rs: {k: torch.stack([r[k] for r in rs]) for k in rs[0]}, spec=spec)
    autocast = _autocast_factory(device, args.bf16)
    opt = v.optimizer(model, lr=LR)

    def fit_ms(n: int) -> float:
        cfg = OptimConfig(lr=LR, schedule="constant", warmup_ratio=0.0, grad_clip=0.0, batch_size=workload.batch,
                          eval_batch_size=workload.batch, max_steps=n + 1, log_every=10**9)
        return fit(model, v, task, cfg, device=device, bf16=args.bf16, progress=False)["cost"]["step_time_median_ms"]

    def bare_step():
        with autocast():
            loss = model(**batch).loss + v.extra_loss(model)
        loss.backward()
        opt.step()
        v.after_step(model, 0, 1)
        opt.zero_grad(set_to_none=True)

    c = Contender("trainer-lora", model, lambda: fit_ms(1), variant=v)
    c.bare_times = []  # the twin: the bare loop on this model, timed like fit's steps

    def train_round(n: int, device: torch.device) -> tuple[float, None]:
        def bare():
            bare_step()
            sync(device)
            t0 = time.perf_counter()
            for _ in range(n):
                bare_step()
            sync(device)
            c.bare_times.append((time.perf_counter() - t0) * 1000 / n)

        if len(c.times) % 2:
            bare()
        ms = fit_ms(n)
        if not len(c.times) % 2:
            bare()
        return ms, None

    c.train_round = train_round
    return c


# --------------------------------------------------------------------------------------------- pairs


def _ref_name(name: str) -> str:
    """A peft parameter name as ours: base_model.model.X.lora_A.default.weight -> X.lora_A."""
    name = name.removeprefix("base_model.model.").replace(".modules_to_save.default", "").replace(".default", "")
    for p in ("lora_A", "lora_B", "lora_magnitude_vector"):
        if name.endswith(f".{p}.weight"):
            name = name[: -len(".weight")]
    return name


@torch.no_grad()
def align(ours: Contender, ref: Contender) -> bool:
    """Start ours from the reference's initial trainable tensors (peft draws its own A); True when both
    train exactly the same set of tensors (names and shapes)."""
    mine = {n: p for n, p in ours.model.named_parameters() if p.requires_grad}
    theirs = {_ref_name(n): p for n, p in ref.model.named_parameters() if p.requires_grad}
    same = mine.keys() == theirs.keys() and all(mine[n].shape == theirs[n].shape for n in mine)
    if same:
        for n, p in mine.items():
            p.copy_(theirs[n])
    return same


# --------------------------------------------------------------------------------------------- memory


def _memory_child(key: str, workload_name: str, args_dict: dict, queue) -> None:
    """In its own process: build one contender, then peak memory over a few training steps."""
    try:
        from experiments.trainer import PeakMemory

        warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecation notes via peft
        args = argparse.Namespace(**args_dict)
        torch.set_num_threads(args.threads)
        device = torch.device(args.device)
        workload = WORKLOADS[workload_name]
        base = load_base(workload)
        batch = make_batch(workload, base, device)
        c = build(key, base, batch, workload, args, device, copy_base=False)
        del base
        gc.collect()
        memory = PeakMemory(device)
        memory.switch("train")  # trims freed heap, resets VmHWM (CPU) / the allocator's peak (CUDA)
        start = _current_bytes(device)
        for _ in range(args.memory_steps):
            c.step()
        sync(device)
        memory.switch(None)
        queue.put({"key": key, "peak_bytes": memory.peaks["train"], "window_start_bytes": start})
    except Exception:  # noqa: BLE001 - reported in the parent, the bench goes on
        queue.put({"key": key, "error": traceback.format_exc(limit=4)})


def _current_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def measure_memory(keys: list[str], workload: Workload, args) -> dict[str, dict]:
    """Peak memory of each contender, each in its own process (forkserver: imports paid once)."""
    methods = mp.get_all_start_methods()
    ctx = mp.get_context("forkserver" if "forkserver" in methods else "spawn")
    if ctx.get_start_method() == "forkserver":
        family = {"smollm2": "llama"}.get(workload.name, "bert")
        ctx.set_forkserver_preload(["torch", "transformers", f"transformers.models.{family}.modeling_{family}", "peft",
                                    "peft.tuners.lora", "peft.tuners.adalora", "galore_torch", "variants",
                                    "experiments.trainer", "experiments.tasks"])
    me = importlib.import_module("experiments.bench")  # a target importable by name, even under `-m`
    out = {}
    for key in keys:
        if key == "trainer-lora":
            continue
        queue = ctx.Queue()
        proc = ctx.Process(target=me._memory_child, args=(key, workload.name, vars(args), queue))
        t0 = time.perf_counter()
        proc.start()
        try:
            result = queue.get(timeout=args.memory_timeout)
        except Exception:  # noqa: BLE001 - a dead or hung child
            result = {"key": key, "error": f"no result within {args.memory_timeout} s (exit code {proc.exitcode})"}
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
        out[key] = result
        print(f"[bench] memory {key}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        if "error" in result:
            print(f"[bench] memory run of {key} failed: {result['error']}", file=sys.stderr)
    return out


# --------------------------------------------------------------------------------------------- timing


def rotate(items: list, r: int) -> list:
    k = r % len(items)
    return items[k:] + items[:k]


def run(args, workload: Workload, keys: list[str], log=print) -> dict:
    device = torch.device(args.device)
    autocast = _autocast_factory(device, args.bf16)
    base = load_base(workload)
    batch = make_batch(workload, base, device)
    t_build = time.perf_counter()
    contenders = {k: build(k, base, batch, workload, args, device) for k in keys}
    del base
    aligned = {}
    for k, c in contenders.items():
        ref = CONTENDERS[k][3]
        if ref in contenders and CONTENDERS[k][1] != "trainer":
            aligned[k] = align(c, contenders[ref])
    log(f"[bench] built {len(contenders)} contenders in {time.perf_counter() - t_build:.1f} s")

    for c in contenders.values():  # warm-up (untimed): allocations, optimizer state, lazy inits
        for i in range(args.warmup):
            torch.manual_seed(i)  # the same dropout masks of the base model for every contender
            loss = c.step()
            if torch.is_tensor(loss):
                c.warmup_losses.append(float(loss))
    # the trainer runs apart, against its own bare-loop twin: fit() hands freed heap back to the system
    # (malloc_trim, at each memory window), which would make whichever contender follows it pay page faults
    order = [k for k in contenders if k != "trainer-lora"]
    t0 = time.perf_counter()
    for r in range(args.rounds):
        for k in rotate(order, r):
            wall, cpu = contenders[k].train_round(args.repeats, device)
            contenders[k].times.append(wall)
            if cpu is not None:
                contenders[k].cpu_times.append(cpu)
    log(f"[bench] training: {args.rounds} rounds x {args.repeats} steps in {time.perf_counter() - t0:.1f} s")
    if "trainer-lora" in contenders:
        t0 = time.perf_counter()
        trainer = contenders["trainer-lora"]
        for _ in range(args.rounds):
            trainer.times.append(trainer.train_round(args.repeats, device)[0])
        log(f"[bench] trainer.fit vs its bare twin: {args.rounds} rounds in {time.perf_counter() - t0:.1f} s")

    evals = [(k, mode) for k in order if k in EVAL for mode in ("unmerged", "merged")
             if mode == "unmerged" or contenders[k].merge is not None]
    t0 = time.perf_counter()
    for k, mode in evals:  # warm-up
        _eval(contenders[k], mode, 1, batch, device, autocast)
    for r in range(args.rounds):
        for k, mode in rotate(evals, r):
            contenders[k].eval_times[mode].append(_eval(contenders[k], mode, args.eval_repeats, batch, device,
                                                        autocast))
    log(f"[bench] eval: {args.rounds} rounds x {args.eval_repeats} forwards in {time.perf_counter() - t0:.1f} s")
    return {"contenders": contenders, "aligned": aligned}


def _eval(c: Contender, mode: str, n: int, batch: dict, device, autocast) -> float:
    if mode == "merged":
        c.merge()
    try:
        return c.eval_round(n, batch, device, autocast)
    finally:
        if mode == "merged":
            c.unmerge()


# --------------------------------------------------------------------------------------------- report


def spread(xs: list[float]) -> dict:
    if not xs:
        return {"median": None, "q1": None, "q3": None, "min": None, "max": None, "n": 0}
    q = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else [xs[0]] * 3
    return {"median": statistics.median(xs), "q1": q[0], "q3": q[2], "min": min(xs), "max": max(xs), "n": len(xs)}


def _ratio(a, b):
    return None if a is None or b in (None, 0) else a / b


def rows_of(result: dict, memory: dict) -> list[dict]:
    cs = result["contenders"]
    med = {k: spread(c.times)["median"] for k, c in cs.items()}
    cpu = {k: spread(c.cpu_times)["median"] for k, c in cs.items()}
    rows = []
    for k, c in cs.items():
        label, method, impl, ref = CONTENDERS[k]
        ref = ref if ref in cs else None
        step, step_cpu = spread(c.times), spread(c.cpu_times)
        mem = memory.get(k, {})
        row = {
            "key": k, "contender": label, "method": method, "impl": impl, "reference": ref,
            "step_ms": step, "step_cpu_ms": step_cpu, "step_ms_rounds": c.times, "step_cpu_ms_rounds": c.cpu_times,
            "vs_reference": _ratio(step["median"], med.get(ref)),
            "vs_reference_paired": spread(paired(c.times, cs[ref].times)) if ref else None,
            "vs_reference_cpu": _ratio(step_cpu["median"], cpu.get(ref)),
            "vs_floor": _ratio(step["median"], med.get("floor")) if k != "floor" else None,
            "vs_full": _ratio(step["median"], med.get("full")) if k != "full" else None,
            "eval_ms": spread(c.eval_times["unmerged"]) if c.eval_times["unmerged"] else None,
            "eval_merged_ms": spread(c.eval_times["merged"]) if c.eval_times["merged"] else None,
            "peak_memory_bytes": mem.get("peak_bytes"),
            "window_start_bytes": mem.get("window_start_bytes"),
            "memory_error": mem.get("error"),
            "optimizer_state_bytes": optimizer_state_bytes(c.opt) if c.opt is not None else 0,
            "trainable_params": c.trainable(),
            "warmup_losses": c.warmup_losses,
        }
        if ref and method != "trainer":
            row["same_trainable_tensors"] = result["aligned"].get(k)
            row["trainable_params_reference"] = cs[ref].trainable()
            theirs = cs[ref].warmup_losses
            row["warmup_loss_max_abs_diff"] = (max(abs(a - b) for a, b in zip(c.warmup_losses, theirs, strict=True))
                                               if theirs else None)
        if k == "trainer-lora":  # the trainer's overhead: fit against the bare loop on the same model
            row.update(reference="bare loop", vs_reference=_ratio(step["median"], spread(c.bare_times)["median"]),
                       vs_reference_paired=spread(paired(c.times, c.bare_times)), bare_loop_ms=spread(c.bare_times))
        rows.append(row)
    for row in rows:  # memory against the reference
        peak_ref = next((r["peak_memory_bytes"] for r in rows if r["key"] == row["reference"]), None)
        row["peak_vs_reference"] = _ratio(row["peak_memory_bytes"], peak_ref)
    return rows


def paired(a: list[float], b: list[float]) -> list[float]:
    """Per-round ratios: both sides of a round ran back to back, so a slow spell of the machine cancels."""
    return [x / y for x, y in zip(a, b, strict=False) if y]


def goals_of(rows: list[dict]) -> list[dict]:
    by = {r["key"]: r for r in rows}
    out = []
    for key, against, limit in GOALS:
        if key in by and against in by:
            a, b = by[key], by[against]
            ratio = _ratio(a["step_ms"]["median"], b["step_ms"]["median"])
            pr = spread(paired(a["step_ms_rounds"], b["step_ms_rounds"]))
            out.append({"contender": key, "against": against, "limit": limit, "ratio": ratio,
                        "paired_min": pr["min"], "paired_max": pr["max"],
                        "ratio_cpu": _ratio(a["step_cpu_ms"]["median"], b["step_cpu_ms"]["median"]),
                        "met": ratio is not None and ratio <= limit})
    return out


def header(args, workload: Workload, argv: list[str]) -> dict:
    def version(dist):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    def git(*cmd):
        try:
            return subprocess.run(["git", *cmd], capture_output=True, text=True, timeout=10,
                                  cwd=Path(__file__).resolve().parent).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    device = torch.device(args.device)
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(["python -m experiments.bench", *argv]),
        "git_commit": git("rev-parse", "--short", "HEAD").strip() or None,
        "git_dirty": sorted(line[3:] for line in dirty.splitlines() if line.strip()),  # tracked files changed
        "machine": {"cpu": cpu, "cores": os.cpu_count(),
                    "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
                    "threads": torch.get_num_threads(), "device": args.device,
                    "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": version("transformers"), "peft": version("peft"),
                     "galore-torch": version("galore-torch")},
        "workload": {"name": workload.name, "description": workload.description, "batch": workload.batch,
                     "seq": workload.seq, "targets": workload.targets, "rank": args.rank, "alpha": 2.0 * args.rank,
                     "dropout": 0.0, "lr": LR, "precision": "bf16 autocast" if args.bf16 and device.type == "cuda"
                     else "float32"},
        "protocol": {"rounds": args.rounds, "repeats": args.repeats, "warmup": args.warmup,
                     "eval_repeats": args.eval_repeats, "memory_steps": args.memory_steps,
                     "update_proj_gap": args.update_proj_gap, "galore_scale": args.galore_scale,
                     "adalora_schedule": adalora_schedule(args.total_steps)},
    }


def _f(x, fmt="{:.1f}"):
    return "–" if x is None else fmt.format(x)


def _x(x):
    return "–" if x is None else f"{x:.2f}x"


def _mib(x):
    return "–" if x is None else f"{x / 2**20:,.0f}"


def markdown(report: dict) -> str:
    h, rows = report["header"], report["rows"]
    m, v, w, p = h["machine"], h["versions"], h["workload"], h["protocol"]
    commit = h["git_commit"] or "?"
    if h["git_dirty"]:
        commit += f" plus uncommitted {', '.join(h['git_dirty'])}"
    lines = [
        f"# bench: {w['name']} on {m['device']}", "",
        f"- date {h['date']}; commit {commit}; `{h['command']}`",
        f"- machine: {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), torch threads {m['threads']}"
        + (f", GPU {m['gpu']}" if m["gpu"] else ""),
        f"- versions: python {v['python']}, torch {v['torch']}, transformers {v['transformers']}, peft {v['peft']}, "
        f"galore-torch {v['galore-torch']}",
        f"- workload: {w['description']}; batch {w['batch']} x {w['seq']} tokens (random ids), {w['precision']}; "
        f"rank {w['rank']}, alpha {w['alpha']:g}, dropout 0, lr {w['lr']:g}; targets {w['targets']}",
        f"- protocol: {p['warmup']} warm-up steps, then {p['rounds']} interleaved rounds (order rotated) of "
        f"{p['repeats']} steps / {p['eval_repeats']} forwards; time = median over rounds of the round's mean; "
        f"peak memory: each contender alone in its own process, {p['memory_steps']} steps",
        "",
        "| contender | step ms (median) | IQR | min–max | ours / ref (paired min–max) | / floor | / full FT "
        "| CPU ms/step | ours / ref (CPU) | eval ms | eval merged ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        s, c = r["step_ms"], r["step_cpu_ms"]
        ref = "ref" if any(o["reference"] == r["key"] and o["method"] != "trainer" for o in rows) else "–"
        ref_cpu = ref if r["vs_reference_cpu"] is None else _x(r["vs_reference_cpu"])
        if r["vs_reference"] is not None:
            pr = r["vs_reference_paired"]
            ref = f"{_x(r['vs_reference'])} ({pr['min']:.2f}–{pr['max']:.2f})"
        ev, em = r["eval_ms"], r["eval_merged_ms"]
        lines.append(f"| {r['contender']} | {_f(s['median'])} | {_f(s['q1'])}–{_f(s['q3'])} | {_f(s['min'])}–"
                     f"{_f(s['max'])} | {ref} | {_x(r['vs_floor'])} | {_x(r['vs_full'])} | {_f(c['median'])} | "
                     f"{ref_cpu} | {_f(ev and ev['median'])} | {_f(em and em['median'])} |")
    lines += ["", "Eval: forward only, `inference_mode`; the floor's row is the plain model (what full FT, "
              "head-only and GaLore models run, and what a merged adapter can at best reach)."]
    lines += ["", "| contender | peak MiB (train window) | Δ in window MiB | peak / ref | optimizer state MiB "
              "| trainable params | same tensors as ref | warm-up loss Δ vs ref |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        peak, start = r["peak_memory_bytes"], r["window_start_bytes"]
        delta = None if peak is None or start is None else peak - start
        same = r.get("same_trainable_tensors")
        same = "–" if same is None else ("yes" if same and r["trainable_params"] == r["trainable_params_reference"]
                                         else "NO")
        dl = r.get("warmup_loss_max_abs_diff")
        lines.append(f"| {r['contender']} | {_mib(peak)} | {_mib(delta)} | {_x(r['peak_vs_reference'])} | "
                     f"{r['optimizer_state_bytes'] / 2**20:,.2f} | {r['trainable_params']:,} | {same} | "
                     f"{'–' if dl is None else f'{dl:.1e}'} |")
    if report["goals"]:
        lines += ["", "| goal (step time) | measured (median / median) | paired per round min–max | CPU time "
                      "ratio | met |", "|---|---:|---:|---:|---|"]
        names = {r["key"]: r["contender"] for r in rows}
        for g in report["goals"]:
            lines.append(f"| {names[g['contender']]} ≤ {g['limit']:.2f} x {names[g['against']]} | "
                         f"{_x(g['ratio'])} | {_f(g['paired_min'], '{:.2f}')}–{_f(g['paired_max'], '{:.2f}')} | "
                         f"{_x(g['ratio_cpu'])} | {'yes' if g['met'] else 'no'} |")
    trainer = next((r for r in rows if r["key"] == "trainer-lora"), None)
    if trainer and trainer["vs_reference"] is not None:
        pr = trainer["vs_reference_paired"]
        lines += ["", f"Trainer overhead: ours LoRA through `experiments.trainer.fit` (its step_time_median_ms; "
                      f"constant lr, no clipping) {_f(trainer['step_ms']['median'])} ms against the bare loop on the "
                      f"same model {_f(trainer['bare_loop_ms']['median'])} ms per step: {_x(trainer['vs_reference'])} "
                      f"(paired per round {pr['min']:.2f}–{pr['max']:.2f})."]
    lines += ["", f"Wall time {report['seconds']:.0f} s."]
    return "\n".join(lines)


def _step_cell(r: dict) -> str:
    s = r["step_ms"]
    return f"{_f(s['median'], '{:.0f}')} ({_f(s['q1'], '{:.0f}')}–{_f(s['q3'], '{:.0f}')})"


def _ratio_cell(x) -> str:
    return _x(x).removesuffix("x")


def _delta_cell(r: dict) -> str:
    p, w = r["peak_memory_bytes"], r["window_start_bytes"]
    return _mib(None if p is None or w is None else p - w)


def _median_cell(spread_or_none) -> str:
    return _f(spread_or_none and spread_or_none["median"], "{:.0f}")


def combined_markdown(reports: list[dict], names: list[str]) -> str:
    """Several runs of the same bench side by side (``--combine a.json b.json``): one cell per run, "a / b"."""
    referenced = {r["reference"] for rep in reports for r in rep["rows"] if r["method"] != "trainer"}

    def cells(key, get):
        out = []
        for rep in reports:
            r = next((x for x in rep["rows"] if x["key"] == key), None)
            out.append("–" if r is None else get(r))
        return " / ".join(out)

    def vs_ref(r):
        return _ratio_cell(r["vs_reference"]) if r["vs_reference"] is not None else (
            "ref" if r["key"] in referenced else "–")

    keys = list(dict.fromkeys(r["key"] for rep in reports for r in rep["rows"]))
    label = {r["key"]: r["contender"] for rep in reports for r in rep["rows"]}
    runs = " / ".join(names)
    lines = [f"| contender | step ms, {runs} (IQR) | vs ref | / floor | / full FT | eval ms | eval merged ms |",
             "|---|---|---|---|---|---|---|"]
    for k in keys:
        lines.append(f"| {label[k]} | {cells(k, _step_cell)} | {cells(k, vs_ref)} | "
                     f"{cells(k, lambda r: _ratio_cell(r['vs_floor']))} | "
                     f"{cells(k, lambda r: _ratio_cell(r['vs_full']))} | "
                     f"{cells(k, lambda r: _median_cell(r['eval_ms']))} | "
                     f"{cells(k, lambda r: _median_cell(r['eval_merged_ms']))} |")
    lines += ["", f"| contender | peak MiB (train window), {runs} | Δ in window MiB | peak / ref | optimizer state MiB "
                  "| trainable params |", "|---|---|---|---|---:|---:|"]
    for k in keys:
        first = next(r for rep in reports for r in rep["rows"] if r["key"] == k)
        lines.append(f"| {label[k]} | {cells(k, lambda r: _mib(r['peak_memory_bytes']))} | {cells(k, _delta_cell)} | "
                     f"{cells(k, lambda r: _ratio_cell(r['peak_vs_reference']))} | "
                     f"{first['optimizer_state_bytes'] / 2**20:,.2f} | {first['trainable_params']:,} |")
    goals = list(dict.fromkeys((g["contender"], g["against"], g["limit"]) for rep in reports for g in rep["goals"]))
    if goals:
        lines += ["", f"| goal (step time) | {' | '.join(names)} | met |", "|---|" + "---|" * len(names) + "---|"]
        for c, a, limit in goals:
            got = [next((g for g in rep["goals"] if (g["contender"], g["against"]) == (c, a)), None) for rep in reports]
            txt = ["–" if g is None else f"{_x(g['ratio'])} (paired {g['paired_min']:.2f}–{g['paired_max']:.2f})"
                   for g in got]
            met = [g is not None and g["met"] for g in got]
            verdict = "yes" if all(met) else "no" if not any(met) else "in " + " and ".join(
                n for n, m in zip(names, met, strict=True) if m)
            lines.append(f"| {label.get(c, c)} ≤ {limit:.2f} x {label.get(a, a)} | {' | '.join(txt)} | {verdict} |")
    trainer = [next((r for r in rep["rows"] if r["key"] == "trainer-lora"), None) for rep in reports]
    if all(t is not None and t.get("bare_loop_ms") for t in trainer):
        parts = [f"{_x(t['vs_reference'])} ({_median_cell(t['step_ms'])} vs {_median_cell(t['bare_loop_ms'])} ms, "
                 f"paired {t['vs_reference_paired']['min']:.2f}–{t['vs_reference_paired']['max']:.2f})"
                 for t in trainer]
        lines += ["", "Trainer overhead (fit / bare loop, same model): " + " / ".join(parts)]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- main


def parse(argv: list[str] | None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--workload", default="minilm", choices=sorted(WORKLOADS))
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (CPU)")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated, each with its reference: {', '.join(METHODS)}")
    p.add_argument("--rounds", type=int, default=10, help="interleaved timed rounds (median and spread over them)")
    p.add_argument("--repeats", type=int, default=1, help="training steps per contender per round")
    p.add_argument("--eval-repeats", type=int, default=1, help="forward passes per contender and mode per round")
    p.add_argument("--warmup", type=int, default=1, help="untimed training steps per contender first")
    p.add_argument("--memory-steps", type=int, default=2, help="training steps in each memory process")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the per-process memory runs")
    p.add_argument("--memory-timeout", type=float, default=600.0, help="seconds per memory process")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--update-proj-gap", type=int, default=200, help="GaLore's T (ours and galore-torch)")
    p.add_argument("--galore-scale", type=float, default=4.0, help="GaLore's alpha (ours and galore-torch)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on for CUDA; CPU runs float32)")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 rounds, 1 step / forward each, 1 warm-up step")
    p.add_argument("--out", default="results/bench", help="folder for <workload>-<device>.json and .md")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.repeats, args.eval_repeats, args.warmup, args.memory_steps = 2, 1, 1, 1, 2
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        p.error(f"--methods: unknown {bad or 'nothing'}; expected some of {', '.join(METHODS)}")
    for name in ("rounds", "repeats", "eval_repeats", "warmup", "memory_steps", "threads", "rank"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        p.error(f"--device {args.device!r}: expected cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available here")
    if device.type not in ("cpu", "cuda"):
        p.error("--device: cpu or cuda")
    if args.bf16 is None:
        args.bf16 = device.type == "cuda"
    args.methods = methods
    args.total_steps = args.warmup + args.rounds * args.repeats + args.memory_steps
    return args


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--combine"]:  # python -m experiments.bench --combine run1.json run2.json: side by side
        reports = [json.loads(Path(p).read_text()) for p in argv[1:]]
        print(combined_markdown(reports, [f"run {i + 1}" for i in range(len(reports))]))
        return {"combined": len(reports)}
    args = parse(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecation notes via peft
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    workload = WORKLOADS[args.workload]
    keys = contender_keys(args.methods, workload)
    t0 = time.perf_counter()
    head = header(args, workload, argv)
    # memory first: the children are alone on the machine, and the timing below is not disturbed by them
    memory = measure_memory(keys, workload, args) if args.memory else {}
    if args.memory:
        print(f"[bench] memory: {len(memory)} processes in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    result = run(args, workload, keys, log=lambda s: print(s, file=sys.stderr))
    rows = rows_of(result, memory)
    report = {"schema": 1, "header": head, "rows": rows, "goals": goals_of(rows),
              "seconds": time.perf_counter() - t0}
    md = markdown(report)
    print(md)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{workload.name}-{torch.device(args.device).type}"
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1, default=str))
    (out / f"{stem}.md").write_text(md + "\n")
    print(f"\nwrote {out / stem}.json and .md", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
