"""``SequenceView``: ragged integer sequences as numpy, without copies."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SequenceView:
    """Row i is ``values[starts[i]:ends[i]]``; rows may be empty.

    Several views (a domain's full sequences, its training prefixes, its test
    histories) share one ``values`` array and differ only in starts and ends.
    """

    values: np.ndarray  # int32 item ids
    starts: np.ndarray  # int64
    ends: np.ndarray  # int64

    @classmethod
    def from_offsets(cls, values: np.ndarray, offsets: np.ndarray) -> SequenceView:
        return cls(values, offsets[:-1], offsets[1:])

    def __len__(self) -> int:
        return len(self.starts)

    @property
    def lengths(self) -> np.ndarray:
        return self.ends - self.starts

    def row(self, index: int) -> np.ndarray:
        return self.values[self.starts[index] : self.ends[index]]

    def nonempty_rows(self) -> np.ndarray:
        return np.flatnonzero(self.ends > self.starts)
