"""Leave-one-out splits and the limited-target view."""

import numpy as np
import pytest

from metarec_dist.data.importer import import_file
from metarec_dist.data.sequences import SequenceView
from metarec_dist.data.splits import leave_one_out, limit_target, limited_target_users
from metarec_dist.errors import ConfigError, StoreError


def view(rows):
    values = np.concatenate([np.asarray(r, np.int32) for r in rows])
    offsets = np.r_[0, np.cumsum([len(r) for r in rows])].astype(np.int64)
    return SequenceView.from_offsets(values, offsets)


def test_leave_one_out_holds_out_the_last_two_items():
    split = leave_one_out(view([[1, 2, 3, 4, 5], [7, 8, 9]]))
    assert split.train.row(0).tolist() == [1, 2, 3]
    assert split.valid_history.row(0).tolist() == [1, 2, 3]
    assert split.valid_item.tolist() == [4, 8]
    assert split.test_history.row(0).tolist() == [1, 2, 3, 4]
    assert split.test_item.tolist() == [5, 9]
    assert split.train.row(1).tolist() == [7]
    assert split.test_history.row(1).tolist() == [7, 8]


def test_held_out_positions_never_enter_training_input_on_real_data(shared_data, store):
    import_file(shared_data / "Beauty.txt", store)
    sequences = store.open("Beauty").sequences
    split = leave_one_out(sequences)
    # Training input of each user ends strictly before the validation position.
    assert np.all(split.train.ends == sequences.ends - 2)
    assert np.all(split.train.ends <= split.train.starts + sequences.lengths - 2)
    assert np.array_equal(split.valid_item, sequences.values[sequences.ends - 2])
    assert np.array_equal(split.test_item, sequences.values[sequences.ends - 1])
    assert split.train.lengths.sum() == 198_502 - 2 * 22_363


def test_too_short_sequences_cannot_be_split():
    with pytest.raises(StoreError, match="needs 3"):
        leave_one_out(view([[1, 2, 3], [4, 5]]))


@pytest.mark.parametrize("fraction,expected", [(0.05, 1118), (0.10, 2236), (0.25, 5591), (1.0, 22363)])
def test_limited_target_keeps_an_exact_fraction_of_users(fraction, expected):
    assert len(limited_target_users(22_363, fraction, seed=0)) == expected


def test_limited_target_is_seeded_and_nested():
    a = limited_target_users(1000, 0.1, seed=3)
    assert np.array_equal(a, limited_target_users(1000, 0.1, seed=3))
    assert not np.array_equal(a, limited_target_users(1000, 0.1, seed=4))
    assert set(a) <= set(limited_target_users(1000, 0.25, seed=3))


def test_limited_target_view_keeps_evaluation_for_every_user(shared_data, store):
    import_file(shared_data / "LastFM.txt", store)
    full = leave_one_out(store.open("LastFM").sequences)
    limited = limit_target(full, 0.1, seed=0)
    kept = limited_target_users(full.num_users, 0.1, seed=0)
    assert np.array_equal(limited.training_users, kept)
    assert len(kept) == 109
    assert limited.train.lengths[kept].tolist() == full.train.lengths[kept].tolist()
    assert limited.train.lengths.sum() == full.train.lengths[kept].sum()
    # Validation and test still cover every user, with full histories.
    assert np.array_equal(limited.valid_item, full.valid_item)
    assert np.array_equal(limited.test_history.lengths, full.test_history.lengths)


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_limited_target_fraction_outside_zero_one_is_rejected(fraction):
    with pytest.raises(ConfigError, match="limited_target_fraction"):
        limited_target_users(100, fraction, seed=0)
