"""Format front ends: turn an interaction file into an *events* table.

An events table has one row per interaction, in file order, with columns
``user`` and ``item`` (int64 when every id is an integer, else string) and,
where the format has one, ``timestamp`` (int64 or float64). Everything after
that (ordering, filtering, re-indexing) is the one importer core in
``metarec_dist.data.core``; the readers only parse and check.

All parsing is vectorised with pyarrow's CSV reader and compute kernels: no
Python loop touches individual rows.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from metarec_dist.errors import InputFileError

FORMATS = ("sequence", "recbole", "csv", "parquet")
_EXTENSION_FORMATS = {
    ".txt": "sequence",
    ".inter": "recbole",
    ".csv": "csv",
    ".tsv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}
_PARQUET_MAGIC = b"PAR1"
_CSV_BLOCK_BYTES = 16 << 20  # large blocks: fewer, bigger parallel parse tasks


@dataclass(frozen=True)
class ColumnNames:
    """Which columns hold the user, the item and the time (None: file order)."""

    user: str = "user_id"
    item: str = "item_id"
    timestamp: str | None = "timestamp"


def detect_format(path: Path) -> str:
    """The format implied by the file extension; ask for ``--format`` otherwise."""
    fmt = _EXTENSION_FORMATS.get(path.suffix.lower())
    if fmt is None:
        known = ", ".join(sorted(_EXTENSION_FORMATS))
        raise InputFileError(
            f"{path}: cannot tell the format from the extension '{path.suffix}' "
            f"(known: {known}); pass --format {{{','.join(FORMATS)}}}"
        )
    return fmt


def resolve_format(path: Path, fmt: str | None) -> str:
    """Check that ``path`` is a readable file, then return ``fmt`` or the detected format."""
    if not path.exists():
        raise InputFileError(f"{path}: no such file; check the path")
    if path.is_dir():
        raise InputFileError(f"{path}: is a directory; give the interaction file inside it")
    if not os.access(path, os.R_OK):
        raise InputFileError(f"{path}: permission denied; make the file readable")
    if fmt is None:
        return detect_format(path)
    if fmt not in FORMATS:
        raise InputFileError(f"{path}: unknown format '{fmt}'; use one of {', '.join(FORMATS)}")
    return fmt


def read_events(path: Path, fmt: str | None = None, columns: ColumnNames = ColumnNames()) -> pa.Table:
    """Read ``path`` (format ``fmt``, default from the extension) into an events table."""
    fmt = resolve_format(path, fmt)
    _check_content(path, expect_binary=fmt == "parquet")
    if fmt == "sequence":
        return read_sequence_file(path)
    if fmt == "recbole":
        return read_recbole_inter(path, columns)
    if fmt == "csv":
        return read_csv_file(path, columns)
    return read_parquet_file(path, columns)


def _check_content(path: Path, expect_binary: bool) -> None:
    """Fail early, with the file's name, on what would otherwise crash deep in pyarrow."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(8192)
    except OSError as error:
        raise InputFileError(f"{path}: cannot read ({error.strerror})") from None
    if not head.strip():
        raise InputFileError(f"{path}: the file is empty; nothing to import")
    if expect_binary:
        if not head.startswith(_PARQUET_MAGIC):
            raise InputFileError(f"{path}: not a Parquet file (no PAR1 header); pass the right --format")
    elif b"\x00" in head:
        raise InputFileError(f"{path}: looks like a binary file, not text; pass the right file or --format")


def _arrow_message(error: Exception) -> str:
    """pyarrow's message on one line (it sometimes spans several)."""
    return " ".join(str(error).split())


