"""LoRA on handwritten digits: pretrain an MLP briefly, then fine-tune on the class it is worst at.

The classic LoRA-on-MNIST demonstration, on scikit-learn's 8×8 ``load_digits`` (1,797 images, shipped
inside scikit-learn, no download). The base MLP ``64 → hidden1 → hidden2 → 10`` (``fc1``, ``fc2``,
``classifier``) is pretrained for a short time on the training split; the class with the lowest base
validation accuracy becomes the *weak* class. Fine-tuning sees only that class's training images (plus a
``replay`` fraction of the others), so every variant trades improvement on the weak class against
forgetting on the rest:

- ``weak_acc`` / ``other_acc``: accuracy on the weak class / on the nine others;
- ``weak_gain = weak_acc - base weak_acc``, ``forgetting = base other_acc - other_acc`` (same split);
- ``accuracy`` over all classes is the main metric (what best-on-validation selection uses).

The pretrained base is cached on disk (safetensors + json, keyed by everything that shapes it), so a sweep
trains it once. It always trains on the CPU with its own seed, so the base is the same for every run.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import TensorDataset

from experiments.files import atomic_write
from experiments.tasks import Task, TaskError, register_task

N_CLASSES = 10


class MLP(nn.Module):
    def __init__(self, hidden1: int, hidden2: int, d_in: int = 64):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden1)
        self.fc2 = nn.Linear(hidden1, hidden2)
        self.classifier = nn.Linear(hidden2, N_CLASSES)

    def forward(self, x):
        return self.classifier(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def load(data_seed: int, val_frac: float, test_frac: float, image_size: int = 8):
    """Images scaled to [0, 1] (bilinearly resized to ``image_size`` x ``image_size`` when not 8, flattened)
    and a seeded split, stratified by class: {split: (x, y)}."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise TaskError("task 'digits' needs scikit-learn (`make setup` installs it)") from None
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    if image_size != 8:  # e.g. 28: MNIST's 784 inputs, for the classic 784-1000-2000-10 LoRA demonstration
        x = nn.functional.interpolate(x.view(-1, 1, 8, 8), size=(image_size, image_size), mode="bilinear",
                                      align_corners=False).flatten(1)
    y = torch.tensor(y, dtype=torch.long)
    rng = np.random.default_rng(data_seed)
    parts = {"train": [], "val": [], "test": []}
    for c in range(N_CLASSES):
        idx = rng.permutation(np.flatnonzero(y.numpy() == c))
        n_val, n_test = round(val_frac * len(idx)), round(test_frac * len(idx))
        parts["test"].append(idx[:n_test])
        parts["val"].append(idx[n_test:n_test + n_val])
        parts["train"].append(idx[n_test + n_val:])
    return {k: (x[np.sort(np.concatenate(v))], y[np.sort(np.concatenate(v))]) for k, v in parts.items()}


def per_class_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[float]:
    with torch.no_grad():
        pred = model(x).argmax(-1)
    return [(pred[y == c] == c).float().mean().item() for c in range(N_CLASSES)]


def pretrain(splits, hidden1: int, hidden2: int, steps: int, lr: float, batch_size: int, seed: int) -> MLP:
    """A short Adam run on every class: a decent base with one clearly weakest class."""
    torch.manual_seed(seed)
    x, y = splits["train"]
    model = MLP(hidden1, hidden2, d_in=x.shape[1])
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(x), (batch_size,), generator=g)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def cached_base(cache_dir: str | os.PathLike, splits, split_spec: list, **spec) -> tuple[MLP, dict]:
    """The pretrained base and its facts (weak class, base accuracies), trained once per spec and split."""
    key = hashlib.sha256(json.dumps([spec, split_spec], sort_keys=True).encode()).hexdigest()[:12]
    root = Path(cache_dir).expanduser() / "digits"
    weights, facts_path = root / f"base-{key}.safetensors", root / f"base-{key}.json"
    if weights.exists() and facts_path.exists():
        model = MLP(spec["hidden1"], spec["hidden2"], d_in=splits["train"][0].shape[1])
        try:
            model.load_state_dict(load_file(weights))
            facts = json.loads(facts_path.read_text())
            if not (isinstance(facts, dict) and "weak_class" in facts and "base_val_class_acc" in facts):
                raise ValueError("not a digits base record")
            return model.eval(), facts
        except Exception as e:  # noqa: BLE001 - any unreadable cache entry is rebuilt, never trusted
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            warnings.warn(f"corrupt cached digits base {weights.name} / {facts_path.name} in {root} ({first}): "
                          "rebuilding it", stacklevel=2)
    model = pretrain(splits, **spec)
    val_acc = per_class_accuracy(model, *splits["val"])
    weak = int(np.argmin(val_acc))  # ties: the lowest class index
    facts = {"spec": spec, "weak_class": weak, "base_val_class_acc": val_acc}
    # parallel sweep jobs may pretrain at once: they write identical files, each atomically
    atomic_write(weights, lambda tmp: save_file(model.state_dict(), str(tmp)))
    atomic_write(facts_path, lambda tmp: tmp.write_text(json.dumps(facts, indent=1)))
    return model, facts


