"""The domain store: one directory per domain, Parquet tables plus a metadata file.

Layout of ``STORE/NAME/``::

    sequences.parquet  user int32, items list<int32> (chronological)
    users.parquet      user int32 -> original_id string
    items.parquet      item int32 -> original_id string
    meta.json          schema version, counts, source checksum, import options, report

A domain is written into a hidden temporary directory next to its final place
and renamed into place, so a failed import leaves nothing behind and readers
never see half a domain. Reads open one domain's files (memory-mapped) and
nothing else, so a worker can load just the domains it owns.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from metarec_dist.data.domain import DomainTables
from metarec_dist.data.sequences import SequenceView
from metarec_dist.errors import StoreError
from metarec_dist.storage import Location, is_uri, location

SCHEMA_VERSION = 1
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_TABLE_FILES = {"sequences": "sequences.parquet", "users": "users.parquet", "items": "items.parquet"}
_META_FILE = "meta.json"
LENGTH_PERCENTILES = (5, 25, 50, 75, 95, 99)


def check_domain_name(name: str) -> str:
    if not _NAME_PATTERN.match(name):
        raise StoreError(
            f"domain name '{name}' is not allowed; use letters, digits, '.', '_' or '-' "
            "(at most 100 characters, starting with a letter or digit)"
        )
    return name


class DomainStore:
    """A folder of domains: a local path, or a URI (``s3://...``) read through ``pyarrow.fs``.
    Creating the object touches nothing. Remote stores are read-only: import into a local store and
    copy it there (``aws s3 sync STORE s3://BUCKET/STORE``)."""

    def __init__(self, root: Path | str):
        self.root = str(root) if is_uri(root) else Path(root)

    @cached_property
    def location(self) -> Location:
        return location(self.root, "data.store")

    def names(self) -> list[str]:
        """Domains present, sorted. Temporary (dot) directories are not domains."""
        return [name for name in self.location.folders() if not name.startswith(".") and name in self]

    def __contains__(self, name: str) -> bool:
        return self.location.child(name, _META_FILE).is_file()

    def path(self, name: str) -> Path:
        """A domain's folder in a local store (where it is written)."""
        if not isinstance(self.root, Path):
            raise StoreError(f"{self.root}: a remote store is read-only here; import into a local store and copy "
                             "it there (e.g. aws s3 sync STORE s3://BUCKET/STORE)")
        return self.root / check_domain_name(name)

    def check_writable(self, name: str, overwrite: bool) -> Path:
        """The domain's path, or an error if it exists and may not be replaced."""
        final = self.path(name)
        if name in self and not overwrite:
            raise StoreError(
                f"{final}: domain '{name}' already exists in the store; "
                "pass --overwrite to replace it, or choose another --name"
            )
        return final

    def write(self, name: str, tables: DomainTables, meta: dict[str, Any], overwrite: bool = False) -> Path:
        """Write a domain atomically; an existing one is replaced only with ``overwrite``."""
        final = self.check_writable(name, overwrite)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            staging = self.root / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
            staging.mkdir()
        except OSError as error:
            raise StoreError(f"{self.root}: cannot write to the store ({error.strerror}); check the path") from None
        try:
            for key, filename in _TABLE_FILES.items():
                pq.write_table(getattr(tables, key), staging / filename)
            counts = {
                "users": tables.sequences.num_rows,
                "items": tables.items.num_rows,
                "interactions": int(pc.sum(pc.list_value_length(tables.sequences.column("items"))).as_py()),
            }
            full_meta = {"schema_version": SCHEMA_VERSION, "name": name, "counts": counts, **meta}
            (staging / _META_FILE).write_text(json.dumps(full_meta, indent=2, sort_keys=True) + "\n")
            _replace_directory(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return final

    def open(self, name: str) -> StoredDomain:
        """A handle on one domain; its tables are read on first use."""
        check_domain_name(name)
        if name not in self:
            known = ", ".join(self.names()[:10]) or "none"
            raise StoreError(
                f"{self.root}: no domain '{name}' in the store (present: {known}); "
                "import it with 'metarec-dist data import'"
            )
        return StoredDomain(self.location.child(name))


def _replace_directory(staging: Path, final: Path) -> None:
    """Rename ``staging`` to ``final``; an old ``final`` is moved aside first, then removed."""
    if final.exists():
        retired = final.with_name(f".old-{final.name}-{uuid.uuid4().hex[:8]}")
        os.replace(final, retired)
        os.replace(staging, final)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, final)


class StoredDomain:
    """One domain in a store. Tables are read lazily (memory-mapped from a local disk)."""

    def __init__(self, place: Location):
        self.path = place
        self.name = place.name

    @cached_property
    def meta(self) -> dict[str, Any]:
        where = self.path.child(_META_FILE)
        try:
            meta = json.loads(where.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise StoreError(f"{where}: unreadable domain metadata ({error}); re-import") from None
        if meta.get("schema_version") != SCHEMA_VERSION:
            raise StoreError(
                f"{self.path}: store schema version {meta.get('schema_version')} is not "
                f"{SCHEMA_VERSION}; re-import the domain with this version"
            )
        return meta

    def table(self, key: str) -> pa.Table:
        """``sequences``, ``users`` or ``items``."""
        where = self.path.child(_TABLE_FILES[key])
        try:
            return pq.read_table(where.path, filesystem=where.filesystem, memory_map=where.is_local)
        except (OSError, pa.ArrowInvalid) as error:
            raise StoreError(f"{where}: unreadable ({' '.join(str(error).split())}); re-import the domain") from None

    @cached_property
    def sequences(self) -> SequenceView:
        """Every user's chronological item ids; row i is user id i + 1."""
        items = self.table("sequences").column("items").combine_chunks()
        return SequenceView.from_offsets(
            values=items.flatten().to_numpy(zero_copy_only=False).astype(np.int32, copy=False),
            offsets=items.offsets.to_numpy().astype(np.int64),
        )

    @property
    def num_users(self) -> int:
        return int(self.meta["counts"]["users"])

    @property
    def num_items(self) -> int:
        return int(self.meta["counts"]["items"])

    def describe(self) -> dict[str, Any]:
        """Counts, density and sequence-length statistics, computed from the data."""
        sequences = self.table("sequences")
        lengths = pc.list_value_length(sequences.column("items")).to_numpy(zero_copy_only=False)
        items = self.table("items").num_rows
        users = sequences.num_rows
        interactions = int(lengths.sum())
        return {
            "name": self.name,
            "users": users,
            "items": items,
            "interactions": interactions,
            "density": interactions / (users * items),
            "sequence_length": {
                "min": int(lengths.min()),
                "mean": float(lengths.mean()),
                "max": int(lengths.max()),
                **{f"p{p}": float(np.percentile(lengths, p)) for p in LENGTH_PERCENTILES},
            },
            "source": self.meta.get("source", {}),
        }
