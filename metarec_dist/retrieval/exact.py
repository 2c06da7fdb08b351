"""Exact maximum-inner-product search in blocks: top-k and the exact rank of a target.

A flat index scores every (query, item) pair and keeps a heap per query. Here
items are sorted by norm, largest first, and cut into blocks; queries too.
Each block of scores is one matrix multiply; selection is a threshold test
against each query's running k-th best score. Two things make it exact and
cheaper than scoring everything:

- **Norm bound**: ``q . x <= |q| |x|``. Once every query of a block has a k-th
  best score above ``|q|`` times the largest norm left, no remaining item can
  enter any top-k, and the scan stops. How much this saves depends on how
  spread the item norms are (trained item vectors: popular items have larger
  norms); with equal norms everything is scored, as in a flat index.
- **Low-precision candidate pass** (where the hardware multiplies bf16 fast:
  AMX / AVX512-BF16 CPUs, GPUs): bf16 tiles keep every item whose approximate
  score is within ``2 e(q)`` of the running k-th best approximate score, and
  every candidate is re-scored in fp32. ``e(q) = BF16_RELATIVE_BOUND * |q| *
  max|x|`` bounds the bf16 error of every item (``bf16_error_bound``), so no
  item of the true top-k is dropped: the result is the fp32 result.

Equal scores are ordered by the smaller row, so results are deterministic.
Rows are 0-based positions in the item matrix; callers map them to item ids.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from metarec_dist.errors import RetrievalError
from metarec_dist.machine import cpu_bf16_support

Precision = Literal["auto", "fp32", "bf16"]

# Each input rounded to bf16 (8 significant bits) is off by at most 2^-8
# relatively, so each product by 2 * 2^-8 + 2^-16; the bf16 output rounding
# adds 2^-8 of |sum|q_i x_i|| <= |q||x| (Cauchy-Schwarz). fp32 accumulation of
# d terms adds d * 2^-24 (included per call). 4 * 2^-8 leaves a 30% margin.
BF16_RELATIVE_BOUND = 4.0 * 2.0**-8

# Target-score tiles kept for the rank-counting pass (beyond this they are recomputed).
TILE_CACHE_BYTES = 512 * 2**20


def bf16_error_bound(query_norms: torch.Tensor, max_item_norm: float, width: int) -> torch.Tensor:
    """Per query: the largest |bf16 score - exact score| over all items, ``[Q]``."""
    return (BF16_RELATIVE_BOUND + width * 2.0**-24) * query_norms * max_item_norm


@functools.cache
def bf16_is_fast(device: str) -> bool:
    """Whether this device multiplies bf16 matrices faster than fp32.

    CUDA: when it supports bf16. CPU: when it has AMX or AVX512-BF16 (Linux
    CPU flags); elsewhere bf16 on CPU is emulated and many times slower.
    """
    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return cpu_bf16_support() != "emulated"


def resolved_precision(precision: Precision, device: str) -> Literal["fp32", "bf16"]:
    """``auto`` is bf16 (a candidate pass, rescored in fp32) where bf16 multiplies fast, else fp32."""
    if precision == "auto":
        return "bf16" if bf16_is_fast(device) else "fp32"
    return precision


@dataclass(frozen=True)
class SearchResult:
    """Top-k per query, best first: ``scores`` float32 ``[Q, k]``, ``rows`` int64 ``[Q, k]``."""

    scores: np.ndarray
    rows: np.ndarray


@contextlib.contextmanager
def full_precision_products():
    """The error bounds assume IEEE fp32 products and fp32 accumulation of bf16 products (no TF32, no
    bf16 reductions, both of which CUDA allows by default): torch's flags say so inside, and the
    caller's flags are back afterwards."""
    precision = torch.get_float32_matmul_precision()
    reduction = torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(precision)
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = reduction