def _collate(rows):
    x, y = zip(*rows, strict=True)
    return {"x": torch.stack(x), "y": torch.stack(y)}


@register_task("digits", metrics={"accuracy": "max", "weak_acc": "max", "other_acc": "max", "weak_gain": "max",
                                "forgetting": "min"}, main_metric="accuracy", head=("classifier",),
               train_head=False, default_targets=["fc1", "fc2"])
def build(hidden1: int = 256, hidden2: int = 256, pretrain_steps: int = 30, pretrain_lr: float = 1e-3,
          pretrain_batch_size: int = 32, pretrain_seed: int = 0, data_seed: int = 1234, val_frac: float = 0.2,
          test_frac: float = 0.2, weak_class: int | None = None, replay: float = 0.0, image_size: int = 8,
          cache_dir: str = "~/.cache/lorabench") -> Task:
    if not (0 < val_frac < 1 and 0 < test_frac < 1 and val_frac + test_frac < 1):
        raise TaskError(f"invalid option task.val_frac/test_frac={val_frac}/{test_frac}: expected fractions "
                        "summing to less than 1")
    if not 0 <= replay <= 1:
        raise TaskError(f"invalid option task.replay={replay}: expected a fraction in [0, 1]")
    if weak_class is not None and weak_class not in range(N_CLASSES):
        raise TaskError(f"invalid option task.weak_class={weak_class}: expected null or 0..9")
    if min(hidden1, hidden2, pretrain_steps, pretrain_batch_size) < 1:
        raise TaskError("invalid option task.hidden1/hidden2/pretrain_steps/pretrain_batch_size: expected >= 1")
    if not (isinstance(image_size, int) and 8 <= image_size <= 64):
        raise TaskError(f"invalid option task.image_size={image_size!r}: expected an integer in [8, 64] (8: the "
                        "original 8x8 images; 28: MNIST's 784 inputs)")
    splits = load(data_seed, val_frac, test_frac, image_size)
    spec = dict(hidden1=hidden1, hidden2=hidden2, steps=pretrain_steps, lr=pretrain_lr,
                batch_size=pretrain_batch_size, seed=pretrain_seed)
    with torch.random.fork_rng(devices=[]):  # building the task must not move the run's RNG streams
        split_spec = [data_seed, val_frac, test_frac] + ([image_size] if image_size != 8 else [])
        base, facts = cached_base(cache_dir, splits, split_spec, **spec)
        model = MLP(hidden1, hidden2, d_in=image_size**2)
    model.load_state_dict(base.state_dict())
    weak = facts["weak_class"] if weak_class is None else weak_class

    x, y = splits["train"]
    others = torch.nonzero(y != weak).squeeze(1)
    n_replay = round(replay * len(others))
    keep = torch.randperm(len(others), generator=torch.Generator().manual_seed(data_seed))[:n_replay]
    train_idx = torch.cat([torch.nonzero(y == weak).squeeze(1), others[keep]]).sort().values
    train = TensorDataset(x[train_idx], y[train_idx])

    def loss(model, batch):
        return nn.functional.cross_entropy(model(batch["x"]), batch["y"])

    def evaluate(model, loader):
        hits = {"model": [], "base": []}
        labels = []
        device = next(model.parameters()).device
        for batch in loader:
            labels.append(batch["y"])
            hits["model"].append(model(batch["x"]).argmax(-1) == batch["y"])
            hits["base"].append(base.to(device)(batch["x"]).argmax(-1) == batch["y"])
        y = torch.cat(labels)
        is_weak = y == weak

        def acc(h, mask):
            return torch.cat(h)[mask].float().mean().item()

        out = {"accuracy": acc(hits["model"], torch.ones_like(is_weak)), "weak_acc": acc(hits["model"], is_weak),
               "other_acc": acc(hits["model"], ~is_weak)}
        out["weak_gain"] = out["weak_acc"] - acc(hits["base"], is_weak)
        out["forgetting"] = acc(hits["base"], ~is_weak) - out["other_acc"]
        return out

    info = {"weak_class": weak, "n_train": len(train), "n_val": len(splits["val"][1]),
            "n_test": len(splits["test"][1]), "replay": replay,
            "base_test_class_acc": [round(a, 4) for a in per_class_accuracy(base, *splits["test"])],
            "base_val_class_acc": [round(a, 4) for a in facts["base_val_class_acc"]]}
    val, test = TensorDataset(*splits["val"]), TensorDataset(*splits["test"])
    with torch.no_grad():
        untouched = {"name": "the pretrained base", **{k: evaluate(base, [_collate(list(d))]) for k, d in
                                                   (("val", val), ("test", test))}}
    return Task(model=model, model_name=f"mlp64-{hidden1}-{hidden2}-10", train=train, val=val, test=test,
                loss=loss, evaluate=evaluate, trivial=untouched, collate=_collate, info=info)
