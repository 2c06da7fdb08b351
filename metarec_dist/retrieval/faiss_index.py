"""FAISS indexes behind the searcher interface: flat, IVF-Flat, IVF-PQ (+ exact refine), HNSW.

On a machine with faiss-gpu and a GPU (``device: gpu`` or ``auto``) the index
is copied to the process's GPU through ``StandardGpuResources`` (IVF-PQ with
refinement: its base, re-scored on the CPU); the CPU index is kept, so a
search deeper than FAISS GPU's selection limit (``GPU_MAX_K``) runs there and
says so. HNSW has no GPU version and stays on the CPU.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import faiss
import numpy as np
from tqdm import tqdm

from metarec_dist.errors import RetrievalError
from metarec_dist.retrieval.config import RetrievalConfig
from metarec_dist.retrieval.exact import SearchResult

GPU_MAX_K = 2048  # FAISS GPU k-selection supports k <= 2048
ADD_CHUNK = 100_000


def gpu_count() -> int:
    """GPUs FAISS can use (0 with faiss-cpu)."""
    return faiss.get_num_gpus() if hasattr(faiss, "StandardGpuResources") else 0


class FaissSearcher:
    """A built FAISS index over ``num_items`` x ``width`` vectors; rows are 0-based.

    On a GPU the index is a copy of the CPU one on this process's CUDA device.
    FAISS cannot copy ``IndexRefineFlat`` to a GPU, so IVF-PQ with refinement
    searches its compressed base there for ``refine_factor * k`` candidates and
    re-scores them exactly on the CPU, as ``IndexRefineFlat`` does. A search
    whose depth exceeds FAISS GPU's selection limit (``GPU_MAX_K``) runs on the
    CPU index, with a warning.
    """

    def __init__(self, cpu_index: faiss.Index, config: RetrievalConfig, use_gpu: bool):
        self.cpu_index = cpu_index
        self.config = config
        self.num_items = cpu_index.ntotal
        self.width = cpu_index.d
        self.index = cpu_index
        self._gpu_resources = None
        self._refine_vectors: np.ndarray | None = None  # set where the GPU searches a refined index's base
        if use_gpu:
            self._gpu_resources = faiss.StandardGpuResources()
            refined = isinstance(cpu_index, faiss.IndexRefineFlat)
            base = faiss.downcast_index(cpu_index.base_index) if refined else cpu_index
            self.index = faiss.index_cpu_to_gpu(self._gpu_resources, _cuda_device(), base)
            if refined:
                self._refine_vectors = faiss.rev_swig_ptr(
                    faiss.downcast_index(cpu_index.refine_index).get_xb(), self.num_items * self.width
                ).reshape(self.num_items, self.width)
        self.on_gpu = use_gpu
        self._apply_search_parameters()

    def _apply_search_parameters(self) -> None:
        if self.config.index in ("ivf_flat", "ivf_pq"):
            for index in {id(self.index): self.index, id(self.cpu_index): self.cpu_index}.values():
                faiss.extract_index_ivf(index).nprobe = self.config.nprobe
        if self.config.index == "hnsw":
            self.cpu_index.hnsw.efSearch = self.config.ef_search

    def search(self, queries: np.ndarray, k: int) -> SearchResult:
        """Top-``k`` rows per query, best first; a slot FAISS could not fill has row -1."""
        queries = _as_queries(queries, self.width)
        if not 1 <= k <= self.num_items:
            raise RetrievalError(f"k must be in 1..{self.num_items} (the catalog size); got {k}")
        if not self.on_gpu:
            return _result(*self.cpu_index.search(queries, k))
        depth = k if self._refine_vectors is None else min(k * self.config.refine_factor, self.num_items)
        if depth > GPU_MAX_K:
            warnings.warn(
                f"a search {depth} deep (k={k}) is beyond FAISS GPU's limit of {GPU_MAX_K}; these queries "
                "are searched on the CPU index",
                stacklevel=2,
            )
            return _result(*self.cpu_index.search(queries, k))
        scores, rows = self.index.search(queries, depth)
        if self._refine_vectors is not None:
            scores, rows = refine_exactly(queries, rows, self._refine_vectors, k)
        return _result(scores, rows)

    def save(self, path: Path) -> None:
        """Write the CPU index (loadable with ``faiss.read_index``) atomically."""
        partial = path.with_name(path.name + ".partial")
        faiss.write_index(self.cpu_index, str(partial))
        os.replace(partial, path)


def refine_exactly(queries: np.ndarray, candidates: np.ndarray, vectors: np.ndarray,
                   k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best of each query's ``candidates`` (rows, -1 for none) by exact inner product."""
    safe = np.where(candidates >= 0, candidates, 0)
    scores = np.einsum("qd,qcd->qc", queries, vectors[safe])
    scores[candidates < 0] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(candidates, order, 1)