class ExactSearcher:
    """Exact top-k by inner product over ``items`` ``[N, d]`` (fp32), on CPU or a GPU.

    ``query_block`` x ``item_block`` is the score tile (16 MB at the defaults, sized
    to stay in cache). The items are copied once,
    sorted by norm.
    """

    def __init__(
        self,
        items: np.ndarray | torch.Tensor,
        precision: Precision = "auto",
        device: str = "cpu",
        query_block: int = 2048,
        item_block: int = 2048,
    ):
        items = torch.as_tensor(items).detach()
        if items.dim() != 2 or items.shape[0] == 0 or items.shape[1] == 0:
            raise RetrievalError(f"items must be a non-empty [N, d] matrix; got shape {tuple(items.shape)}")
        if not items.is_floating_point():
            raise RetrievalError(f"items must be floating point; got {items.dtype}")
        if query_block < 1 or item_block < 1:
            raise RetrievalError(f"query_block and item_block must be >= 1; got {query_block}, {item_block}")
        items = items.to(device=device, dtype=torch.float32)
        if not torch.isfinite(items).all():
            raise RetrievalError("items contain NaN or inf; they cannot be ranked")
        self.device = device
        self.precision = resolved_precision(precision, device)
        norms = items.norm(dim=1)
        # Largest norm first; equal norms keep row order (stable), for reproducible tiles.
        self.order = torch.sort(norms, descending=True, stable=True).indices  # position -> row
        self.items = items[self.order].contiguous()
        self.position_of = torch.empty_like(self.order)  # row -> position
        self.position_of[self.order] = torch.arange(len(self.order), device=device)
        self.items_bf16 = self.items.to(torch.bfloat16) if self.precision == "bf16" else None
        self.max_item_norm = float(norms.max())
        self.query_block = query_block
        self.item_block = item_block
        # Per block: the largest |x| in it, rounded up for fp32 error in norms and products.
        slack = 1.0 + 4 * (self.width + 2) * 2.0**-24
        self.block_norm = norms[self.order][::item_block].cpu().numpy().astype(np.float64) * slack

    @property
    def num_items(self) -> int:
        return self.items.shape[0]

    @property
    def width(self) -> int:
        return self.items.shape[1]

    def _queries(self, queries: np.ndarray | torch.Tensor) -> torch.Tensor:
        queries = torch.as_tensor(queries).detach()
        if queries.dim() != 2 or queries.shape[1] != self.width:
            raise RetrievalError(
                f"queries must be [Q, {self.width}] to match the items' width {self.width}; "
                f"got shape {tuple(queries.shape)}"
            )
        queries = queries.to(device=self.device, dtype=torch.float32).contiguous()
        if not torch.isfinite(queries).all():
            raise RetrievalError("queries contain NaN or inf; check the encoder's output")
        return queries

    def _item_blocks(self):
        for begin in range(0, self.num_items, self.item_block):
            yield begin, min(begin + self.item_block, self.num_items)

    def _still_open(self, block: int, query_norms: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:
        """Queries for which some item from ``block`` on may score at least ``floor`` (norm bound)."""
        return (query_norms * float(self.block_norm[block]) >= floor).nonzero().squeeze(1)

    # --- top-k -----------------------------------------------------------------------

    @full_precision_products()
    def search(self, queries: np.ndarray | torch.Tensor, k: int) -> SearchResult:
        """The ``k`` best items per query, best first; equal scores ordered by row."""
        queries = self._queries(queries)
        if not 1 <= k <= self.num_items:
            raise RetrievalError(f"k must be in 1..{self.num_items} (the catalog size); got {k}")
        scores = np.empty((len(queries), k), dtype=np.float32)
        rows = np.empty((len(queries), k), dtype=np.int64)
        for begin in range(0, len(queries), self.query_block):
            block = queries[begin : begin + self.query_block]
            scores[begin : begin + len(block)], rows[begin : begin + len(block)] = self._search_block(block, k)
        return SearchResult(scores, rows)

    def _search_block(self, queries: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        approximate = self.precision == "bf16"
        query_norms = queries.norm(dim=1)
        if approximate:
            low = queries.to(torch.bfloat16)
            error = bf16_error_bound(query_norms, self.max_item_norm, self.width)
        else:
            error = torch.zeros(len(queries), device=self.device)
        margin = 2 * error
        pool = _CandidatePool(len(queries), k)
        active = torch.arange(len(queries), device=self.device)
        for block, (begin, end) in enumerate(self._item_blocks()):
            if pool.threshold is not None:
                # A true top-k item scores at least threshold - e (and at most |q||x|).
                active = self._still_open(block, query_norms, pool.threshold - error)
                if len(active) == 0:
                    break
            if approximate:
                tile = (low[active] @ self.items_bf16[begin:end].T).float()
            else:
                tile = queries[active] @ self.items[begin:end].T
            if pool.threshold is None:
                # First block: its own k-th best starts the threshold.
                floor = tile.topk(min(k, end - begin), dim=1).values[:, -1] - margin
            else:
                floor = (pool.threshold - margin)[active]
            tile_rows, positions = (tile >= floor[:, None]).nonzero(as_tuple=True)
            pool.add(active[tile_rows], self.order[positions + begin], tile[tile_rows, positions], margin)
        query_rows, item_rows, approx = pool.final()
        if approximate:
            exact = (queries[query_rows] * self.items[self.position_of[item_rows]]).sum(dim=1)
        else:
            exact = approx
        return _top_k_per_query(len(queries), k, query_rows, item_rows, exact)

    # --- exact rank of a target, for evaluation -------------------------------------

    @full_precision_products()
    def ranks(
        self,
        queries: np.ndarray | torch.Tensor,
        targets: np.ndarray,
        excluded: Sequence[np.ndarray] | None = None,
    ) -> np.ndarray:
        """0-based rank of each query's target row among the non-excluded rows, ``[Q]`` int64.

        ``rank = #{j not excluded: s_j > s_t} + #{j not excluded: s_j == s_t, j < t}``,
        the rule of ``eval.metrics.ranks_from_scores``. A target that is itself
        excluded gets rank ``N``. Scores are fp32 tile products, and the target's
        score is read from the tile that holds it. Unlike the search, a block
        of queries stops only once every query in it is past the norm bound.
        """
        queries = self._queries(queries)
        targets = np.asarray(targets, dtype=np.int64)
        if targets.shape != (len(queries),):
            raise RetrievalError(f"one target per query: {len(queries)} queries, targets of shape {targets.shape}")
        if len(targets) and (targets.min() < 0 or targets.max() >= self.num_items):
            raise RetrievalError(f"targets must be item rows in 0..{self.num_items - 1}")
        if excluded is not None and len(excluded) != len(queries):
            raise RetrievalError(f"one exclusion list per query: {len(queries)} queries, {len(excluded)} lists")
        ranks = np.empty(len(queries), dtype=np.int64)
        for begin in range(0, len(queries), self.query_block):
            end = min(begin + self.query_block, len(queries))
            lists = excluded[begin:end] if excluded is not None else None
            ranks[begin:end] = self._ranks_block(queries[begin:end], targets[begin:end], lists)
        return ranks

    def _tile(self, queries: torch.Tensor, begin: int, end: int) -> torch.Tensor:
        return queries @ self.items[begin:end].T

    def _ranks_block(
        self, queries: torch.Tensor, targets: np.ndarray, excluded: Sequence[np.ndarray] | None
    ) -> np.ndarray:
        position_of = self.position_of.cpu().numpy()
        target_positions = position_of[targets]
        target_rows = torch.from_numpy(targets).to(self.device)
        block_of_target = target_positions // self.item_block
        target_scores = torch.empty(len(queries), device=self.device)
        tiles: dict[int, torch.Tensor] = {}
        # The target's score is read from the very tile the counting pass
        # uses, so "ahead of" compares numbers from one and the same product.
        for block in np.unique(block_of_target).tolist():
            begin = block * self.item_block
            here = np.flatnonzero(block_of_target == block)
            tile = self._tile(queries, begin, min(begin + self.item_block, self.num_items))
            target_scores[here] = tile[here, target_positions[here] - begin]
            if (len(tiles) + 1) * tile.numel() * 4 <= TILE_CACHE_BYTES:
                tiles[block] = tile  # reused by the counting pass below
        excluded_query, excluded_rows = _unique_pairs(excluded, self.num_items)
        excluded_positions = position_of[excluded_rows]
        query_norms = queries.norm(dim=1)
        ahead = torch.zeros(len(queries), dtype=torch.int64, device=self.device)
        for block, (begin, end) in enumerate(self._item_blocks()):
            if len(self._still_open(block, query_norms, target_scores)) == 0:
                break  # nothing left can reach any target's score
            # Whole tiles, never a subset of the queries: the same product as the
            # target's, bit for bit (a smaller product may take another kernel).
            tile = tiles.pop(block) if block in tiles else self._tile(queries, begin, end)
            rows = self.order[begin:end]
            before = (tile > target_scores[:, None]) | (
                (tile == target_scores[:, None]) & (rows[None, :] < target_rows[:, None])
            )
            ahead += before.view(torch.uint8).sum(dim=1, dtype=torch.int32)  # byte sums vectorise, bool sums do not
            inside = (excluded_positions >= begin) & (excluded_positions < end)
            if inside.any():
                query_index = torch.from_numpy(excluded_query[inside]).to(self.device)
                column_index = torch.from_numpy(excluded_positions[inside] - begin).to(self.device)
                ahead.index_add_(0, query_index, -before[query_index, column_index].long())
        ranks = ahead.cpu().numpy()
        ranks[excluded_query[excluded_rows == targets[excluded_query]]] = self.num_items
        return ranks


def _unique_pairs(excluded: Sequence[np.ndarray] | None, num_items: int) -> tuple[np.ndarray, np.ndarray]:
    """(query, row) pairs of the exclusion lists, each pair once, checked to be rows."""
    if excluded is None:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    lengths = np.array([len(rows) for rows in excluded], dtype=np.int64)
    if lengths.sum() == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    query = np.repeat(np.arange(len(excluded), dtype=np.int64), lengths)
    rows = np.concatenate([np.asarray(r, dtype=np.int64) for r in excluded])
    if rows.min() < 0 or rows.max() >= num_items:
        raise RetrievalError(f"excluded rows must be in 0..{num_items - 1}")
    pairs = np.unique(query * num_items + rows)  # a row listed twice counts once
    return pairs // num_items, pairs % num_items


class _CandidatePool:
    """Per-query candidates of a block-wise scan, pruned to the running k-th best.

    Holds (query, item row, score) triples. ``threshold`` is each query's k-th
    best score so far (``None`` before any block); a query with fewer than k
    candidates has threshold -inf. Triples below ``threshold - margin`` can
    never enter the top-k and are dropped at each prune.
    """

    def __init__(self, num_queries: int, k: int):
        self.num_queries, self.k = num_queries, k
        self.parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.threshold: torch.Tensor | None = None
        self.size = 0
        self.pruned_size = 0

    def add(self, query_rows, item_rows, scores, margin: torch.Tensor) -> None:
        self.parts.append((query_rows, item_rows, scores))
        self.size += len(query_rows)
        # Prune (and raise the threshold) once a quarter of k per query has come in since the last.
        if self.threshold is None or self.size > self.pruned_size + self.k * self.num_queries // 4:
            self._prune(margin)

    def _prune(self, margin: torch.Tensor) -> None:
        query_rows, item_rows, scores = (torch.cat(column) for column in zip(*self.parts, strict=True))
        # k-th best score per query: sort by (query, -score); position k-1 of each query's run.
        order = np.lexsort((-scores.cpu().numpy(), query_rows.cpu().numpy()))
        order_t = torch.from_numpy(order).to(scores.device)
        query_rows, item_rows, scores = query_rows[order_t], item_rows[order_t], scores[order_t]
        counts = torch.bincount(query_rows, minlength=self.num_queries)
        starts = torch.cumsum(counts, 0) - counts
        has_k = counts >= self.k
        kth = torch.full((self.num_queries,), float("-inf"), device=scores.device)
        kth[has_k] = scores[(starts + self.k - 1)[has_k]]
        self.threshold = kth
        keep = scores >= (kth - margin)[query_rows]
        self.parts = [(query_rows[keep], item_rows[keep], scores[keep])]
        self.size = self.pruned_size = int(keep.sum())

    def final(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(torch.cat(column) for column in zip(*self.parts, strict=True))


def _top_k_per_query(
    num_queries: int, k: int, query_rows: torch.Tensor, item_rows: torch.Tensor, scores: torch.Tensor
) -> tuple[np.ndarray, np.ndarray]:
    """Best ``k`` (score descending, then row ascending) of each query's candidates."""
    query_np, item_np, score_np = (t.cpu().numpy() for t in (query_rows, item_rows, scores))
    order = np.lexsort((item_np, -score_np, query_np))
    query_np, item_np, score_np = query_np[order], item_np[order], score_np[order]
    counts = np.bincount(query_np, minlength=num_queries)
    if counts.min() < k:
        raise RuntimeError("exact search lost candidates; this is a bug, please report it")
    starts = np.cumsum(counts) - counts
    take = (starts[:, None] + np.arange(k)[None, :]).reshape(-1)
    return score_np[take].reshape(num_queries, k), item_np[take].reshape(num_queries, k)


__all__ = ["BF16_RELATIVE_BOUND", "ExactSearcher", "SearchResult", "bf16_error_bound", "bf16_is_fast",
           "resolved_precision"]
