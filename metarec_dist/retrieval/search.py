"""One entry point to build a searcher from a config, and search with per-query exclusions.

Every searcher has ``num_items``, ``width`` and
``search(queries, k) -> SearchResult``; rows are 0-based positions in the
item matrix it was built from.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch

from metarec_dist.errors import RetrievalError
from metarec_dist.retrieval.config import RetrievalConfig
from metarec_dist.retrieval.exact import ExactSearcher, SearchResult, resolved_precision
from metarec_dist.retrieval.faiss_index import build_faiss_searcher, use_faiss_gpu
from metarec_dist.retrieval.memory import check_memory, index_bytes


class Searcher(Protocol):
    num_items: int
    width: int

    def search(self, queries: np.ndarray, k: int) -> SearchResult: ...


def exact_device(config: RetrievalConfig) -> str:
    """The torch device of the exact searcher: CUDA when asked for (or ``auto``) and present."""
    if config.device == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    if config.device == "gpu":
        if not config.gpu_fallback:
            raise RetrievalError(
                "retrieval.device=gpu but torch sees no CUDA device; use device: cpu, "
                "or gpu_fallback: true to fall back to the CPU"
            )
        warnings.warn("retrieval.device=gpu: no CUDA device, using the CPU (gpu_fallback)", stacklevel=2)
    return "cpu"


def build_searcher(items: np.ndarray | torch.Tensor, config: RetrievalConfig, progress: bool = False) -> Searcher:
    """The searcher ``config.index`` names, over ``items`` ``[N, d]``; memory is checked first."""
    num_items, width = tuple(items.shape) if len(items.shape) == 2 else (0, 0)
    needed = index_bytes(config.index, num_items, width, config.pq_m, config.pq_bits, config.hnsw_m)
    what = f"a {config.index} searcher over {num_items:,} x {width} items"
    if config.index == "exact":
        device = exact_device(config)
        if resolved_precision(config.precision, device) == "bf16":
            needed += needed // 2  # the bf16 copy
        check_memory(needed, what, device)
        return ExactSearcher(
            items,
            precision=config.precision,
            device=device,
            query_block=config.query_block,
            item_block=config.item_block,
        )
    on_gpu = use_faiss_gpu(config)
    check_memory(needed, what)  # FAISS keeps the CPU index, also where it searches a GPU copy
    if on_gpu:
        check_memory(needed, what, "cuda")
    items = items.detach().cpu().numpy() if isinstance(items, torch.Tensor) else items
    return build_faiss_searcher(items, config, on_gpu, progress=progress)


def search_excluding(
    searcher: Searcher, queries: np.ndarray, k: int, excluded: Sequence[np.ndarray]
) -> SearchResult:
    """Top-``k`` per query after removing that query's ``excluded`` rows.

    Each query is searched ``k + |excluded|`` deep (rounded up to a power of
    two, so queries share a few searches), which leaves at least ``k`` rows
    that are not excluded: exact for exact searchers however long the
    exclusion list. Slots that cannot be filled (fewer than ``k`` rows left,
    or an approximate index returning fewer) have row -1 and score -inf.
    """
    queries = np.asarray(queries, dtype=np.float32)
    if len(excluded) != len(queries):
        raise RetrievalError(f"one exclusion list per query: {len(queries)} queries, {len(excluded)} lists")
    num_items = searcher.num_items
    if not 1 <= k <= num_items:
        raise RetrievalError(f"k must be in 1..{num_items} (the catalog size); got {k}")
    lists = [np.unique(np.asarray(rows, dtype=np.int64)) for rows in excluded]
    wanted = np.array([k + len(rows) for rows in lists], dtype=np.int64)
    depths = np.minimum(2 ** np.ceil(np.log2(wanted)).astype(np.int64), num_items)
    # The deepest search holds (score, row, flag) per result for every query sharing its depth.
    deepest = int(depths.max()) if len(depths) else 0
    check_memory(13 * deepest * int((depths == deepest).sum()), f"a search {deepest} deep for {len(queries):,} queries")
    scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    rows = np.full((len(queries), k), -1, dtype=np.int64)
    for depth in np.unique(depths).tolist():
        members = np.flatnonzero(depths == depth)
        found = searcher.search(queries[members], depth)
        valid = found.rows >= 0
        for position, member in enumerate(members):  # exclusion lists differ in length: one isin each
            valid[position] &= ~np.isin(found.rows[position], lists[member], assume_unique=False)
        order = np.argsort(~valid, axis=1, kind="stable")[:, :k]  # valid ones first, in rank order
        kept_valid = np.take_along_axis(valid, order, axis=1)
        rows[members] = np.where(kept_valid, np.take_along_axis(found.rows, order, axis=1), -1)
        scores[members] = np.where(kept_valid, np.take_along_axis(found.scores, order, axis=1), -np.inf)
    return SearchResult(scores, rows)


def ranks_from_top_k(rows: np.ndarray, targets: np.ndarray, num_items: int) -> np.ndarray:
    """0-based position of each target in its query's top-k rows, or ``num_items`` when absent (a miss)."""
    hits = rows == np.asarray(targets, dtype=np.int64)[:, None]
    return np.where(hits.any(axis=1), hits.argmax(axis=1), num_items).astype(np.int64)


__all__ = ["Searcher", "build_searcher", "exact_device", "ranks_from_top_k", "search_excluding"]
