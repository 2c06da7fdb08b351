"""The process keeps freed memory, so a training step's large tensors are not faulted in again."""

import subprocess
import sys

import pytest

from metarec_dist.allocator import keep_freed_memory

# Allocates and frees a 256 MB tensor eight times; prints the page faults of the last three
# (the heap takes a few rounds to settle).
FAULTS_PER_REALLOCATION = """
import resource, sys, torch
from metarec_dist.allocator import keep_freed_memory
if sys.argv[1] == "kept":
    assert keep_freed_memory()
for _ in range(5):
    torch.ones(64 * 2**20).sum()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    torch.ones(64 * 2**20).sum()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str) -> int:
    result = subprocess.run([sys.executable, "-c", FAULTS_PER_REALLOCATION, mode], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return int(result.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_freed_memory_is_reused_without_page_faults():
    default, kept = faults("default"), faults("kept")
    assert default > 3 * 60_000  # 65,536 pages of 4 KB per 256 MB tensor (fewer with huge pages)
    assert kept < default / 20


def test_keeping_freed_memory_reports_whether_it_applied():
    assert keep_freed_memory() is sys.platform.startswith("linux")
