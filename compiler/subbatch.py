"""Sub-batches of rows: how slimc runs models on batches whose outputs would be too large at once.

A causal LM with a 262k-token vocabulary returns float32 logits of 1 MB per token: 537 MB for a
batch of 4 x 128 tokens, per model. Verification and fidelity compare two models' outputs, so
slimc runs both on a few rows at a time and reduces the outputs before the next rows. The first
row of the first batch runs alone and measures the bytes of one row's outputs; after that each
run takes as many rows as fit ``OUTPUT_BUDGET_BYTES`` (at least one).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

Batch = dict[str, np.ndarray]
# Outputs of one model run that `compile` allows before splitting a batch into sub-batches of rows.
OUTPUT_BUDGET_BYTES = 64 << 20


class RowBudget:
    """Splits batches into sub-batches of rows whose outputs fit ``budget`` bytes (None: no split)."""

    def __init__(self, budget: int | None):
        self.budget, self.row_bytes = budget, None

    def split(self, batch: Batch) -> Iterable[Batch]:
        arrays = {k: np.asarray(v) for k, v in batch.items()}
        n = {a.shape[0] if a.ndim else None for a in arrays.values()}
        if self.budget is None or len(n) != 1 or None in n or next(iter(n)) < 2:
            yield batch  # nothing to split on: 0-d inputs, or inputs that disagree on the row count
            return
        n, start = next(iter(n)), 0
        while start < n:
            size = 1 if self.row_bytes is None else max(1, self.budget // max(self.row_bytes, 1))
            yield {k: a[start:start + size] for k, a in arrays.items()}
            start += size

    def observe(self, outputs: Outputs, part: Batch) -> None:
        rows = max((np.asarray(v).shape[0] for v in part.values() if np.ndim(v)), default=1)
        size = sum(np.asarray(o).nbytes for o in (outputs.values() if isinstance(outputs, Mapping) else outputs))
        self.row_bytes = max(self.row_bytes or 0, -(-size // max(rows, 1)))


def run_all(run: Callable[[Batch], Sequence[Any]], batches: Iterable[Batch], budget: int | None) -> None:
    """Run every batch (in sub-batches within ``budget``) and keep no outputs: the model runs."""
    rows = RowBudget(budget)
    for batch in batches:
        for part in rows.split(batch):
            rows.observe(run(part), part)
