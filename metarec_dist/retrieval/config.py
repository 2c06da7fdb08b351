"""Which searcher evaluation, export and benchmarks use, and its parameters."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from metarec_dist.config import StrictModel

IndexType = Literal["exact", "flat", "ivf_flat", "ivf_pq", "hnsw"]


class RetrievalConfig(StrictModel):
    """A searcher: ``exact`` (this package's blocked search, the default) or a FAISS index.

    - ``flat``: ``faiss.IndexFlatIP``, exact.
    - ``ivf_flat`` / ``ivf_pq``: inverted lists over ``nlist`` k-means cells,
      ``nprobe`` of them searched; ``ivf_pq`` stores ``pq_m`` x ``pq_bits``-bit
      codes and, with ``refine_factor > 0``, re-scores ``refine_factor * k``
      candidates with the exact vectors.
    - ``hnsw``: graph with ``hnsw_m`` links per node, ``ef_construction`` /
      ``ef_search`` beam widths.

    ``device``: ``cpu``, ``gpu`` (FAISS GPU resources, or torch CUDA for
    ``exact``; the process's own GPU) or ``auto`` (the default: GPU when one is
    usable, so a GPU worker ranks on its GPU). Asking for ``gpu`` where there
    is none is an error unless ``gpu_fallback`` is on.
    """

    index: IndexType = "exact"
    device: Literal["cpu", "gpu", "auto"] = "auto"
    gpu_fallback: bool = False
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    query_block: int = Field(default=2048, gt=0)
    item_block: int = Field(default=2048, gt=0)
    nlist: int = Field(default=1024, gt=0)
    nprobe: int = Field(default=16, gt=0)
    pq_m: int = Field(default=16, gt=0)
    pq_bits: int = Field(default=8, gt=0, le=16)
    refine_factor: int = Field(default=4, ge=0)
    hnsw_m: int = Field(default=32, gt=1)
    ef_construction: int = Field(default=200, gt=0)
    ef_search: int = Field(default=128, gt=0)
    train_size: int = Field(default=262_144, gt=0)
    seed: int = 0

    @property
    def is_exact(self) -> bool:
        return self.index in ("exact", "flat")


__all__ = ["IndexType", "RetrievalConfig"]
