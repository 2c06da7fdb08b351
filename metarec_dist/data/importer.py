"""``import_file``: one front end (``readers``) -> the core (``domain``) -> the store."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict
from pathlib import Path

from metarec_dist.data.domain import ImportOptions, ImportReport, build_domain
from metarec_dist.data.readers import ColumnNames, read_events, resolve_format
from metarec_dist.data.store import DomainStore, check_domain_name

log = logging.getLogger(__name__)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def default_domain_name(path: Path) -> str:
    """``Beauty.txt`` -> ``Beauty``; ``ml-100k.inter`` -> ``ml-100k``."""
    return path.name.split(".")[0]


def import_file(
    path: Path,
    store: DomainStore,
    name: str | None = None,
    fmt: str | None = None,
    columns: ColumnNames = ColumnNames(),
    options: ImportOptions = ImportOptions(),
    overwrite: bool = False,
) -> ImportReport:
    """Import one interaction file as domain ``name`` (default: the file's stem)."""
    path = Path(path)
    name = check_domain_name(default_domain_name(path) if name is None else name)
    store.check_writable(name, overwrite)  # fail before the (possibly long) read
    fmt = resolve_format(path, fmt)
    events = read_events(path, fmt, columns)
    tables, report = build_domain(events, options, source=str(path))
    meta = {
        "source": {
            "path": str(path.resolve()),
            "format": fmt,
            "sha256": sha256_of(path),
            "columns": asdict(columns) if fmt in ("recbole", "csv", "parquet") else None,
        },
        "import_options": options.model_dump(),
        "report": report.as_dict(),
    }
    store.write(name, tables, meta, overwrite=overwrite)
    log.info("imported %s as '%s': %s", path, name, report.as_dict())
    return report
