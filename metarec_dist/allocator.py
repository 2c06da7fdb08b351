"""Keep freed memory in the process instead of handing it back to the OS (glibc).

glibc serves large allocations (over 32 MB at most, often far less) with their
own ``mmap`` and unmaps them on ``free``; the next training step's tensor of
the same size is then faulted back in page by page. A full-softmax step on
Beauty allocates several large ``[positions, items]`` tensors, and faulting them
in is a large part of its time (``benchmarks/bench_train_step.py``). A GPU framework's
caching allocator avoids this; on the CPU, turning off glibc's ``mmap`` and
its trimming does the same. The cost: the resident size stays at its peak.

Two ways in, for two kinds of process:
- ``keep_freed_memory()``, for this process (the CLI), where training runs in
  the main thread;
- ``freed_memory_environment()``, for processes not started yet (Ray workers):
  Ray Train runs the training loop in a thread, and a thread's own malloc
  arena serves anything over 64 MB with ``mmap`` whatever ``mallopt`` says,
  so those processes need one arena, which only start-up settings give.
"""

from __future__ import annotations

import ctypes
import logging
import os

_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's <malloc.h>
_M_MMAP_MAX = -4
_LARGEST_INT = 2**31 - 1
_TUNABLES = f"glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold={_LARGEST_INT}"

logger = logging.getLogger(__name__)


def keep_freed_memory() -> bool:
    """Make this process's main thread reuse freed memory; False where the C library is not glibc."""
    try:
        libc = ctypes.CDLL(None)  # the symbols this process already has, its C library's among them
    except (OSError, TypeError):  # TypeError: Windows
        libc = None
    if libc is None or not hasattr(libc, "gnu_get_libc_version"):  # musl and macOS have other knobs
        logger.info("not glibc: freed memory is left to the C library's defaults")
        return False
    # mallopt returns 1 on success.
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _LARGEST_INT))


def freed_memory_environment() -> dict[str, str]:
    """Environment variables that make a new process keep freed memory in all its threads.

    Empty when the user set ``GLIBC_TUNABLES`` already: theirs win. Other C
    libraries ignore the variable.
    """
    return {} if "GLIBC_TUNABLES" in os.environ else {"GLIBC_TUNABLES": _TUNABLES}
