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

    def flat_rows(self, rows: np.ndarray, last: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The items of ``rows`` (each cut to its ``last`` items), flattened, without a Python loop.

        Returns ``(row_index, position, items)``: for every item, the index into
        ``rows`` it belongs to, its position within that row's (cut) sequence, and
        the item id.
        """
        rows = np.asarray(rows, dtype=np.int64)
        ends = self.ends[rows]
        starts = self.starts[rows] if last is None else np.maximum(self.starts[rows], ends - last)
        counts = ends - starts
        row_index = np.repeat(np.arange(len(rows)), counts)
        position = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        return row_index, position, self.values[starts[row_index] + position]

