"""The Parquet domain store: atomic writes, no clobbering, per-domain reads."""

import json

import pyarrow.parquet as pq
import pytest

from metarec_dist.data.importer import import_file
from metarec_dist.data.store import DomainStore
from metarec_dist.errors import InputFileError, StoreError


def write_sequences(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_domain_directory_holds_parquet_tables_and_metadata(tmp_path, store):
    import_file(write_sequences(tmp_path / "d.txt", ["1 1 2 3", "2 3 2 1"]), store)
    files = sorted(p.name for p in (store.root / "d").iterdir())
    assert files == ["items.parquet", "meta.json", "sequences.parquet", "users.parquet"]
    schema = pq.read_schema(store.root / "d" / "sequences.parquet")
    assert str(schema.field("items").type) == "list<element: int32>"
    assert str(schema.field("user").type) == "int32"
    assert json.loads((store.root / "d" / "meta.json").read_text())["counts"]["interactions"] == 6


def test_existing_domain_is_not_replaced_without_overwrite(tmp_path, store):
    import_file(write_sequences(tmp_path / "d.txt", ["1 1 2 3"]), store)
    write_sequences(tmp_path / "d.txt", ["1 4 5 6 7"])
    with pytest.raises(StoreError, match="already exists.*--overwrite"):
        import_file(tmp_path / "d.txt", store)
    assert store.open("d").describe()["interactions"] == 3
    import_file(tmp_path / "d.txt", store, overwrite=True)
    assert store.open("d").describe()["interactions"] == 4


def test_failed_import_leaves_no_partial_domain(tmp_path, store):
    import_file(write_sequences(tmp_path / "good.txt", ["1 1 2 3"]), store)
    with pytest.raises(InputFileError):
        import_file(write_sequences(tmp_path / "bad.txt", ["1 1 2 3", "2 x 3 4"]), store)
    assert sorted(p.name for p in store.root.iterdir()) == ["good"]


def test_failure_while_writing_keeps_the_previous_domain(tmp_path, store, monkeypatch):
    import_file(write_sequences(tmp_path / "d.txt", ["1 1 2 3"]), store)
    calls = []

    def failing_write(table, where, *args, **kwargs):
        calls.append(where)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_write(table, where, *args, **kwargs)

    real_write = pq.write_table
    monkeypatch.setattr(pq, "write_table", failing_write)
    write_sequences(tmp_path / "d.txt", ["1 4 5 6 7"])
    with pytest.raises(OSError):
        import_file(tmp_path / "d.txt", store, overwrite=True)
    monkeypatch.undo()
    assert sorted(p.name for p in store.root.iterdir()) == ["d"]  # no staging directory left
    assert store.open("d").describe()["interactions"] == 3


def test_opening_one_domain_reads_no_other(tmp_path, store):
    import_file(write_sequences(tmp_path / "a.txt", ["1 1 2 3"]), store)
    import_file(write_sequences(tmp_path / "b.txt", ["1 1 2 3"]), store)
    for path in (store.root / "b").iterdir():
        path.write_bytes(b"corrupt")  # any read of b would fail
    domain = store.open("a")
    assert domain.sequences.row(0).tolist() == [1, 2, 3]
    assert domain.describe()["users"] == 1


def test_store_lists_only_complete_domains(tmp_path, store):
    import_file(write_sequences(tmp_path / "a.txt", ["1 1 2 3"]), store)
    (store.root / ".tmp-b-1234").mkdir()
    (store.root / "not-a-domain").mkdir()
    assert store.names() == ["a"]
    assert DomainStore(tmp_path / "missing").names() == []


def test_missing_domain_error_lists_what_is_there(tmp_path, store):
    import_file(write_sequences(tmp_path / "a.txt", ["1 1 2 3"]), store)
    with pytest.raises(StoreError, match="no domain 'zzz'.*present: a"):
        store.open("zzz")


@pytest.mark.parametrize("name", ["../escape", "a/b", ".hidden", "", "x" * 101])
def test_unsafe_domain_names_are_rejected(tmp_path, store, name):
    with pytest.raises(StoreError, match="not allowed"):
        import_file(write_sequences(tmp_path / "a.txt", ["1 1 2 3"]), store, name=name)


def test_store_under_a_file_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreError, match="cannot write to the store"):
        import_file(write_sequences(tmp_path / "a.txt", ["1 1 2 3"]), DomainStore(blocker / "store"))
