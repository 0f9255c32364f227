"""Weight snapshots (``snapshot_steps``): the files hold the weight each module computes with and the
adapter's own tensors, written at the asked steps, without changing the run (same run id, same losses)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import compose_config
from safetensors import safe_open
from safetensors.torch import load_file

from experiments import train

COMMON = ["task=digits", "optim.max_steps=6", "optim.eval_every=0", "logger=none"]


def _load(path):
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    return load_file(str(path)), meta


@pytest.mark.parametrize("variant", ["lora", "dora", "adalora", "full"])
def test_snapshots_hold_the_effective_weights_and_leave_the_run_unchanged(variant, tmp_path):
    extra = ["variant.tinit=1", "variant.tfinal=1", "variant.deltaT=1"] if variant == "adalora" else []
    plain = train.run(compose_config(f"variant={variant}", *COMMON, *extra, results_dir=tmp_path / "a"))
    rec = train.run(compose_config(f"variant={variant}", *COMMON, *extra, "snapshot_steps=[0,3,6]",
                                   results_dir=tmp_path / "b"))
    assert rec["status"] == "ok" and rec["run_id"] == plain["run_id"]
    assert [h["loss"] for h in rec["history"]] == [h["loss"] for h in plain["history"]]
    assert rec["metrics"] == plain["metrics"]
    folder = tmp_path / "b" / "runs" / f"{rec['run_id']}.snapshots"
    assert rec["snapshot_dir"] == str(folder)
    assert sorted(p.name for p in folder.iterdir()) == [f"step_{s:06d}.safetensors" for s in (0, 3, 6)]
    (w0, meta0), (w3, _), (w6, meta6) = (_load(folder / f"step_{s:06d}.safetensors") for s in (0, 3, 6))
    assert meta6["step"] == "6" and meta6["variant"] == variant and meta6["run_id"] == rec["run_id"]
    scales = json.loads(meta6["scaling"])
    modules = sorted(k.removesuffix(".weight") for k in w6 if k.endswith(".weight"))
    assert modules == ["fc1", "fc2"]  # the adapted layers; full fine-tuning: the task's default targets
    for m in modules:
        W0, W = w0[f"{m}.weight"], w6[f"{m}.weight"]
        assert W.dtype == torch.float32 and W.shape == W0.shape
        assert not torch.equal(W, W0) and not torch.equal(w3[f"{m}.weight"], W)  # it trained between snapshots
        if variant == "full":
            assert scales == {}
            continue
        A, B = w6[f"{m}.lora_A"], w6[f"{m}.lora_B"]
        assert torch.count_nonzero(w0[f"{m}.lora_B"] if variant != "adalora" else w0[f"{m}.lora_E"]) == 0
        if variant == "adalora":
            A = A * w6[f"{m}.lora_E"]
        # the frozen W0 is the step-0 weight (the adapter starts at zero), the update the file's own tensors
        update = W0 + scales[m] * B @ A
        if variant == "dora":
            mag = w6[f"{m}.lora_magnitude_vector"]
            torch.testing.assert_close(W, mag[:, None] * update / update.norm(dim=1, keepdim=True))
        else:
            torch.testing.assert_close(W, update)


def test_force_starts_the_snapshots_over(tmp_path):
    cfg = ["variant=lora", *COMMON]
    rec = train.run(compose_config(*cfg, "snapshot_steps=[2,4]", results_dir=tmp_path))
    folder = tmp_path / "runs" / f"{rec['run_id']}.snapshots"
    train.run(compose_config(*cfg, "snapshot_steps=[1]", "force=true", results_dir=tmp_path))
    assert sorted(p.name for p in folder.iterdir()) == ["step_000001.safetensors"]


def test_snapshot_targets_pick_modules_for_full_fine_tuning(tmp_path):
    rec = train.run(compose_config("variant=full", *COMMON, "snapshot_steps=[6]", "snapshot_targets=[fc2]",
                                   results_dir=tmp_path))
    weights, _ = _load(tmp_path / "runs" / f"{rec['run_id']}.snapshots" / "step_000006.safetensors")
    assert sorted(weights) == ["fc2.weight"]


def test_snapshot_targets_take_presets_on_an_adapted_model(tmp_path):
    """A preset names the same modules on the adapted model (LoRA's wrapped layers stand for their Linear)
    as on the plain one (full fine-tuning): the weight analyses compare the two module for module."""
    import variants
    from tests.tiny import tiny_bert
    from variants import snapshot_modules

    plain = tiny_bert()
    lora = variants.create("lora", rank=2, targets="qv").apply(tiny_bert())
    for spec in ("qv", "q", "all-linear", ["query"]):
        assert snapshot_modules(lora, spec) == snapshot_modules(plain, spec), spec
    assert all(n.endswith(("query", "value")) for n in snapshot_modules(lora, "qv"))
    assert snapshot_modules(lora) == snapshot_modules(plain, "qv")
