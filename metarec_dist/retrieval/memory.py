"""Memory a search will need, checked against what the machine has before it starts."""

from __future__ import annotations

import psutil

from metarec_dist.errors import RetrievalError

HEADROOM = 0.9  # leave a tenth of the available memory to everything else


def available_bytes(device: str = "cpu") -> int:
    """Free memory of this machine's RAM, or of this process's CUDA device (``device`` "cuda")."""
    if device.startswith("cuda"):
        import torch

        free, _total = torch.cuda.mem_get_info()
        return int(free)
    return int(psutil.virtual_memory().available)


def check_memory(needed: int, what: str, device: str = "cpu") -> None:
    """Raise ``RetrievalError`` if ``needed`` bytes exceed the available memory of ``device``."""
    available = available_bytes(device)
    if needed > HEADROOM * available:
        where = "GPU memory" if device.startswith("cuda") else "memory"
        raise RetrievalError(
            f"{what} needs about {needed / 2**30:.1f} GiB but {available / 2**30:.1f} GiB of {where} is available; "
            "use fewer items or queries, a smaller query_block/item_block, an index with compressed codes (ivf_pq)"
            + (", or retrieval.device: cpu" if device.startswith("cuda") else "")
        )


def index_bytes(index: str, num_items: int, width: int, pq_m: int = 16, pq_bits: int = 8, hnsw_m: int = 32) -> int:
    """Approximate resident size of an index over ``num_items`` x ``width`` fp32 vectors."""
    vectors = num_items * width * 4
    if index == "exact":
        return vectors  # the fp32 matrix, sorted by norm (a bf16 copy adds half of it)
    if index in ("flat", "ivf_flat"):
        return vectors + num_items * 8  # a copy of the vectors (+ ids)
    if index == "ivf_pq":
        return num_items * (pq_m * pq_bits // 8 + 8) + vectors  # codes + ids + refine vectors
    if index == "hnsw":
        return vectors + num_items * hnsw_m * 2 * 4  # vectors + level-0 links
    raise ValueError(f"unknown index type {index!r}")


__all__ = ["available_bytes", "check_memory", "index_bytes"]
