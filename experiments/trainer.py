"""The one training loop every variant shares. It knows the variant *interface*, never a method's name.

    task -> model -> variant.apply -> variant.optimizer -> loop(loss + variant.extra_loss,
            backward, clip, optimizer.step, scheduler.step, variant.after_step, zero_grad) -> eval
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from experiments.resume import SIGNALS, Checkpoint, Interrupted, deferred
from experiments.snapshots import Snapshots
from variants import Variant

if TYPE_CHECKING:
    from experiments.tasks import Task


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or inf; the run stops and its record says at which step."""

    def __init__(self, step: int, value: float):
        super().__init__(f"non-finite loss {value} at step {step}")
        self.step = step


@dataclass
class OptimConfig:
    lr: float = 5e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    schedule: str = "linear"  # constant | linear | cosine (after warmup)
    warmup_ratio: float = 0.06
    grad_clip: float = 1.0  # 0 disables
    grad_accum: int = 1
    batch_size: int = 16
    eval_batch_size: int = 64
    max_steps: int = 0  # > 0 wins over epochs
    epochs: float = 1.0
    eval_every: int = 0  # 0: evaluate at the end only
    select_best: bool = False  # restore the trainable weights of the best validation evaluation
    log_every: int = 10

    def validate(self) -> None:
        def need(ok, name, expected):
            if not ok:
                raise ValueError(f"invalid option optim.{name}={getattr(self, name)!r}: expected {expected}")

        def number(x) -> bool:
            return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

        def integer(x) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        need(number(self.lr) and self.lr > 0, "lr", "a positive number (or, in a config, a map variant: lr)")
        need(number(self.weight_decay) and self.weight_decay >= 0, "weight_decay", "a number >= 0")
        betas = tuple(self.betas) if isinstance(self.betas, (list, tuple)) else ()
        need(len(betas) == 2 and all(number(b) and 0 <= b < 1 for b in betas), "betas", "two numbers in [0, 1)")
        need(number(self.eps) and self.eps > 0, "eps", "a positive number")
        need(self.schedule in ("constant", "linear", "cosine"), "schedule", "constant, linear or cosine")
        need(number(self.warmup_ratio) and 0 <= self.warmup_ratio < 1, "warmup_ratio", "in [0, 1)")
        need(number(self.grad_clip) and self.grad_clip >= 0, "grad_clip", "a number >= 0 (0: no clipping)")
        for name in ("grad_accum", "batch_size", "eval_batch_size", "log_every"):
            need(integer(getattr(self, name)) and getattr(self, name) >= 1, name, "an integer >= 1")
        for name in ("max_steps", "eval_every"):
            need(integer(getattr(self, name)) and getattr(self, name) >= 0, name, "an integer >= 0 (0: off)")
        need(number(self.epochs) and self.epochs >= 0, "epochs", "a number >= 0")
        need(self.max_steps > 0 or self.epochs > 0, "max_steps", "> 0 (or epochs > 0)")
        need(isinstance(self.select_best, bool), "select_best", "true or false")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def stream_seed(seed: int, purpose: str) -> int:
    """The seed of one of a run's independent random streams (SeedSequence of the run seed and the purpose).

    Every consumer of randomness draws from its own stream: the task's new weights (``"model"``), the
    adapter init (``"adapter"``), the data order (``"data"``) and dropout (``"train"``). Drawn from one
    shared state, a new classifier head and the first adapter matrices were the same random numbers seen
    through two transforms (correlation about -0.35 at every seed), and so was the data order.
    """
    return int(np.random.SeedSequence([seed, *purpose.encode()]).generate_state(1, np.uint64)[0] >> 1)


