"""Every cost a run record carries, defined once: records, tables and plots read this list.

A cost is computed in one of two places — ``Variant.cost()`` (static: parameter counts and bytes of the
adapted model and its optimizer) or the trainer's ``fit`` (measured: memory, time, steps) — and lands in
the record's ``cost``. ``aggregate`` loads every cost below into its tables' rows (the median over seeds),
shows those with a ``column`` in the paper table, and ``plots`` draws a Pareto front against quality for
those with ``pareto=True``. A test fails when a record carries a cost this list does not define.

No torch here: aggregation runs on a laptop from records made on a cluster.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Cost:
    name: str  # the key in the record's ``cost``
    label: str  # axis label and long name
    unit: str  # count | percent | bytes | ms | s
    source: str  # variant (Variant.cost) | trainer (fit)
    column: str | None = None  # the paper table's column title; None: not in the table
    pareto: bool = False  # a Pareto plot of quality against it
    direction: str = "min"  # every cost: lower is better

    def format(self, value) -> str:
        """The table cell: 79,106 (count), 0.348 (percent), 1,081 (bytes, in MiB), 530.1 (ms), 71.3 (s)."""
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "–"
        if self.unit == "count":
            return f"{int(value):,}"
        if self.unit == "bytes":
            return f"{value / 2**20:,.0f}"
        if self.unit == "percent":
            return f"{value:.3f}"
        return f"{value:.1f}"


COSTS: tuple[Cost, ...] = (
    Cost("trainable_params", "trainable params", "count", "variant", column="trainable", pareto=True),
    Cost("total_params", "parameters of the adapted model", "count", "variant"),
    Cost("base_params", "parameters of the base model", "count", "variant"),
    Cost("trainable_pct", "trainable params (% of the base model)", "percent", "variant"),
    Cost("weight_bytes", "weights (bytes)", "bytes", "variant"),
    Cost("trainable_bytes", "trainable weights (bytes)", "bytes", "variant"),
    Cost("optimizer_state_bytes", "optimizer state (bytes)", "bytes", "variant"),
    Cost("adapter_bytes", "saved adapter (bytes)", "bytes", "variant"),
    Cost("gradient_bytes", "gradients (bytes)", "bytes", "trainer"),
    Cost("peak_memory_bytes", "training peak memory (bytes)", "bytes", "trainer", column="train peak MiB",
         pareto=True),
    Cost("tensor_peak_bytes", "training peak of the profiled step's tensors (bytes)", "bytes", "trainer"),
    Cost("eval_peak_memory_bytes", "evaluation peak memory (bytes)", "bytes", "trainer"),
    Cost("train_time_s", "training time (s)", "s", "trainer"),
    Cost("step_time_ms", "step time (ms)", "ms", "trainer", column="ms/step", pareto=True),
    Cost("step_time_median_ms", "median step time (ms)", "ms", "trainer"),
    Cost("steps", "optimizer steps", "count", "trainer"),
)
BY_NAME = {c.name: c for c in COSTS}
NAMES = [c.name for c in COSTS]
