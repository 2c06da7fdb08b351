"""Keep freed memory in the process instead of handing it back to the OS (glibc).

glibc serves large allocations (over 32 MB at most, often far less) with their
own ``mmap`` and unmaps them on ``free``; the next training step's tensor of
the same size is then faulted back in page by page. A full-softmax step on
Beauty allocates several ~70 MB ``[positions, items]`` tensors and spent about
40% of its time on those page faults (docs/BENCHMARKS.md). A GPU framework's
caching allocator avoids this; on the CPU, turning off glibc's ``mmap`` and
its trimming does the same. The cost: the resident size stays at its peak.
"""

from __future__ import annotations

import ctypes
import logging

_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's <malloc.h>
_M_MMAP_MAX = -4
_LARGEST_INT = 2**31 - 1

logger = logging.getLogger(__name__)


def keep_freed_memory() -> bool:
    """Make this process reuse freed memory; False where the C library is not glibc."""
    try:
        libc = ctypes.CDLL(None)  # the symbols this process already has, its C library's among them
    except (OSError, TypeError):  # TypeError: Windows
        libc = None
    if libc is None or not hasattr(libc, "gnu_get_libc_version"):  # musl and macOS have other knobs
        logger.info("not glibc: freed memory is left to the C library's defaults")
        return False
    # mallopt returns 1 on success.
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _LARGEST_INT))
