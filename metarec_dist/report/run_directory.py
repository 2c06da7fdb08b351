"""Run directories: created new (never reused), files written atomically.

A run directory holds ``config.yaml`` (the resolved config), ``train.log``,
``results.json``, ``model.pt`` (a plain tensor state dict, loadable with
``torch.load(..., weights_only=True)``), the plots (``loss.png``,
``source_weights.png``) and, for distributed runs, ``ray/`` (Ray Train's
reports and checkpoints).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from metarec_dist.errors import StoreError


def create_run_dir(output_dir: Path, label: str) -> Path:
    """A new directory ``output_dir/<UTC time>-<label>[-n]``; an existing one is never reused."""
    safe_label = re.sub(r"[^A-Za-z0-9._-]+", "_", label)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise StoreError(f"{output_dir}: cannot create the output directory ({error.strerror})") from None
    for attempt in range(1000):
        path = output_dir / (f"{stamp}-{safe_label}" + (f"-{attempt}" if attempt else ""))
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
        except OSError as error:
            raise StoreError(f"{path}: cannot create the run directory ({error.strerror})") from None
    raise StoreError(f"{output_dir}: too many runs named {stamp}-{safe_label}; try again")


def unused_path(directory: Path, stem: str, suffix: str = "") -> Path:
    """``directory/<stem><suffix>``, or ``<stem>-1<suffix>``, ``-2``, ... : the first name not taken."""
    path = directory / f"{stem}{suffix}"
    attempt = 0
    while path.exists():
        attempt += 1
        path = directory / f"{stem}-{attempt}{suffix}"
    return path


_UMASK = os.umask(0)
os.umask(_UMASK)


def _write_atomic(path: Path, write) -> None:
    """Write through a temporary file in the same directory, then rename over ``path``."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
        os.chmod(temporary, 0o666 & ~_UMASK)  # mkstemp makes 0600; results are meant to be shared
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_bytes(path: Path, payload: bytes) -> None:
    _write_atomic(path, lambda stream: stream.write(payload))


def write_json(path: Path, payload: Any) -> None:
    _write_atomic(path, lambda stream: stream.write((json.dumps(payload, indent=2) + "\n").encode()))


def write_yaml(path: Path, payload: Any) -> None:
    _write_atomic(path, lambda stream: stream.write(yaml.safe_dump(payload, sort_keys=False).encode()))


def save_state(path: Path, state: dict[str, torch.Tensor]) -> None:
    _write_atomic(path, lambda stream: torch.save({k: v.detach().cpu() for k, v in state.items()}, stream))


def load_state(path: Path) -> dict[str, torch.Tensor]:
    """Tensors only: never unpickles arbitrary objects."""
    return torch.load(path, map_location="cpu", weights_only=True)
