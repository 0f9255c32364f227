"""Weight snapshots at chosen steps (``snapshot_steps``), for the weight analyses (``experiments.analysis``).

``runs/<run_id>.snapshots/step_<NNNNNN>.safetensors`` (step 0: before the first update) holds, for each
snapshotted Linear module, ``<module>.weight``: the (out, in) weight the module computes with (W0 + ΔW for an
adapter, DoRA's m·V, the trained weight of full fine-tuning or GaLore), and an adapted layer's own tensors
(``<module>.lora_A``, ``.lora_B``, ``.lora_E``, ``.lora_magnitude_vector``); float32. The metadata has
``step``, ``variant``, ``run_id`` and ``scaling`` (JSON: {module: s} of the adapted layers).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from torch import nn

from experiments import files
from variants import weight_snapshot


class Snapshots:
    """Writes a snapshot of ``modules`` at each of ``steps``; each file is written whole or not at all."""

    def __init__(self, directory: str | Path, steps, modules: list[str], meta: dict[str, str]):
        self.directory, self.steps, self.modules, self.meta = Path(directory), set(steps), modules, meta

    def due(self, step: int) -> bool:
        return step in self.steps

    def path(self, step: int) -> Path:
        return self.directory / f"step_{step:06d}.safetensors"

    def take(self, step: int, model: nn.Module) -> Path:
        from safetensors.torch import save_file

        tensors, scales = weight_snapshot(model, self.modules)
        meta = {**self.meta, "step": str(step), "scaling": json.dumps(scales)}
        return files.atomic_write(self.path(step), lambda tmp: save_file(tensors, str(tmp), metadata=meta))

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
