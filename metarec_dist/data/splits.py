"""Chronological leave-one-out splits and the limited-target view.

Per user, with items ``s_1 .. s_n`` in time order (n >= 3):
- training sequence: ``s_1 .. s_{n-2}``;
- validation: history ``s_1 .. s_{n-2}``, held-out item ``s_{n-1}``;
- test: history ``s_1 .. s_{n-1}``, held-out item ``s_n``.

Histories are what the model reads at evaluation time, not training data: in
the limited-target view only a seeded fraction of the target's users keep
their training sequence, while validation and test still cover every user.

Everything is a view over one values array (start/end indices per user), so a
split costs two int64 arrays per view, not a copy of the data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from metarec_dist.data.domain import LEAVE_ONE_OUT_MIN_LENGTH
from metarec_dist.data.sequences import SequenceView
from metarec_dist.errors import ConfigError, StoreError


@dataclass(frozen=True)
class LeaveOneOutSplit:
    """One domain's split; arrays are indexed by user row (user id - 1)."""

    train: SequenceView
    valid_history: SequenceView
    valid_item: np.ndarray
    test_history: SequenceView
    test_item: np.ndarray

    @property
    def num_users(self) -> int:
        return len(self.valid_item)

    @property
    def training_users(self) -> np.ndarray:
        """Rows whose training sequence is non-empty."""
        return self.train.nonempty_rows()


def leave_one_out(sequences: SequenceView) -> LeaveOneOutSplit:
    """Split every user chronologically: last item test, second last validation."""
    lengths = sequences.lengths
    if len(lengths) and lengths.min() < LEAVE_ONE_OUT_MIN_LENGTH:
        row = int(np.argmin(lengths))
        raise StoreError(
            f"user row {row} has {lengths[row]} items; leave-one-out needs "
            f"{LEAVE_ONE_OUT_MIN_LENGTH} (re-import with the default min_sequence_length)"
        )
    starts, ends, values = sequences.starts, sequences.ends, sequences.values
    return LeaveOneOutSplit(
        train=SequenceView(values, starts, ends - 2),
        valid_history=SequenceView(values, starts, ends - 2),
        valid_item=values[ends - 2],
        test_history=SequenceView(values, starts, ends - 1),
        test_item=values[ends - 1],
    )


def limited_target_users(num_users: int, fraction: float, seed: int) -> np.ndarray:
    """The sorted rows of the users who keep training data: ``round(fraction * num_users)``.

    One seeded permutation is cut at the requested size, so for a given seed a
    smaller fraction's users are a subset of a larger fraction's.
    """
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"limited_target_fraction={fraction}: must be in (0, 1]")
    count = max(1, round(fraction * num_users))
    permutation = np.random.default_rng(seed).permutation(num_users)
    return np.sort(permutation[:count])


def limit_target(split: LeaveOneOutSplit, fraction: float, seed: int) -> LeaveOneOutSplit:
    """The limited-target view: training sequences of a seeded user fraction only."""
    kept = limited_target_users(split.num_users, fraction, seed)
    ends = split.train.starts.copy()  # empty rows ...
    ends[kept] = split.train.ends[kept]  # ... except the kept users'
    return LeaveOneOutSplit(
        train=SequenceView(split.train.values, split.train.starts, ends),
        valid_history=split.valid_history,
        valid_item=split.valid_item,
        test_history=split.test_history,
        test_item=split.test_item,
    )
