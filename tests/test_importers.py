"""Every front end on the real files in ../shared/data, and their agreement."""

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from metarec_dist.data.importer import import_file, sha256_of
from metarec_dist.data.readers import ColumnNames, read_events

# From ../shared/data/README.md
SEQUENCE_FILES = [
    ("Beauty.txt", 22_363, 12_101, 198_502, 6, 204),
    ("Sports_and_Outdoors.txt", 35_598, 18_357, 296_337, 6, 296),
    ("Toys_and_Games.txt", 19_412, 11_924, 167_597, 6, 550),
    ("Yelp.txt", 30_431, 20_033, 316_354, 7, 350),
    ("LastFM.txt", 1_090, 3_646, 52_551, 19, 899),
]


@pytest.mark.parametrize("filename,users,items,interactions,median,longest", SEQUENCE_FILES)
def test_sequence_file_import_matches_published_counts(
    shared_data, store, filename, users, items, interactions, median, longest
):
    report = import_file(shared_data / filename, store)
    assert (report.users, report.items, report.interactions) == (users, items, interactions)
    stats = store.open(filename.split(".")[0]).describe()
    assert (stats["users"], stats["items"], stats["interactions"]) == (users, items, interactions)
    assert stats["sequence_length"]["p50"] == median
    assert stats["sequence_length"]["max"] == longest


def test_sequence_import_keeps_file_order_and_original_ids(shared_data, store):
    import_file(shared_data / "Beauty.txt", store)
    domain = store.open("Beauty")
    first_line = (shared_data / "Beauty.txt").read_text().splitlines()[0].split()
    user_map = domain.table("users").to_pydict()
    item_map = dict(zip(*domain.table("items").to_pydict().values()))
    row = user_map["original_id"].index(first_line[0])
    sequence = domain.sequences.row(row)
    assert [item_map[int(item)] for item in sequence] == first_line[1:]


def test_import_records_source_checksum_and_options(shared_data, store):
    import_file(shared_data / "LastFM.txt", store)
    meta = store.open("LastFM").meta
    assert meta["source"]["sha256"] == "9ded486adb5b0fe9dc761950afa0a9a05e93ff018992e0c52bf11afec529f802"
    assert meta["source"]["sha256"] == sha256_of(shared_data / "LastFM.txt")
    assert meta["import_options"]["min_sequence_length"] == 3
    assert meta["counts"] == {"users": 1_090, "items": 3_646, "interactions": 52_551}
    assert meta["schema_version"] == 1


def test_recbole_import_counts_and_timestamp_order(shared_data, store):
    path = shared_data / "ml-100k" / "ml-100k.inter"
    report = import_file(path, store)
    assert (report.users, report.items, report.interactions) == (943, 1_682, 100_000)

    # Reference: plain Python, ordered by (timestamp, row) per user.
    rows = [line.split("\t") for line in path.read_text().splitlines()[1:]]
    expected: dict[str, list[tuple[float, int, str]]] = {}
    for index, (user, item, _rating, timestamp) in enumerate(rows):
        expected.setdefault(user, []).append((float(timestamp), index, item))
    domain = store.open("ml-100k")
    users = domain.table("users").column("original_id").to_pylist()
    items = domain.table("items").column("original_id").to_pylist()
    for row in (0, 1, 500, 942):
        got = [items[item - 1] for item in domain.sequences.row(row)]
        assert got == [item for _, _, item in sorted(expected[users[row]])]


def test_recbole_ties_keep_file_order(tmp_path, store):
    path = tmp_path / "ties.inter"
    path.write_text(
        "user_id:token\titem_id:token\ttimestamp:float\n"
        "u1\tc\t5\nu1\ta\t5\nu1\tb\t1\nu1\td\t5\n"
    )
    import_file(path, store)
    domain = store.open("ties")
    items = domain.table("items").column("original_id").to_pylist()
    assert [items[i - 1] for i in domain.sequences.row(0)] == ["b", "c", "a", "d"]


def test_csv_and_parquet_front_ends_agree_with_recbole(shared_data, tmp_path, store):
    """One core: the same events through three front ends give the same domain."""
    inter = shared_data / "ml-100k" / "ml-100k.inter"
    import_file(inter, store, name="via-recbole")
    table = pacsv.read_csv(
        inter,
        read_options=pacsv.ReadOptions(skip_rows=1, column_names=["user", "item", "rating", "time"]),
        parse_options=pacsv.ParseOptions(delimiter="\t"),
    )
    csv_path, parquet_path = tmp_path / "ml.csv", tmp_path / "ml.parquet"
    pacsv.write_csv(table, csv_path)
    pq.write_table(table, parquet_path)
    columns = ColumnNames(user="user", item="item", timestamp="time")
    import_file(csv_path, store, name="via-csv", columns=columns)
    import_file(parquet_path, store, name="via-parquet", columns=columns)
    reference = store.open("via-recbole")
    for name in ("via-csv", "via-parquet"):
        other = store.open(name)
        assert np.array_equal(other.sequences.values, reference.sequences.values)
        assert np.array_equal(other.sequences.starts, reference.sequences.starts)
        assert other.table("items").equals(reference.table("items"))


def test_csv_without_timestamp_uses_file_order(tmp_path, store):
    path = tmp_path / "plain.csv"
    path.write_text("who,what\nbob,z\nbob,y\nann,x\nbob,x\nann,y\nann,z\n")
    import_file(path, store, columns=ColumnNames(user="who", item="what", timestamp=None))
    domain = store.open("plain")
    assert domain.table("users").column("original_id").to_pylist() == ["ann", "bob"]
    items = domain.table("items").column("original_id").to_pylist()
    assert [items[i - 1] for i in domain.sequences.row(1)] == ["z", "y", "x"]


def test_csv_iso_dates_are_ordered_chronologically(tmp_path, store):
    path = tmp_path / "dates.csv"
    path.write_text("user_id,item_id,timestamp\n1,10,2024-03-01\n1,11,2023-01-05\n1,12,2024-01-01\n")
    import_file(path, store)
    domain = store.open("dates")
    items = domain.table("items").column("original_id").to_pylist()
    assert [items[i - 1] for i in domain.sequences.row(0)] == ["11", "12", "10"]


def test_integer_ids_are_reindexed_in_numeric_order(tmp_path, store):
    path = tmp_path / "numeric.txt"
    path.write_text("7 100 9 20\n3 9 20 100\n")
    import_file(path, store)
    domain = store.open("numeric")
    assert domain.table("users").column("original_id").to_pylist() == ["3", "7"]
    assert domain.table("items").column("original_id").to_pylist() == ["9", "20", "100"]
    assert domain.sequences.row(0).tolist() == [1, 2, 3]
    assert domain.sequences.row(1).tolist() == [3, 1, 2]


def test_reader_events_are_in_file_order(tmp_path):
    path = tmp_path / "s.txt"
    path.write_text("5 1 2 3\n\n4 9 8 7\n")
    events = read_events(path, "sequence")
    assert events.to_pydict() == {"user": [5, 5, 5, 4, 4, 4], "item": [1, 2, 3, 9, 8, 7]}
    assert events.schema.field("user").type == pa.int64()
