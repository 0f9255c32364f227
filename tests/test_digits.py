"""The digits task: a cached pretrained MLP, its weak class, and improvement vs forgetting metrics."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import compose_config
from torch.utils.data import DataLoader

from experiments import records, tasks
from experiments.tasks import digits
from experiments.train import ConfigError, run


def config(tmp_path, *overrides) -> dict:
    return compose_config("logger=none", *overrides, task="digits", results_dir=tmp_path / "results",
                          cache_dir=tmp_path / "cache")


def test_split_is_stratified_disjoint_complete_and_seeded():
    from sklearn.datasets import load_digits

    x_all, y_all = load_digits(return_X_y=True)
    a, b = digits.load(1234, 0.2, 0.2), digits.load(1234, 0.2, 0.2)
    assert {k: len(y) for k, (_, y) in a.items()} == {"train": 1079, "val": 359, "test": 359}
    probe = torch.randn(64, dtype=torch.float64)  # rows as numbers: the splits together are exactly the data set
    rows = torch.cat([x for x, _ in a.values()]).double() @ probe
    assert torch.allclose(rows.sort().values, (torch.tensor(x_all / 16.0) @ probe).sort().values)
    per_class = torch.bincount(torch.tensor(y_all), minlength=10)
    for k in a:
        assert torch.equal(a[k][0], b[k][0]) and torch.equal(a[k][1], b[k][1])
        if k != "train":  # stratified: each class contributes its 20 %
            assert torch.equal(torch.bincount(a[k][1], minlength=10), (0.2 * per_class).round().long())
    assert not torch.equal(digits.load(7, 0.2, 0.2)["test"][0], a["test"][0])
    assert 0.0 <= a["train"][0].min() and a["train"][0].max() <= 1.0


def test_base_is_pretrained_once_cached_and_leaves_the_rng_alone(tmp_path, monkeypatch):
    torch.manual_seed(3)
    first = tasks.build("digits", cache_dir=str(tmp_path))
    after_build = torch.rand(3)
    torch.manual_seed(3)
    expected = torch.rand(3)
    assert torch.equal(after_build, expected)  # pretraining forks the RNG: runs do not depend on the cache
    files = sorted(p.name for p in (tmp_path / "digits").iterdir())
    assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".safetensors")

    monkeypatch.setattr(digits, "pretrain", lambda *a, **k: pytest.fail("the cached base was retrained"))
    second = tasks.build("digits", cache_dir=str(tmp_path))
    for (n, p), (_, q) in zip(first.model.state_dict().items(), second.model.state_dict().items(), strict=True):
        assert torch.equal(p, q), n
    assert first.info == second.info
    facts = json.loads((tmp_path / "digits" / files[0]).read_text())
    assert facts["weak_class"] == first.info["weak_class"]


def test_weak_class_is_the_base_models_worst_on_validation_and_untouched_model_scores_zero_change(tmp_path):
    task = tasks.build("digits", cache_dir=str(tmp_path))
    x, y = digits.load(1234, 0.2, 0.2)["val"]
    per_class = digits.per_class_accuracy(task.model, x, y)
    assert task.info["weak_class"] == min(range(10), key=lambda c: (per_class[c], c))
    assert per_class[task.info["weak_class"]] < 0.5 < sum(per_class) / 10  # a clearly weak class in a decent base
    train_labels = {int(y) for _, y in task.train}
    assert train_labels == {task.info["weak_class"]}  # replay=0: fine-tuning sees only the weak class
    m = task.evaluate(task.model, ({"x": a, "y": b} for a, b in DataLoader(task.val, batch_size=64)))
    assert m["weak_gain"] == 0 and m["forgetting"] == 0 and m["weak_acc"] == per_class[task.info["weak_class"]]


def test_replay_mixes_in_that_fraction_of_the_other_classes(tmp_path):
    base = tasks.build("digits", cache_dir=str(tmp_path))
    mixed = tasks.build("digits", cache_dir=str(tmp_path), replay=0.5)
    n_other = len(digits.load(1234, 0.2, 0.2)["train"][1]) - len(base.train)
    assert len(mixed.train) == len(base.train) + round(0.5 * n_other)


def test_head_baseline_trains_only_the_pretrained_head(tmp_path):
    cfg = config(tmp_path, "variant=head")
    record = run(cfg)
    assert record["status"] == "ok", record["error"]
    assert record["cost"]["trainable_params"] == 256 * 10 + 10
    assert record["metrics"]["test"]["weak_gain"] > 0.5  # the probe alone can move the weak class


def test_lora_improves_the_weak_class_and_forgets_far_less_than_full_fine_tuning(tmp_path):
    lora = run(config(tmp_path, "variant=lora"))["metrics"]["test"]
    full = run(config(tmp_path, "variant=full"))["metrics"]["test"]
    assert lora["weak_gain"] > 0.5 and lora["forgetting"] < 0.05
    assert full["forgetting"] > 0.5  # the same budget on every weight overwrites the other classes


def test_cache_location_is_not_part_of_the_run_id(tmp_path):
    a, b = config(tmp_path / "a"), config(tmp_path / "b")
    assert a["task"]["cache_dir"] != b["task"]["cache_dir"]
    assert records.run_id(a) == records.run_id(b)
    assert records.run_id(a) != records.run_id(config(tmp_path / "a", "task.replay=0.1"))


@pytest.mark.parametrize("override, fragment", [
    ("task.replay=2", "task.replay=2"),
    ("task.weak_class=10", "task.weak_class=10"),
    ("task.val_frac=0.9", "val_frac"),
    ("+task.bogus=1", "unknown option task.bogus"),
])
def test_bad_digits_options_are_one_line(override, fragment, tmp_path):
    with pytest.raises(ConfigError) as err:
        run(config(tmp_path, override))
    assert fragment in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "results").exists()
