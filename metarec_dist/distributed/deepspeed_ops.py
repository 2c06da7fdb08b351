"""DeepSpeed's CPU op, built where a killed build can never block a later run.

On the CPU accelerator, ``deepspeed.initialize`` JIT-builds the
``deepspeed_shm_comm`` op with torch's ``cpp_extension.load``. torch 2.13 guards
that build with a ``FileBaton``: a lock file that waiters poll with no timeout.
A build killed half-way (SIGKILL, a second Ctrl-C, the OOM killer) leaves the
file, and every later run would wait on it forever.

So every process of this package loads the op here first (``load_deepspeed_ops``):

- into a directory of this Python environment (``TORCH_EXTENSIONS_DIR``, unless
  the user set one), so builds of other environments never share its lock, nor
  rebuild it with their own paths;
- holding an exclusive ``flock`` on ``BUILD_LOCK`` in that directory: the
  kernel releases it when its holder dies, however it dies. The file records
  the holder's pid for anyone waiting;
- while holding it, a torch lock file of an op loaded here has no live builder
  (all of them take the flock first): its build was killed half-way, so the
  op's directory is removed, with a warning, and built again.

DeepSpeed caches a loaded op per process (``OpBuilder.load``), so the build
``deepspeed.initialize`` asks for afterwards returns at once, never touching
torch's lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import logging
import os
import shutil
import socket
import sys
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

BUILD_LOCK = "metarec-build.lock"
SHM_OP = "deepspeed_shm_comm"  # the op the CPU accelerator builds in deepspeed.initialize
TORCH_LOCK = "lock"  # torch.utils.cpp_extension's FileBaton, in each op's build directory

Report = Callable[[str, str], None]  # (phase, detail): where a worker stands, for the start-up watchdog

_loaded = False


def extensions_directory() -> Path:
    """Where this environment's ops are built: ``TORCH_EXTENSIONS_DIR`` if set, else inside the
    environment (``sys.prefix``), else a per-environment folder of the user's cache."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    inside = Path(sys.prefix) / "var" / "metarec-dist" / "torch_extensions"
    with contextlib.suppress(OSError):
        inside.mkdir(parents=True, exist_ok=True)
    if os.access(inside, os.W_OK):
        return inside
    key = hashlib.sha256(sys.prefix.encode()).hexdigest()[:12]
    return Path.home() / ".cache" / "metarec-dist" / "torch_extensions" / key


def load_deepspeed_ops(report: Report | None = None) -> None:
    """Build or load DeepSpeed's CPU op under this package's build lock (see the module doc).

    ``report(phase, detail)`` hears when this process waits for another's build
    or compiles; a no-op after the first call in a process.
    """
    global _loaded
    if _loaded:
        return
    report = report or (lambda phase, detail: None)
    import torch

    if not torch.cuda.is_available():  # DeepSpeed would otherwise pick CUDA and fail
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().create_op_builder("ShareMemCommBuilder") is None:  # not the CPU accelerator
        _loaded = True
        return
    directory = extensions_directory()
    directory.mkdir(parents=True, exist_ok=True)
    os.environ["TORCH_EXTENSIONS_DIR"] = str(directory)  # torch reads it at every build
    with _build_lock(directory / BUILD_LOCK, report):
        op_directory = directory / SHM_OP
        if (op_directory / TORCH_LOCK).exists():
            log.warning("removing %s: a build of DeepSpeed's %s was killed half-way there (no process holds "
                        "%s); building it again", op_directory, SHM_OP, directory / BUILD_LOCK)
            shutil.rmtree(op_directory)
        if not (op_directory / f"{SHM_OP}.so").exists():
            report("compiling", f"DeepSpeed's {SHM_OP} op into {op_directory} (once per environment; gcc)")
        else:
            report("loading", f"DeepSpeed's {SHM_OP} op from {op_directory}")
        from deepspeed.comm.torch import build_shm_op  # what deepspeed.initialize calls; it caches the op

        with contextlib.redirect_stdout(io.StringIO()):  # it prints a line per process
            build_shm_op()
    _loaded = True


@contextlib.contextmanager
def _build_lock(path: Path, report: Report):
    """An exclusive flock on ``path`` (released by the kernel if this process dies), holder's pid inside."""
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            report("waiting for a lock", f"{path}, held by {holder} (building DeepSpeed's {SHM_OP} op)")
            fcntl.flock(handle, fcntl.LOCK_EX)
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
