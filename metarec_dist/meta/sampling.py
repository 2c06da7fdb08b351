"""Training batches: the target's limited users and each source's sequences, from one seeded stream."""

from __future__ import annotations

import numpy as np

from metarec_dist.data.batches import NextItemBatch, next_item_batch, sample_rows
from metarec_dist.meta.training_data import TrainingData


class BatchSampler:
    """Next-item batches and source tasks for one process; ``rng`` is all its randomness
    (a checkpoint saves and restores it)."""

    def __init__(self, data: TrainingData, target_rows: np.ndarray, batch_size: int, max_length: int,
                 rng: np.random.Generator) -> None:
        self.data, self.target_rows = data, target_rows
        self.batch_size, self.max_length = batch_size, max_length
        self.rng = rng

    def target_batch(self) -> NextItemBatch:
        rows = sample_rows(self.target_rows, self.batch_size, self.rng)
        return next_item_batch(self.data.split.train, rows, self.max_length)

    def source_batch(self, source: str) -> NextItemBatch:
        view = self.data.sources[source]
        rows = sample_rows(np.arange(len(view)), self.batch_size, self.rng)
        return next_item_batch(view, rows, self.max_length)

    def sources(self, count: int) -> list[str]:
        """``count`` of this process's sources (all if fewer), drawn without replacement."""
        names = sorted(self.data.sources)
        count = min(count, len(names))
        return [names[i] for i in self.rng.choice(len(names), size=count, replace=False)]
