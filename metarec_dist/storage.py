"""Where the store and a run's checkpoints live: a local path or a URI every node can open.

``Location("store")`` is a folder here; ``Location("s3://bucket/store")`` (also
``gs://``, ``hdfs://``, ``file://``) is opened through ``pyarrow.fs``, with the
credentials and endpoint of the usual environment (``AWS_*``, an instance
profile, ``AWS_ENDPOINT_URL`` for S3-compatible servers). Ray Train writes
checkpoints to the same URIs itself.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from metarec_dist.errors import ConfigError


@dataclass(frozen=True)
class Location:
    """A folder on a filesystem pyarrow opens; ``uri`` is what the user wrote (absolute if local)."""

    uri: str
    filesystem: pafs.FileSystem
    path: str  # the folder, as ``filesystem`` names it

    @property
    def is_local(self) -> bool:
        return isinstance(self.filesystem, pafs.LocalFileSystem)

    def child(self, *names: str) -> Location:
        suffix = "/".join(names)
        return Location(f"{self.uri.rstrip('/')}/{suffix}", self.filesystem, f"{self.path.rstrip('/')}/{suffix}")

    @property
    def parent(self) -> Location:
        def up(text: str) -> str:
            return text.rstrip("/").rsplit("/", 1)[0]

        return Location(up(self.uri), self.filesystem, up(self.path))

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    def kind(self) -> pafs.FileType:
        return self.filesystem.get_file_info(self.path).type

    def is_file(self) -> bool:
        return self.kind() == pafs.FileType.File

    def is_dir(self) -> bool:
        return self.kind() == pafs.FileType.Directory

    def read_bytes(self) -> bytes:
        with self.filesystem.open_input_stream(self.path) as stream:
            return stream.read()

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def write_bytes(self, content: bytes) -> None:
        with self.filesystem.open_output_stream(self.path) as stream:
            stream.write(content)

    def delete_file(self) -> None:
        self.filesystem.delete_file(self.path)

    def folders(self) -> list[str]:
        """Names of the folders directly inside (none if it does not exist)."""
        infos = self.filesystem.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        return sorted(info.base_name for info in infos if info.type == pafs.FileType.Directory)

    def files_named(self, name: str) -> list[Location]:
        """Every file called ``name`` anywhere below, sorted by path."""
        infos = self.filesystem.get_file_info(pafs.FileSelector(self.path, recursive=True, allow_not_found=True))
        found = [info.path for info in infos if info.type == pafs.FileType.File and info.base_name == name]
        return [self._at(path) for path in sorted(found)]

    def sizes(self) -> dict[str, int]:
        """Size of every file below, by its path relative to this folder."""
        infos = self.filesystem.get_file_info(pafs.FileSelector(self.path, recursive=True, allow_not_found=True))
        start = len(self.path.rstrip("/")) + 1
        return {info.path[start:]: info.size for info in infos if info.type == pafs.FileType.File}

    @contextlib.contextmanager
    def as_local_folder(self) -> Iterator[Path]:
        """The folder as a local path: itself, or a temporary copy of a remote one."""
        if self.is_local:
            yield Path(self.path)
            return
        with tempfile.TemporaryDirectory(prefix="metarec-copy-") as directory:
            pafs.copy_files(self.path, directory, source_filesystem=self.filesystem,
                            destination_filesystem=pafs.LocalFileSystem())
            yield Path(directory)

    def _at(self, path: str) -> Location:
        relative = path[len(self.path.rstrip("/")) + 1 :]
        return self.child(relative) if relative else self

    def __str__(self) -> str:
        return self.uri


def location(value: str | Path, field: str) -> Location:
    """``value`` opened as a ``Location``; ``field`` names the setting in the error if it cannot be."""
    text = str(value)
    if "://" not in text:
        path = Path(text).expanduser().resolve()
        return Location(str(path), pafs.LocalFileSystem(), str(path))
    try:
        filesystem, path = pafs.FileSystem.from_uri(text)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as error:
        raise ConfigError(
            f"{field}: cannot open {text} ({str(error).splitlines()[0]}); use a local path or an s3://, gs:// "
            "or hdfs:// URI"
        ) from None
    return Location(text.rstrip("/"), filesystem, path.rstrip("/"))


def is_uri(value: str | Path) -> bool:
    return "://" in str(value)
