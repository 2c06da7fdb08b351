"""The importer core: events table -> a domain's sequences and id maps.

Every front end (sequence text, RecBole atomic, CSV, Parquet, the synthetic
generator) produces an *events* table (see ``readers``) and hands it here, so
ordering, filtering and re-indexing exist exactly once. The work is vectorised
with numpy over integer codes; no Python loop runs per row or per user.

Order of operations, each counted in the ``ImportReport``:
1. drop exact duplicate events (same user, item and timestamp; formats without
   timestamps have none, since an event's time there is its position);
2. k-core filtering (iterated until every user and item has >= k events);
3. chronological order per user (timestamp, ties broken by file order);
4. truncation to the most recent ``max_sequence_length`` events;
5. the minimum-length filter (leave-one-out needs 3 events per user);
6. re-indexing users and items to 1..N (0 is padding), in the sorted order of
   their original ids (numeric when every id is an integer).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, model_validator

from metarec_dist.config import StrictModel
from metarec_dist.errors import InputFileError

LEAVE_ONE_OUT_MIN_LENGTH = 3  # training input, validation item, test item


class ImportOptions(StrictModel):
    """How raw interactions become a domain."""

    k_core: int = Field(0, ge=0, description="keep users and items with >= k events (0: off)")
    min_sequence_length: int = Field(
        LEAVE_ONE_OUT_MIN_LENGTH, ge=LEAVE_ONE_OUT_MIN_LENGTH, description="drop shorter users"
    )
    max_sequence_length: int | None = Field(None, ge=LEAVE_ONE_OUT_MIN_LENGTH, description="keep the most recent")
    reindex: bool = Field(True, description="map ids to 1..N; off keeps positive integer ids as they are")
    drop_duplicates: bool = Field(True, description="drop exact duplicate (user, item, timestamp) events")

    @model_validator(mode="after")
    def _max_not_below_min(self) -> ImportOptions:
        if self.max_sequence_length is not None and self.max_sequence_length < self.min_sequence_length:
            raise ValueError(
                f"max_sequence_length ({self.max_sequence_length}) is below "
                f"min_sequence_length ({self.min_sequence_length})"
            )
        return self


@dataclass(frozen=True)
class DomainTables:
    """A domain as the store keeps it.

    sequences: ``user`` int32, ``items`` list<int32> (chronological), one row
        per user, ordered by user id.
    users / items: ``user`` or ``item`` int32 id -> ``original_id`` string.
    """

    sequences: pa.Table
    users: pa.Table
    items: pa.Table


@dataclass(frozen=True)
class ImportReport:
    """What the import kept and dropped, by step."""

    raw_interactions: int
    duplicates_dropped: int
    k_core_dropped: int
    truncated: int
    short_users_dropped: int
    short_interactions_dropped: int
    users: int
    items: int
    interactions: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def build_domain(events: pa.Table, options: ImportOptions, source: str) -> tuple[DomainTables, ImportReport]:
    """Order, filter and re-index ``events``; ``source`` names the input in errors."""
    num_events = events.num_rows
    if num_events == 0:
        raise InputFileError(f"{source}: holds no interactions; nothing to import")
    user_codes, user_keys = _sorted_codes(events.column("user"))
    item_codes, item_keys = _sorted_codes(events.column("item"))
    time = events.column("timestamp").to_numpy() if "timestamp" in events.column_names else None
    keep = np.ones(num_events, dtype=bool)
    chronological = _chronological_order(user_codes, time)  # sorted once, filtered below

    duplicates = 0
    if options.drop_duplicates and time is not None:
        duplicates = _mark_duplicates(chronological, user_codes, item_codes, time, keep)

    k_core_dropped = 0
    if options.k_core > 1:
        before = int(keep.sum())
        _k_core(user_codes, item_codes, keep, options.k_core, len(user_keys), len(item_keys))
        k_core_dropped = before - int(keep.sum())

    rows = chronological[keep[chronological]]
    users_of_rows = user_codes[rows]
    per_user = np.bincount(users_of_rows, minlength=len(user_keys))
    position = np.arange(len(rows)) - (np.cumsum(per_user) - per_user)[users_of_rows]

    truncated = 0
    if options.max_sequence_length is not None:
        recent = position >= per_user[users_of_rows] - options.max_sequence_length
        truncated = int(len(rows) - recent.sum())
        rows, users_of_rows = rows[recent], users_of_rows[recent]
        per_user = np.minimum(per_user, options.max_sequence_length)

    too_short = (per_user > 0) & (per_user < options.min_sequence_length)
    long_enough = ~too_short[users_of_rows]
    short_interactions = int(len(rows) - long_enough.sum())
    rows = rows[long_enough]
    if len(rows) == 0:
        raise InputFileError(
            f"{source}: no users left after filtering (k_core={options.k_core}, "
            f"min_sequence_length={options.min_sequence_length}); lower the thresholds"
        )

    user_ids, user_table = _id_map(user_codes[rows], user_keys, "user", options.reindex, source)
    item_ids, item_table = _id_map(item_codes[rows], item_keys, "item", options.reindex, source)
    # Rows are grouped by user code, and ids increase with codes: one list per user.
    user_starts = np.flatnonzero(np.r_[True, user_ids[1:] != user_ids[:-1]])
    offsets = np.r_[user_starts, len(rows)].astype(np.int32)
    sequences = pa.table(
        {
            "user": pa.array(user_ids[user_starts], pa.int32()),
            "items": pa.ListArray.from_arrays(pa.array(offsets), pa.array(item_ids, pa.int32())),
        }
    )
    report = ImportReport(
        raw_interactions=num_events,
        duplicates_dropped=duplicates,
        k_core_dropped=k_core_dropped,
        truncated=truncated,
        short_users_dropped=int(too_short.sum()),
        short_interactions_dropped=short_interactions,
        users=sequences.num_rows,
        items=item_table.num_rows,
        interactions=len(rows),
    )
    return DomainTables(sequences=sequences, users=user_table, items=item_table), report


def _sorted_codes(column: pa.ChunkedArray) -> tuple[np.ndarray, pa.Array]:
    """Dense int64 codes whose order is the sorted order of the distinct ids."""
    encoded = column.combine_chunks().dictionary_encode()
    keys = encoded.dictionary
    order = pc.sort_indices(keys).to_numpy()
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    return rank[encoded.indices.to_numpy(zero_copy_only=False)], keys.take(pa.array(order))


def _mark_duplicates(order: np.ndarray, users, items, time, keep: np.ndarray) -> int:
    """Clear ``keep`` for every repeat of an earlier identical (user, item, time) event.

    ``order`` is the chronological order, so identical events sit in runs of equal
    (user, time); only those runs (few, in practice) are sorted again, by item.
    """
    sorted_users, sorted_time = users[order], time[order]
    tied = (sorted_users[1:] == sorted_users[:-1]) & (sorted_time[1:] == sorted_time[:-1])
    if not tied.any():
        return 0
    in_run = np.r_[tied, False] | np.r_[False, tied]
    run_id = np.cumsum(~np.r_[False, tied])[in_run]  # same id within a run of equal (user, time)
    rows = order[in_run]
    by_item = np.lexsort((rows, items[rows], run_id))  # within a run: by item, file order first
    rows, run_id = rows[by_item], run_id[by_item]
    repeat = (run_id[1:] == run_id[:-1]) & (items[rows[1:]] == items[rows[:-1]])
    keep[rows[1:][repeat]] = False
    return int(repeat.sum())


def _k_core(users, items, keep, k: int, num_users: int, num_items: int) -> None:
    """Iteratively clear ``keep`` until every kept user and item has >= k events."""
    while True:
        user_counts = np.bincount(users[keep], minlength=num_users)
        item_counts = np.bincount(items[keep], minlength=num_items)
        weak = keep & ((user_counts[users] < k) | (item_counts[items] < k))
        if not weak.any():
            return
        keep &= ~weak


def _chronological_order(users: np.ndarray, time: np.ndarray | None) -> np.ndarray:
    """Row indices grouped by user, by time within a user, file order on ties (stable sorts)."""
    rows = np.arange(len(users))
    if time is not None:
        rows = np.argsort(time, kind="stable")
    return rows[np.argsort(users[rows], kind="stable")]


def _id_map(codes: np.ndarray, keys: pa.Array, role: str, reindex: bool, source: str) -> tuple[np.ndarray, pa.Table]:
    """Final ids for ``codes`` and the id -> original id table of the ids in use."""
    used = np.bincount(codes, minlength=len(keys)) > 0
    used_keys = keys.filter(pa.array(used))
    if reindex:
        new_id = np.cumsum(used)  # 1..N over used codes, in key order
        ids = new_id[codes]
        table_ids = np.arange(1, int(used.sum()) + 1)
    else:
        if not pa.types.is_integer(keys.type) or pc.min(used_keys).as_py() < 1:
            raise InputFileError(
                f"{source}: {role} ids must be positive integers to keep them without re-indexing; "
                "drop --no-reindex"
            )
        if pc.max(used_keys).as_py() > np.iinfo(np.int32).max:
            raise InputFileError(f"{source}: {role} ids exceed int32; drop --no-reindex")
        ids = keys.to_numpy()[codes]
        table_ids = used_keys.to_numpy()
    table = pa.table({role: pa.array(table_ids, pa.int32()), "original_id": pc.cast(used_keys, pa.string())})
    return ids, table
