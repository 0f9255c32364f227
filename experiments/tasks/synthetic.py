"""A low-rank teacher with a known answer.

The base model is a frozen random linear map (or a 2-layer MLP with ``hidden > 0``); the teacher adds an
update of exact rank ``true_rank`` with equal singular values to its first layer. With isotropic inputs,
the best rank-r update recovers ``min(r, k)/k`` of the teacher's update (Eckart–Young), so LoRA with
``rank >= true_rank`` can fit the teacher and ``rank < true_rank`` cannot: ``fit`` stays near ``r/k``.

Metrics: ``mse`` and ``fit = 1 - mse / mse_of_the_base_model`` (1 = teacher recovered, 0 = no better
than the frozen base).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

from experiments.tasks import Task, TaskError, register_task


class Student(nn.Module):
    def __init__(self, d_in: int, d_out: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden or d_out)
        self.act = nn.ReLU() if hidden else nn.Identity()
        self.fc2 = nn.Linear(hidden, d_out) if hidden else nn.Identity()

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def _collate(rows):
    x, y = zip(*rows, strict=True)
    return {"x": torch.stack(x), "y": torch.stack(y)}


@register_task("synthetic", metrics={"mse": "min", "fit": "max"}, main_metric="fit", head=(),
               train_head=False, default_targets=["fc1"], smoke={"n_train": 256, "n_val": 64, "n_test": 64})
def build(d_in: int = 64, d_out: int = 64, hidden: int = 0, true_rank: int = 4, update_scale: float = 1.0,
          n_train: int = 4096, n_val: int = 512, n_test: int = 512, noise: float = 0.0,
          data_seed: int = 1234) -> Task:
    for name, n in (("d_in", d_in), ("d_out", d_out), ("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        if n < 1:
            raise TaskError(f"invalid option task.{name}={n}: expected an integer >= 1")
    if hidden < 0 or noise < 0:
        raise TaskError(f"invalid option task.{'hidden' if hidden < 0 else 'noise'}: expected >= 0")
    width = hidden or d_out
    if not 0 < true_rank <= min(d_in, width):
        raise TaskError(f"invalid option task.true_rank={true_rank}: expected 1..{min(d_in, width)}")
    g = torch.Generator().manual_seed(data_seed)
    with torch.random.fork_rng(devices=[]):  # the task is fixed by data_seed; the run's RNG stays the run's
        torch.manual_seed(data_seed)
        base = Student(d_in, d_out, hidden)
        teacher = Student(d_in, d_out, hidden)
        model = Student(d_in, d_out, hidden)
    teacher.load_state_dict(base.state_dict())
    # ΔW = U diag(σ) Vᵀ with orthonormal U, V and equal σ: every direction matters equally
    u, _ = torch.linalg.qr(torch.randn(width, true_rank, generator=g))
    v, _ = torch.linalg.qr(torch.randn(d_in, true_rank, generator=g))
    sigma = update_scale * base.fc1.weight.norm() / true_rank**0.5
    with torch.no_grad():
        teacher.fc1.weight += sigma * u @ v.T

    def split(n):
        x = torch.randn(n, d_in, generator=g)
        with torch.no_grad():
            y = teacher(x) + noise * torch.randn(n, d_out, generator=g)
        return TensorDataset(x, y)

    train, val, test = split(n_train), split(n_val), split(n_test)

    def loss(model, batch):
        return nn.functional.mse_loss(model(batch["x"]), batch["y"])

    def evaluate(model, loader):
        se = se_base = n = 0.0
        for batch in loader:
            se += (model(batch["x"]) - batch["y"]).pow(2).sum().item()
            se_base += (base.to(batch["x"].device)(batch["x"]) - batch["y"]).pow(2).sum().item()
            n += batch["y"].numel()
        return {"mse": se / n, "fit": 1.0 - se / se_base}

    with torch.no_grad():
        frozen = {"name": "the frozen base", **{k: evaluate(base, [_collate(list(d))]) for k, d in
                                            (("val", val), ("test", test))}}
    model.load_state_dict(base.state_dict())
    return Task(model=model, model_name=f"linear{d_in}x{d_out}" if not hidden else f"mlp{d_in}-{hidden}-{d_out}",
                train=train, val=val, test=test, loss=loss, evaluate=evaluate, trivial=frozen, collate=_collate,
                info={"true_rank": true_rank, "n_train": n_train})