def _result(scores: np.ndarray, rows: np.ndarray) -> SearchResult:
    return SearchResult(scores.astype(np.float32), rows.astype(np.int64))


def _cuda_device() -> int:
    """This process's CUDA device (a Ray Train worker's own GPU), as FAISS numbers it."""
    import torch

    return torch.cuda.current_device() if torch.cuda.is_available() else 0


def _as_queries(queries, width: int) -> np.ndarray:
    queries = np.ascontiguousarray(np.asarray(queries, dtype=np.float32))
    if queries.ndim != 2 or queries.shape[1] != width:
        raise RetrievalError(
            f"queries must be [Q, {width}] to match the index width {width}; got shape {queries.shape}"
        )
    if not np.isfinite(queries).all():
        raise RetrievalError("queries contain NaN or inf; check the encoder's output")
    return queries


def _empty_index(config: RetrievalConfig, num_items: int, width: int) -> faiss.Index:
    metric = faiss.METRIC_INNER_PRODUCT
    if config.index == "flat":
        return faiss.IndexFlatIP(width)
    if config.index in ("ivf_flat", "ivf_pq"):
        if config.nlist > num_items:
            raise RetrievalError(f"retrieval.nlist={config.nlist} exceeds the catalog's {num_items} items; lower it")
        quantizer = faiss.IndexFlatIP(width)
        if config.index == "ivf_flat":
            index = faiss.IndexIVFFlat(quantizer, width, config.nlist, metric)
        else:
            if width % config.pq_m:
                raise RetrievalError(f"retrieval.pq_m={config.pq_m} must divide the vector width {width}")
            index = faiss.IndexIVFPQ(quantizer, width, config.nlist, config.pq_m, config.pq_bits, metric)
        if config.index == "ivf_pq" and config.refine_factor:
            refined = faiss.IndexRefineFlat(index)
            refined.k_factor = config.refine_factor
            return refined
        return index
    if config.index == "hnsw":
        index = faiss.IndexHNSWFlat(width, config.hnsw_m, metric)
        index.hnsw.efConstruction = config.ef_construction
        return index
    raise RetrievalError(f"retrieval.index={config.index!r} is not a FAISS index type")


def build_faiss_searcher(items: np.ndarray, config: RetrievalConfig, use_gpu: bool,
                         progress: bool = False) -> FaissSearcher:
    """Train (IVF) and fill a FAISS index with ``items`` ``[N, d]``, copied to the GPU if ``use_gpu``
    (``use_faiss_gpu(config)``).

    Callers check memory first (``search.build_searcher`` does).
    """
    items = np.ascontiguousarray(np.asarray(items, dtype=np.float32))
    if items.ndim != 2 or items.shape[0] == 0 or items.shape[1] == 0:
        raise RetrievalError(f"items must be a non-empty [N, d] matrix; got shape {items.shape}")
    if not np.isfinite(items).all():
        raise RetrievalError("items contain NaN or inf; they cannot be indexed")
    num_items, width = items.shape
    index = _empty_index(config, num_items, width)
    if not index.is_trained:
        rng = np.random.default_rng(config.seed)
        sample = items[np.sort(rng.choice(num_items, min(config.train_size, num_items), replace=False))]
        index.train(sample)
    for begin in tqdm(range(0, num_items, ADD_CHUNK), desc=f"building {config.index}", disable=not progress):
        index.add(items[begin : begin + ADD_CHUNK])
    return FaissSearcher(index, config, use_gpu)


def use_faiss_gpu(config: RetrievalConfig) -> bool:
    """Whether FAISS searches on the GPU as ``config.device`` says (raises where it cannot)."""
    if config.device == "cpu":
        return False
    available = gpu_count() > 0
    if config.index == "hnsw":
        if config.device == "gpu" and not config.gpu_fallback:
            raise RetrievalError("retrieval.index=hnsw has no FAISS GPU version; use device: cpu or gpu_fallback: true")
        return False
    if not available and config.device == "gpu":
        if not config.gpu_fallback:
            raise RetrievalError(
                "retrieval.device=gpu but FAISS sees no GPU (faiss-cpu, or no device); "
                "use device: cpu, or gpu_fallback: true to fall back to the CPU"
            )
        warnings.warn("retrieval.device=gpu: FAISS sees no GPU, using the CPU (gpu_fallback)", stacklevel=2)
    return available


__all__ = ["GPU_MAX_K", "FaissSearcher", "build_faiss_searcher", "gpu_count", "refine_exactly", "use_faiss_gpu"]
