"""Processes keep freed memory, so a training step's large tensors are not faulted in again."""

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from metarec_dist.allocator import freed_memory_environment

# Allocates and frees an 80 MB tensor (more than a thread's malloc arena holds) 22 times,
# in the main thread or another one; prints the page faults of the last ten (the heap
# takes a few rounds to settle, and may still grow once in a while where small
# allocations land after the large block).
FAULTS_PER_REALLOCATION = """
import resource, sys, threading, torch
ROUNDS = 10
from metarec_dist.allocator import keep_freed_memory
if sys.argv[1] == "mallopt":
    assert keep_freed_memory()
faults = []
def allocate():
    for _ in range(12):
        torch.ones(20 * 2**20).sum()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(ROUNDS):
        torch.ones(20 * 2**20).sum()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
if sys.argv[2] == "thread":
    worker = threading.Thread(target=allocate)
    worker.start()
    worker.join()
else:
    allocate()
print(faults[0])
"""
GLIBC = platform.libc_ver()[0] == "glibc"
HUGE_PAGES = Path("/sys/kernel/mm/transparent_hugepage/enabled")
HUGE_PAGES_ALWAYS = HUGE_PAGES.exists() and "[always]" in HUGE_PAGES.read_text()
needs_glibc = pytest.mark.skipif(not GLIBC or HUGE_PAGES_ALWAYS, reason="counts glibc's 4 KB page faults")


def faults(how: str, where: str, environment: dict[str, str] | None = None) -> int:
    result = subprocess.run([sys.executable, "-c", FAULTS_PER_REALLOCATION, how, where], capture_output=True,
                            text=True, env={**os.environ, **(environment or {})})
    assert result.returncode == 0, result.stderr
    return int(result.stdout)


@needs_glibc
def test_freed_memory_is_reused_without_page_faults_in_the_main_thread():
    default, kept = faults("default", "main"), faults("mallopt", "main")
    assert default > 10 * 20_000  # 20,480 pages of 4 KB per 80 MB tensor
    assert kept < default / 4  # at most two of ten reallocations faulted in


@needs_glibc
def test_a_process_started_with_the_environment_reuses_freed_memory_in_every_thread():
    # Ray Train runs the training loop in a thread: what its workers get.
    environment = freed_memory_environment()
    assert environment, "GLIBC_TUNABLES is set in this environment already"
    default, kept = faults("default", "thread"), faults("default", "thread", environment)
    assert default > 10 * 20_000
    assert kept < default / 4


def test_keeping_freed_memory_applies_where_the_c_library_is_glibc():
    check = "from metarec_dist.allocator import keep_freed_memory; print(keep_freed_memory())"
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    assert result.stdout.strip() == str(GLIBC)
