"""The importer core's options, on small hand-made event tables."""

import numpy as np
import pyarrow as pa
import pytest

from metarec_dist.config import build_config
from metarec_dist.data.domain import ImportOptions, build_domain
from metarec_dist.errors import ConfigError, InputFileError


def events(users, items, timestamps=None):
    columns = {"user": pa.array(users, pa.int64()), "item": pa.array(items, pa.int64())}
    if timestamps is not None:
        columns["timestamp"] = pa.array(timestamps, pa.int64())
    return pa.table(columns)


def sequences_of(tables):
    items = tables.items.column("original_id").to_pylist()
    users = tables.users.column("original_id").to_pylist()
    return {
        users[row]: [int(items[i - 1]) for i in seq]
        for row, seq in enumerate(tables.sequences.column("items").to_pylist())
    }


def test_k_core_leaves_every_user_and_item_with_at_least_k_events():
    rng = np.random.default_rng(0)
    users = rng.integers(0, 300, 5_000)
    items = (rng.zipf(1.5, 5_000) % 400).astype(np.int64)
    tables, report = build_domain(events(users, items), ImportOptions(k_core=5), "test")
    seqs = tables.sequences.column("items").to_pylist()
    assert min(len(s) for s in seqs) >= 5
    counts = np.bincount(np.concatenate(seqs))
    assert counts[1:].min() >= 5
    assert report.k_core_dropped > 0
    assert report.interactions == 5_000 - report.k_core_dropped


def test_k_core_iterates_until_stable():
    # k=3: item 5 is rare -> user 4 falls to 2 events -> item 4 then has 1 event.
    users = [1, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]
    items = [1, 2, 3, 4, 1, 2, 3, 1, 2, 3, 4, 4, 5]
    tables, report = build_domain(events(users, items), ImportOptions(k_core=3), "test")
    assert sequences_of(tables) == {"1": [1, 2, 3], "2": [1, 2, 3], "3": [1, 2, 3]}
    assert report.k_core_dropped == 4


def test_minimum_length_drops_short_users_and_counts_them():
    users = [1, 1, 1, 2, 2, 3, 3, 3, 3]
    items = [1, 2, 3, 1, 2, 4, 5, 6, 7]
    tables, report = build_domain(events(users, items), ImportOptions(), "test")
    assert set(sequences_of(tables)) == {"1", "3"}
    assert report.short_users_dropped == 1
    assert report.short_interactions_dropped == 2
    assert report.interactions == 7


def test_empty_domain_after_filtering_is_an_error():
    with pytest.raises(InputFileError, match="no users left after filtering"):
        build_domain(events([1, 1, 2, 2], [1, 2, 1, 2]), ImportOptions(), "tiny.csv")


def test_maximum_length_keeps_the_most_recent_events():
    users = [1] * 6 + [2] * 3
    items = [10, 11, 12, 13, 14, 15, 20, 21, 22]
    times = [6, 5, 4, 3, 2, 1, 1, 2, 3]  # user 1's file order is reversed in time
    tables, report = build_domain(events(users, items, times), ImportOptions(max_sequence_length=4), "t")
    assert sequences_of(tables) == {"1": [13, 12, 11, 10], "2": [20, 21, 22]}
    assert report.truncated == 2


def test_exact_duplicates_are_dropped_but_repeats_at_other_times_kept():
    users = [1, 1, 1, 1, 1]
    items = [5, 5, 6, 5, 7]
    times = [1, 1, 2, 3, 4]
    tables, report = build_domain(events(users, items, times), ImportOptions(), "t")
    assert sequences_of(tables) == {"1": [5, 6, 5, 7]}
    assert report.duplicates_dropped == 1
    kept, _ = build_domain(events(users, items, times), ImportOptions(drop_duplicates=False), "t")
    assert sequences_of(kept) == {"1": [5, 5, 6, 5, 7]}


def test_reindexing_gives_contiguous_ids_from_one_and_maps_back():
    users = [40, 40, 40, 7, 7, 7]
    items = [900, 30, 5000, 30, 30, 900]
    tables, _ = build_domain(events(users, items, [1, 2, 3, 1, 2, 3]), ImportOptions(), "t")
    assert tables.items.column("item").to_pylist() == [1, 2, 3]
    assert tables.items.column("original_id").to_pylist() == ["30", "900", "5000"]
    assert tables.sequences.column("user").to_pylist() == [1, 2]
    assert tables.sequences.column("items").to_pylist() == [[1, 1, 2], [2, 1, 3]]


def test_without_reindexing_original_integer_ids_are_kept():
    tables, _ = build_domain(events([3, 3, 3], [4, 9, 2]), ImportOptions(reindex=False), "t")
    assert tables.sequences.column("items").to_pylist() == [[4, 9, 2]]
    assert tables.sequences.column("user").to_pylist() == [3]


def test_without_reindexing_string_ids_are_rejected():
    table = pa.table({"user": ["a", "a", "a"], "item": ["x", "y", "z"]})
    with pytest.raises(InputFileError, match="positive integers"):
        build_domain(table, ImportOptions(reindex=False), "t.csv")


@pytest.mark.parametrize(
    "values,field",
    [
        ({"min_sequence_length": 2}, "min_sequence_length"),
        ({"k_core": -1}, "k_core"),
        ({"max_sequence_length": 4, "min_sequence_length": 5}, "max_sequence_length"),
        ({"k_cores": 3}, "k_cores"),
    ],
)
def test_impossible_import_options_name_the_field(values, field):
    with pytest.raises(ConfigError, match=field):
        build_config(ImportOptions, values, "command line")


def test_duplicates_separated_by_other_events_at_the_same_time_are_found():
    users = [1, 1, 1, 1, 2, 2, 2]
    items = [5, 6, 5, 7, 5, 6, 5]
    times = [1, 1, 1, 2, 1, 2, 3]
    tables, report = build_domain(events(users, items, times), ImportOptions(), "t")
    assert sequences_of(tables) == {"1": [5, 6, 7], "2": [5, 6, 5]}
    assert report.duplicates_dropped == 1
