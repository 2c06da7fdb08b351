"""Fixed-shape numpy batches from ragged sequences (the model layer wraps them in tensors).

Sequences are *left*-padded with 0 and keep their most recent items, so the
last column is always a user's latest event, as a causal encoder reads it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from metarec_dist.data.sequences import SequenceView

PAD = 0


def left_padded(view: SequenceView, rows: np.ndarray, length: int) -> np.ndarray:
    """``[len(rows), length]`` int64: each row's last ``length`` items, right-aligned."""
    row_index, position, items = view.flat_rows(rows, last=length)
    counts = np.bincount(row_index, minlength=len(rows))
    out = np.zeros((len(rows), length), dtype=np.int64)
    out[row_index, length - counts[row_index] + position] = items  # right-aligned
    return out


@dataclass(frozen=True)
class NextItemBatch:
    """Inputs and next-item targets at every position (0 where there is none)."""

    inputs: np.ndarray  # [B, L] int64, left-padded
    targets: np.ndarray  # [B, L] int64, targets[b, t] follows inputs[b, :t+1]


def next_item_batch(view: SequenceView, rows: np.ndarray, length: int) -> NextItemBatch:
    """Training pairs from each row's last ``length + 1`` items (inputs shifted by one).

    Columns that are padding in every row are cut off (the batch is only as long
    as its longest sequence; the encoder also groups rows by length); positions
    count from the right, so nothing else changes.
    """
    longest = int(min(view.lengths[np.asarray(rows)].max(initial=1), length + 1))
    window = left_padded(view, rows, longest)
    inputs, targets = window[:, :-1].copy(), window[:, 1:].copy()
    targets[inputs == PAD] = PAD  # no target for positions before the sequence starts
    return NextItemBatch(inputs=inputs, targets=targets)


def sample_rows(candidates: np.ndarray, batch_size: int, rng: np.random.Generator) -> np.ndarray:
    """``batch_size`` rows drawn without replacement (with, if there are too few)."""
    replace = len(candidates) < batch_size
    return rng.choice(candidates, size=batch_size, replace=replace)