def _integer_or_string(array: pa.ChunkedArray) -> pa.ChunkedArray:
    """Ids as int64 when every one is an integer (orders numerically), else strings."""
    if pa.types.is_integer(array.type):
        return array.cast(pa.int64())
    try:
        return pc.cast(array, pa.int64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return pc.cast(array, pa.string())


# --- sequence files: "user item item ..." -------------------------------------------


def read_sequence_file(path: Path) -> pa.Table:
    """One user per line, ``user item item ...``, items in chronological order.

    Ids must be non-negative integers. Blank lines are skipped; a line with a
    user id but no items is malformed. Order is the file's order, so the events
    carry no timestamp column.
    """
    try:
        lines = pacsv.read_csv(
            path,
            read_options=pacsv.ReadOptions(column_names=["line"], block_size=_CSV_BLOCK_BYTES),
            # A delimiter that cannot occur in text: every line is one string.
            parse_options=pacsv.ParseOptions(
                delimiter="\x1f", quote_char=False, escape_char=False, ignore_empty_lines=False
            ),
            convert_options=pacsv.ConvertOptions(
                column_types={"line": pa.string()}, strings_can_be_null=False, quoted_strings_can_be_null=False
            ),
        ).column("line")
    except (pa.ArrowInvalid, UnicodeDecodeError) as error:
        raise InputFileError(f"{path}: not a sequence file ({_arrow_message(error)})") from None

    trimmed = pc.utf8_trim_whitespace(lines)
    # Blank lines become nulls, which split into no tokens (not one empty token).
    tokens = pc.utf8_split_whitespace(pc.if_else(pc.equal(trimmed, ""), None, trimmed)).combine_chunks()
    offsets = tokens.offsets.to_numpy().astype(np.int64)
    counts = np.diff(offsets)
    ids = _parse_non_negative_ints(tokens.flatten(), offsets, path)
    lone_user = np.flatnonzero(counts == 1)
    if len(lone_user):
        raise InputFileError(
            f"{path}:{lone_user[0] + 1}: a user id with no items; each line must be 'user item item ...'"
        )

    # The first token of each non-blank line is the user, the rest its items.
    starts, counts = offsets[:-1][counts > 0], counts[counts > 0]
    users = np.repeat(ids[starts], counts - 1)
    is_item = np.ones(len(ids), dtype=bool)
    is_item[starts] = False
    return pa.table({"user": users, "item": ids[is_item]})


def _parse_non_negative_ints(flat: pa.Array, offsets: np.ndarray, path: Path) -> np.ndarray:
    """Tokens as int64; on a bad token name it and its line (cheap check first)."""
    try:
        ids = pc.cast(flat, pa.int64()).to_numpy()
        if len(ids) == 0 or ids.min() >= 0:
            return ids
    except pa.ArrowInvalid:
        pass
    bad = pc.index(pc.match_substring_regex(flat, r"^[0-9]{1,18}$"), False).as_py()
    line = int(np.searchsorted(offsets, bad, side="right"))
    raise InputFileError(
        f"{path}:{line}: '{flat[bad].as_py()[:40]}' is not a non-negative integer id; "
        "sequence files hold integer ids only (use --format csv for other ids)"
    )


# --- RecBole atomic files: typed header "name:type\t..." --------------------------

_RECBOLE_TYPES = {"token": pa.string(), "float": pa.float64(), "token_seq": pa.string(), "float_seq": pa.string()}


def read_recbole_inter(path: Path, columns: ColumnNames) -> pa.Table:
    """A RecBole ``.inter`` file: tab-separated, header ``user_id:token\\titem_id:token\\t...``."""
    with open(path, "rb") as handle:
        header_line = handle.readline().decode("utf-8", errors="replace").rstrip("\r\n")
    names, types = [], []
    for field in header_line.split("\t"):
        name, sep, kind = field.partition(":")
        if not sep or kind not in _RECBOLE_TYPES:
            raise InputFileError(
                f"{path}:1: header field '{field}' is not NAME:TYPE with TYPE in "
                f"{', '.join(_RECBOLE_TYPES)}; is this a RecBole atomic file?"
            )
        names.append(name)
        types.append(_RECBOLE_TYPES[kind])
    wanted = _wanted_columns(path, names, columns, header_line=True)
    try:
        table = pacsv.read_csv(
            path,
            read_options=pacsv.ReadOptions(column_names=names, skip_rows=1, block_size=_CSV_BLOCK_BYTES),
            parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False),
            convert_options=pacsv.ConvertOptions(
                include_columns=list(wanted), column_types=dict(zip(names, types))
            ),
        )
    except (pa.ArrowInvalid, UnicodeDecodeError) as error:
        raise InputFileError(f"{path}: malformed RecBole file ({_arrow_message(error)})") from None
    return _events_from_columns(path, table, wanted, first_data_line=2)


