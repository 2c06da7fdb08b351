"""The machine a benchmark ran on, for its JSON and its printed header."""

from __future__ import annotations

import os
import platform


def _first_line_value(path: str, prefix: str) -> str | None:
    try:
        with open(path) as handle:
            for line in handle:
                if line.startswith(prefix):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def peak_resident_mb() -> float:
    """This process's peak resident memory in MB since it started (or last exec'd).

    Linux's ``VmHWM``: ``getrusage``'s ``ru_maxrss`` also counts the memory of the
    process that forked this one before it exec'd, so a small child of a large parent
    would report the parent's peak. Elsewhere ``ru_maxrss`` (KiB on Linux, bytes on macOS).
    """
    high_water = _first_line_value("/proc/self/status", "VmHWM")
    if high_water is not None:
        return int(high_water.split()[0]) / 1024  # "123456 kB"
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def cpu_bf16_support() -> str:
    """``amx``, ``avx512_bf16`` or ``emulated``: whether this CPU multiplies bf16 matrices in hardware
    (Linux CPU flags). Where it is emulated, bf16 is many times slower than fp32."""
    flags = set((_first_line_value("/proc/cpuinfo", "flags") or "").split())
    if "amx_bf16" in flags:
        return "amx"
    return "avx512_bf16" if "avx512_bf16" in flags else "emulated"


def machine_description(**versions: str) -> dict:
    """CPU model, cores, bf16 support, memory, GPU, OS and Python, plus any library ``versions`` given."""
    memory = _first_line_value("/proc/meminfo", "MemTotal")
    gpu = "none"
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return {
        "cpu_model": _first_line_value("/proc/cpuinfo", "model name") or platform.processor() or "unknown",
        "cpu_count": os.cpu_count(),
        "cpu_bf16": cpu_bf16_support(),
        "ram_gib": round(int(memory.split()[0]) / 2**20, 1) if memory else None,
        "gpu": gpu,
        "os": platform.platform(),
        "python": platform.python_version(),
        **versions,
    }
