"""Fixed-shape batches from ragged sequences."""

import numpy as np

from metarec_dist.data.batches import left_padded, next_item_batch
from metarec_dist.data.sequences import SequenceView

VIEW = SequenceView.from_offsets(np.array([1, 2, 3, 4, 5, 6, 7, 8], np.int32), np.array([0, 5, 5, 8]))


def test_left_padding_keeps_the_most_recent_items_right_aligned():
    assert left_padded(VIEW, np.array([0, 1, 2]), 4).tolist() == [[2, 3, 4, 5], [0, 0, 0, 0], [0, 6, 7, 8]]


def test_next_item_targets_are_inputs_shifted_by_one_and_padding_has_none():
    batch = next_item_batch(VIEW, np.array([0, 2]), 4)
    assert batch.inputs.tolist() == [[1, 2, 3, 4], [0, 0, 6, 7]]
    assert batch.targets.tolist() == [[2, 3, 4, 5], [0, 0, 7, 8]]


def test_batches_are_only_as_long_as_their_longest_sequence():
    batch = next_item_batch(VIEW, np.array([2]), 10)
    assert batch.inputs.tolist() == [[6, 7]] and batch.targets.tolist() == [[7, 8]]