# --- generic CSV / Parquet ----------------------------------------------------------


def read_csv_file(path: Path, columns: ColumnNames) -> pa.Table:
    """A CSV (or TSV, by extension) file with a header row naming its columns."""
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    parse_options = pacsv.ParseOptions(delimiter=delimiter)
    try:
        with pacsv.open_csv(path, parse_options=parse_options) as reader:
            header = reader.schema.names
    except (pa.ArrowInvalid, UnicodeDecodeError) as error:
        raise InputFileError(f"{path}: malformed CSV ({_arrow_message(error)})") from None
    wanted = _wanted_columns(path, header, columns, header_line=True)
    try:
        table = pacsv.read_csv(
            path,
            read_options=pacsv.ReadOptions(block_size=_CSV_BLOCK_BYTES),
            parse_options=parse_options,
            convert_options=pacsv.ConvertOptions(include_columns=list(wanted)),
        )
    except (pa.ArrowInvalid, UnicodeDecodeError) as error:
        raise InputFileError(f"{path}: malformed CSV ({_arrow_message(error)})") from None
    return _events_from_columns(path, table, wanted, first_data_line=2)


def read_parquet_file(path: Path, columns: ColumnNames) -> pa.Table:
    """A Parquet file with user, item and (optionally) timestamp columns."""
    try:
        header = pq.read_schema(path).names
        wanted = _wanted_columns(path, header, columns, header_line=False)
        table = pq.read_table(path, columns=list(wanted), memory_map=True)
    except (pa.ArrowInvalid, OSError) as error:
        raise InputFileError(f"{path}: unreadable Parquet file ({_arrow_message(error)})") from None
    return _events_from_columns(path, table, wanted, first_data_line=0)


def _wanted_columns(path: Path, present: list[str], columns: ColumnNames, header_line: bool) -> dict[str, str]:
    """Map file column -> events column, failing clearly on a missing one."""
    where = f"{path}:1" if header_line else str(path)
    listed = ", ".join(present[:12]) + (" ..." if len(present) > 12 else "")
    wanted = {}
    for role, name, option in (
        ("user", columns.user, "--user-column"),
        ("item", columns.item, "--item-column"),
        ("timestamp", columns.timestamp, "--timestamp-column ('' for file order)"),
    ):
        if name is None:
            continue
        if name not in present:
            raise InputFileError(
                f"{where}: no {role} column '{name}' in the header (columns: {listed}); pass {option}"
            )
        wanted[name] = role
    return wanted


def _events_from_columns(path: Path, table: pa.Table, wanted: dict[str, str], first_data_line: int) -> pa.Table:
    """Rename to user/item/timestamp, check for empty ids, normalise types."""
    events = {}
    for name, role in wanted.items():
        column = table.column(name)
        if column.null_count:
            row = pc.index(pc.is_null(column), True).as_py()
            where = f"{path}:{row + first_data_line}" if first_data_line else f"{path} (row {row})"
            raise InputFileError(f"{where}: empty {role} value in column '{name}'; fill or drop such rows")
        if role == "timestamp":
            events[role] = _numeric_time(path, name, column)
        else:
            events[role] = _integer_or_string(column)
    return pa.table(events)


def _numeric_time(path: Path, name: str, column: pa.ChunkedArray) -> pa.ChunkedArray:
    if pa.types.is_timestamp(column.type) or pa.types.is_date(column.type):
        return column.cast(pa.timestamp("us")).cast(pa.int64())
    if pa.types.is_integer(column.type):
        return column.cast(pa.int64())
    if pa.types.is_floating(column.type):
        return column.cast(pa.float64())
    try:
        return pc.cast(column, pa.float64())
    except pa.ArrowInvalid:
        raise InputFileError(
            f"{path}: timestamp column '{name}' holds non-numeric values; "
            "use numbers or ISO dates, or --timestamp-column '' for file order"
        ) from None