def reseed(seed: int, purpose: str) -> None:
    """Point torch's global generators (CPU and CUDA) at the ``purpose`` stream of run ``seed``."""
    torch.manual_seed(stream_seed(seed, purpose))


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` (CUDA when there is one), ``cpu``, ``cuda``, ``cuda:<i>`` or ``mps``; one ValueError line for a
    name torch does not know or a device this machine does not have."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"invalid option device={name!r}: expected auto, cpu, cuda, cuda:<index> or mps") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        have = f"{torch.cuda.device_count()} CUDA device(s)" if torch.cuda.is_available() else "no CUDA device"
        raise ValueError(f"invalid option device={name!r}: this machine has {have} (device=auto or cpu)")
    if device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"invalid option device={name!r}: MPS is not available here (device=auto or cpu)")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"invalid option device={name!r}: expected auto, cpu, cuda, cuda:<index> or mps")
    return device


def lr_lambda(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return 1.0

    return f


def total_steps(cfg: OptimConfig, n_train: int) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    per_epoch = math.ceil(n_train / (cfg.batch_size * cfg.grad_accum))
    return max(1, math.ceil(cfg.epochs * per_epoch))


class _Batches:
    """Training batches, epochs back to back; the loader's seeded generator makes the order reproducible.
    ``state()`` is the generator at the epoch's start and the batches drawn since, enough to resume the
    exact order (``restore`` replays the epoch's first batches)."""

    def __init__(self, loader: DataLoader, gen: torch.Generator):
        self.loader, self.gen, self.it, self.epoch_start, self.index = loader, gen, None, None, 0

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        if self.it is None:
            self.epoch_start, self.it, self.index = self.gen.get_state(), iter(self.loader), 0
        try:
            batch = next(self.it)
        except StopIteration:
            self.it = None
            return next(self)
        self.index += 1
        return batch

    def state(self) -> dict:
        return {"epoch_start": self.epoch_start, "index": self.index}

    def restore(self, state: dict) -> None:
        if state["epoch_start"] is None:
            return
        self.gen.set_state(state["epoch_start"])
        self.epoch_start, self.it = state["epoch_start"], iter(self.loader)
        for _ in range(state["index"]):
            next(self.it)
        self.index = state["index"]


def to_device(batch, device):
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch.to(device, non_blocking=True) if torch.is_tensor(batch) else batch


def reset_peak_memory(device: torch.device) -> None:
    """Start a run's peak-memory window. On CUDA the allocator's peak; on Linux the process's peak RSS
    (VmHWM, reset by writing 5 to /proc/self/clear_refs), so runs sharing a process (a multirun with the
    basic launcher) each get their own peak instead of the process's lifetime maximum."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # not Linux, or not permitted: fall back to the lifetime peak
        pass


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:  # peak resident set of this process (Linux reports KiB)
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    except Exception:  # pragma: no cover - non-POSIX
        return 0


def release_freed_memory(device: torch.device) -> None:
    """Hand memory that is free but still held back to the system, so that the next peak window starts
    from what is really in use: glibc keeps freed heap pages in the process (``malloc_trim`` returns them);
    CUDA's caching allocator does not matter (its peak counts allocated bytes, not reserved ones)."""
    if device.type == "cuda":
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class PeakMemory:
    """Peak memory per phase: ``switch("train")`` closes the open window, records its peak under its
    name (the maximum over all windows of that name) and opens a new one. A run's training windows are
    the optimisation steps only (model, data and optimizer already exist); evaluations, mid-run or final,
    are their own ``eval`` windows, so a large evaluation batch never shows up as a training cost."""

    def __init__(self, device: torch.device):
        self.device, self.current, self.peaks = device, None, {}

    def switch(self, name: str | None) -> None:
        if self.current is not None:
            peak = peak_memory_bytes(self.device)
            self.peaks[self.current] = max(self.peaks.get(self.current, 0), peak)
        self.current = name
        if name is not None:  # a window starts from the memory in use, not what earlier work left cached
            release_freed_memory(self.device)
            reset_peak_memory(self.device)


# torch.profiler's memory categories, in the column order of its exported timeline (after a leading 0)
PROFILE_CATEGORIES = ("parameter", "optimizer_state", "input", "temporary", "activation", "gradient",
                      "autograd_detail", "unknown")


class TensorMemoryProfile:
    """One training step under torch.profiler's memory profiler (started on construction, read by ``stop``):
    the peak of the bytes held by the tensors the step touches — parameters, optimizer state, gradients,
    activations... — and what they are at that peak. It counts tensors, not what the allocator keeps, so on
    CPU it sees what a resident-set peak cannot (freed heap that the C allocator holds on to)."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device.type, torch.cuda.current_device() if device.type == "cuda"
                                   and device.index is None else device.index)
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        self.prof = profile(activities=activities, profile_memory=True, record_shapes=True, with_stack=True)
        self.prof.start()

    def stop(self) -> dict:
        """{"peak_bytes", "at_peak": {category: bytes}, "max": {category: the most it held during the step}}."""
        self.prof.stop()
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # the export is deprecated for CUDA's snapshots
            path = Path(tmp) / "timeline.json"
            self.prof.export_memory_timeline(str(path), device=str(self.device))
            _, sizes = json.loads(path.read_text())
        columns = [row[1:] for row in sizes] or [[0] * len(PROFILE_CATEGORIES)]
        peak = max(columns, key=sum)
        return {"peak_bytes": int(sum(peak)), "at_peak": dict(zip(PROFILE_CATEGORIES, map(int, peak), strict=True)),
                "max": {c: int(max(col[i] for col in columns)) for i, c in enumerate(PROFILE_CATEGORIES)}}


def fit(model: nn.Module, variant: Variant, data: Task, cfg: OptimConfig, *, seed: int = 0,
        device: str | torch.device = "auto", bf16: bool = False, progress: bool | None = None,
        log: Callable[[dict, int], None] | None = None, checkpoint: Checkpoint | None = None,
        eval_merged: bool = False, compile: bool = False, snapshots: Snapshots | None = None,
        profile_memory: int = 0) -> dict:
    """Train ``model`` (already adapted by ``variant``) on the task ``data`` (its splits, loss and metrics)
    and evaluate it. Returns metrics, history, cost (and ``resumed_from``, the step a checkpoint gave).

    ``compile``: run the model's forward (training and evaluation) through ``torch.compile`` (inductor;
    the first steps pay the compilation, which the step-time median leaves out).
    ``eval_merged``: evaluate with the adapter merged into the frozen weights where the method can
    (``Variant.merged_for_eval``; the weights are restored exactly after each evaluation).

    ``snapshots``: save the snapshotted modules' weights at its steps (step 0: before the first update).

    ``profile_memory``: run this step (1-based; 0: none) under the memory profiler and return what its tensors
    hold at their peak (``TensorMemoryProfile``) as ``memory_profile``. The step is its own memory window and
    is left out of the step times (the profiler slows it); the training time includes it.

    With ``checkpoint``, training resumes from its state when there is one, saves it every
    ``checkpoint.every`` steps, and saves it before stopping on SIGINT/SIGTERM (``resume.Interrupted``)."""
    cfg.validate()
    device = pick_device(device) if isinstance(device, str) else device
    model.to(device)
    log = log or (lambda metrics, step: None)
    gen = torch.Generator().manual_seed(stream_seed(seed, "data"))  # the order of the training examples
    reseed(seed, "train")  # dropout and any other randomness of the steps
    train_loader = DataLoader(data.train, batch_size=cfg.batch_size, shuffle=True, generator=gen,
                              collate_fn=data.collate, drop_last=len(data.train) > cfg.batch_size)
    memory = PeakMemory(device)
    if compile:  # dropout from the run's "train" stream, as eager draws it (not inductor's own generator)
        from torch._inductor import config as inductor

        inductor.fallback_random = True
    net = torch.compile(model) if compile else model  # the same module and parameters, compiled forward
    merging = variant.merged_for_eval if eval_merged else lambda model: contextlib.nullcontext(False)
    evaluated_merged: list[bool] = []

    def evaluate(split) -> dict:
        resume = memory.current
        memory.switch("eval")
        loader = DataLoader(split, batch_size=cfg.eval_batch_size, collate_fn=data.collate)
        model.eval()
        with merging(model) as merged, torch.inference_mode(), _autocast(device, bf16):
            metrics = data.evaluate(net, _Moved(loader, device))
        evaluated_merged.append(merged)
        model.train()
        memory.switch(resume)
        undeclared = sorted(set(metrics) - set(data.directions))
        if undeclared:
            raise ValueError(f"the task reports metric {undeclared[0]!r} without declaring its direction")
        return {k: float(v) for k, v in metrics.items()}

    steps = total_steps(cfg, len(data.train))
    if not 0 <= profile_memory <= steps:
        raise ValueError(f"profile_memory={profile_memory}: expected a step of this run (1 to {steps}) or 0")
    variant.check_optim(cfg.grad_clip, cfg.grad_accum)
    opt = variant.optimizer(model, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas),
                            eps=cfg.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.schedule, int(cfg.warmup_ratio * steps), steps))
    params = [p for p in model.parameters() if p.requires_grad]
    adapter = _outside_head(model, variant)  # the adapter's own gradient norm (rsLoRA Fig. 2), head apart
    history, best, best_state = [], None, None
    step_times: list[float] = []
    memory_profile = None
    gradient_bytes = 0
    batches = _Batches(train_loader, gen)
    start, train_time_before = 0, 0.0

    def snapshot(done: int) -> dict:  # everything the loop carries from one step to the next
        return {"step": done, "trainable": {n: p.detach() for n, p in model.named_parameters() if p.requires_grad},
                "buffers": dict(model.named_buffers()), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "variant": variant.state_dict(), "batches": batches.state(), "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if device.type == "cuda" else [],
                "history": history, "step_times": step_times, "best": best, "best_state": best_state,
                "gradient_bytes": gradient_bytes, "peaks": memory.peaks, "memory_profile": memory_profile,
                "train_time": train_time_before + time.perf_counter() - t_start}

    saved = checkpoint.load() if checkpoint is not None else None
    if saved is not None:
        start = saved["step"]
        _restore(model, saved)
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        variant.load_state_dict(saved["variant"])
        batches.restore(saved["batches"])
        torch.set_rng_state(saved["rng"])
        if device.type == "cuda" and saved["cuda_rng"]:
            torch.cuda.set_rng_state_all(saved["cuda_rng"])
        history, step_times = saved["history"], saved["step_times"]
        best, best_state = saved["best"], saved["best_state"]
        gradient_bytes, memory.peaks, train_time_before = saved["gradient_bytes"], saved["peaks"], saved["train_time"]
        memory_profile = saved.get("memory_profile")  # a checkpoint from before profiling existed has none
        print(f"[lorabench] resuming from step {start} of {steps} ({checkpoint.path})")
    show = _show_progress() if progress is None else progress
    bar = _progress(steps, show)
    bar.update(start)
    def snapshot_weights(step: int) -> None:  # its own memory window: the float32 copies are no training cost
        if snapshots is not None and snapshots.due(step):
            resume = memory.current
            memory.switch("snapshot")
            snapshots.take(step, model)
            memory.switch(resume)

    if start == 0:
        snapshot_weights(0)
    model.train()
    memory.switch("train")  # the training window: model, data and optimizer exist; evaluations are apart
    t_start = time.perf_counter()
    # host syncs (reading the loss, the finiteness check, step timing): every step on CPU, where they cost
    # nothing; every log_every steps on CUDA, so the GPU never waits for Python between steps
    sync_every = cfg.log_every if device.type == "cuda" else SYNC_EVERY_CPU
    # history entries waiting for values: (entry, [task, extra] per micro-batch + the two gradient norms, timer)
    pending: list[tuple[dict, torch.Tensor, Callable[[], float] | None]] = []  # None: an untimed step

    def flush() -> None:
        """Read the pending steps' losses and gradient norms (one sync), stop at the first non-finite loss,
        log and time them."""
        if not pending:
            return
        values = torch.stack([v for _, v, _ in pending]).tolist()  # (steps, 2 * accum + 2)
        for (entry, _, elapsed), row in zip(pending, values, strict=True):
            task, extra = (sum(row[i:2 * cfg.grad_accum:2]) / cfg.grad_accum for i in (0, 1))
            norm, adapter_norm = row[-2:]
            if not math.isfinite(task + extra):
                pending.clear()
                raise NonFiniteLoss(entry["step"], task + extra)  # the first bad step, 1-based as in the history
            entry["loss"] = task  # the task loss compares across variants; a variant's own penalty sits beside it
            if extra:
                entry["extra_loss"] = extra
            if math.isfinite(norm):  # NaN: not computed (no clipping); inf: clipping skipped nothing finite
                entry["grad_norm"] = norm  # the total gradient norm before clipping
            if math.isfinite(adapter_norm):
                entry["adapter_grad_norm"] = adapter_norm
            if elapsed is not None:
                step_times.append(elapsed())
            lr = entry.pop("_lr")
            if entry["step"] % cfg.log_every == 0 or entry["step"] == steps:
                log({"train/loss": task, "train/lr": lr, **({"train/extra_loss": extra} if extra else {}),
                     **{f"train/{k}": entry[k] for k in ("grad_norm", "adapter_grad_norm") if k in entry}},
                    entry["step"])
        bar.set_postfix(loss=f"{task:.4f}", it_s=f"{1 / max(step_times[-1], 1e-9):.2f}" if step_times else "–")
        pending.clear()

    for step in range(start, steps):
        with deferred():  # a signal now waits for the end of this step
            profiler = None
            if step + 1 == profile_memory:  # its own memory window: the profiler's buffers are no training cost
                memory.switch("profile")
                profiler = TensorMemoryProfile(device)
            t0, timer = time.perf_counter(), _StepTimer(device)
            micro = []
            for _ in range(cfg.grad_accum):
                batch = to_device(next(batches), device)
                with _autocast(device, bf16):
                    task_loss = data.loss(net, batch)
                    extra = variant.extra_loss(model)  # e.g. AdaLoRA's orthogonality penalty; 0 for most
                    loss = task_loss + extra
                (loss / cfg.grad_accum).backward()
                task_value = task_loss.detach().float().reshape(())
                extra_value = (extra.detach().float().reshape(()) if torch.is_tensor(extra)
                               else task_value.new_full((), float(extra)))  # a fill on the device, no copy
                micro.append(torch.stack([task_value, extra_value]))
            if step == 0:  # what the gradients occupy (GaLore: full-size, the projection happens in the optimizer)
                gradient_bytes = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
            norm = _grad_norms(params, adapter, cfg.grad_clip, task_value)
            opt.step()
            sched.step()
            variant.after_step(model, step, steps)  # gradients are still present here (AdaLoRA needs them)
            opt.zero_grad(set_to_none=True)
            elapsed = timer.stop(t0)
            if profiler is not None:
                memory_profile = {"step": step + 1, **profiler.stop()}
                memory.switch("train")
                elapsed = None  # a profiled step's time is the profiler's
            entry = {"step": step + 1, "loss": None, "_lr": opt.param_groups[0]["lr"]}
            history.append(entry)
            pending.append((entry, torch.cat([torch.stack(micro).flatten(), norm]), elapsed))
            bar.update(1)
            snapshot_weights(step + 1)
            evaluating = cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < steps
            if (step + 1) % sync_every == 0 or step + 1 == steps or evaluating:
                flush()
            if evaluating:
                val = evaluate(data.val)
                entry.update({f"val_{k}": v for k, v in val.items()})
                log({f"val/{k}": v for k, v in val.items()}, step + 1)
                # only a state the variant may end in is a candidate (AdaLoRA: once its rank pattern is final)
                if cfg.select_best and variant.can_restore() and _better(val[data.main_metric], best,
                                                                         data.higher_is_better):
                    best = val[data.main_metric]
                    best_state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        stop = SIGNALS.pending
        save = checkpoint is not None and (checkpoint.due(step + 1) and step + 1 < steps or stop and checkpoint.every)
        if save or stop:
            flush()  # a non-finite loss fails the run before a checkpoint could keep its weights
        if save:
            checkpoint.save(snapshot(step + 1))
        if stop:
            bar.close()
            raise Interrupted(stop, step + 1)
    flush()
    bar.close()
    train_time = train_time_before + time.perf_counter() - t_start
    memory.switch(None)  # the training window closes before the final evaluation
    val = evaluate(data.val)
    if cfg.select_best and best_state is not None and not _better(val[data.main_metric], best,
                                                                  data.higher_is_better):
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in best_state:
                    p.copy_(best_state[n])
        val = evaluate(data.val)
    test = evaluate(data.test)
    history[-1].update({f"val_{k}": v for k, v in val.items()})
    log({**{f"val/{k}": v for k, v in val.items()}, **{f"test/{k}": v for k, v in test.items()}}, steps)
    cost = variant.cost(model, opt)
    warm = step_times[1:] or step_times  # the first step pays one-off allocation costs
    cost.update(gradient_bytes=gradient_bytes, peak_memory_bytes=memory.peaks["train"],
                eval_peak_memory_bytes=memory.peaks.get("eval"), train_time_s=train_time,
                step_time_ms=1000 * float(np.mean(warm)) if warm else None,  # None: no step was timed
                step_time_median_ms=1000 * float(np.median(warm)) if warm else None,
                steps=steps)
    cost["tensor_peak_bytes"] = memory_profile["peak_bytes"] if memory_profile is not None else None
    return {"metrics": {"val": val, "test": test}, "history": _compact(history), "cost": cost,
            "resumed_from": start or None, "eval_merged": bool(evaluated_merged) and all(evaluated_merged),
            **({"memory_profile": memory_profile} if memory_profile is not None else {})}


@torch.no_grad()
def _restore(model: nn.Module, saved: dict) -> None:
    """A checkpoint's trainable weights and buffers into the (identically rebuilt) model."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    buffers = dict(model.named_buffers())
    if set(params) != set(saved["trainable"]) or set(buffers) != set(saved["buffers"]):
        raise ValueError("the checkpoint does not fit this model (other trainable weights): delete it, or force=true")
    for group, values in ((params, saved["trainable"]), (buffers, saved["buffers"])):
        for n, t in group.items():
            t.copy_(values[n])


SYNC_EVERY_CPU = 1  # steps between host syncs on CPU (tests raise it to exercise the CUDA bookkeeping)


class _StepTimer:
    """A step's duration: wall clock on CPU; on CUDA two events, read at the next sync (no wait now)."""

    def __init__(self, device: torch.device):
        self.events = None
        if device.type == "cuda":
            self.events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            self.events[0].record()

    def stop(self, t0: float) -> Callable[[], float]:
        if self.events is None:
            elapsed = time.perf_counter() - t0
            return lambda: elapsed
        start, end = self.events
        end.record()

        def read() -> float:
            end.synchronize()
            return start.elapsed_time(end) / 1000.0

        return read


def _better(value, best, higher) -> bool:
    return best is None or (value > best if higher else value < best)


def _outside_head(model: nn.Module, variant: Variant) -> list[nn.Parameter] | None:
    """The trainable parameters outside the task head (the adapter; full FT: the body), or None when that
    is every trainable parameter or none of them (then ``grad_norm`` says it all)."""
    from variants.base import trainable
    from variants.targets import head_module_names

    heads = head_module_names(model, variant.cfg.heads)
    named = list(trainable(model))
    rest = [p for n, p in named if not any(n.startswith(h + ".") for h in heads)]
    return rest if 0 < len(rest) < len(named) else None


def _grad_norms(params, adapter, max_norm: float, like: torch.Tensor) -> torch.Tensor:
    """[total gradient norm before clipping, the same over ``adapter``] (NaN where not computed), clipping
    the gradients to ``max_norm`` as ``clip_grad_norm_`` does. Without clipping nothing is computed. The
    total is clipping's own; the adapter's is one more reduction over its gradients (for full FT nearly all
    of them, a read of every gradient)."""
    if max_norm <= 0:
        return like.new_full((2,), math.nan)
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads)
    part = (torch.nn.utils.get_total_norm([p.grad for p in adapter if p.grad is not None]) if adapter is not None
            else total.new_full((), math.nan))
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)  # = clip_grad_norm_(params, max_norm)
    return torch.stack([total, part]).detach().float().to(like.device)


def _compact(history: list[dict], keep: int = 200) -> list[dict]:
    """At most ~``keep`` entries: every k-th step plus every evaluation and the last step."""
    k = max(1, math.ceil(len(history) / keep))
    return [h for i, h in enumerate(history)
            if i % k == k - 1 or any(key.startswith("val_") for key in h) or i == len(history) - 1]


class _Moved:
    """A loader whose batches arrive on ``device``."""

    def __init__(self, loader, device):
        self.loader, self.device = loader, device

    def __iter__(self):
        return (to_device(b, self.device) for b in self.loader)

    def __len__(self):
        return len(self.loader)


def _autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda")


def _show_progress() -> bool:
    import sys

    return sys.stderr.isatty() and not os.environ.get("LORABENCH_NO_PROGRESS")


def _progress(total: int, show: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not show, desc="train", leave=False, dynamic_ncols=True)
