"""Evaluation through a searcher: the same ranks and metrics as the brute-force reference, at scale.

Users' query vectors (the encoder's last state) are searched against the
domain's item vectors, with the same history masking as ``full_ranking``
(which items are excluded is documented there):

- ``retrieval.index: exact`` (default): ``ExactSearcher.ranks`` counts, for
  each user, the non-excluded items scored ahead of the held-out one, in
  blocks, so every metric, MRR included, equals the reference.
- a FAISS index: each user's top ``max(ks)`` after exclusions
  (``search_excluding``); a held-out item outside it counts as a miss, so HR
  and NDCG are exact for ``flat`` and MRR is truncated at ``max(ks)``.

``users`` lets each worker of a distributed run rank its own slice; the
per-user ranks are what gets merged.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from metarec_dist.data.batches import left_padded
from metarec_dist.data.sequences import SequenceView
from metarec_dist.eval.full_ranking import EvalConfig, check_inputs, history_pairs
from metarec_dist.retrieval.exact import ExactSearcher
from metarec_dist.retrieval.search import build_searcher, ranks_from_top_k, search_excluding

QueryFn = Callable[[torch.Tensor], torch.Tensor]
"""Left-padded item ids ``[B, L]`` int64 -> query vectors ``[B, d]`` (scored by inner product)."""


def excluded_rows(
    histories: SequenceView, rows: np.ndarray, targets: np.ndarray, num_items: int, config: EvalConfig
) -> list[np.ndarray] | None:
    """Per user, the item rows (item id - 1) ``full_ranking.history_pairs`` excludes;
    None for ``exclude_seen: none``."""
    if config.exclude_seen == "none":
        return None
    owner, items = history_pairs(histories, rows, targets[rows], num_items, config.allow_repeats)
    return np.split(items - 1, np.cumsum(np.bincount(owner, minlength=len(rows)))[:-1])


def query_vectors(query_fn: QueryFn, histories: SequenceView, rows: np.ndarray, max_length: int, batch: int):
    """The users' query vectors, ``[len(rows), d]`` fp32, computed ``batch`` users at a time."""
    with torch.no_grad():
        parts = [
            query_fn(torch.from_numpy(left_padded(histories, rows[begin : begin + batch], max_length))).float()
            for begin in range(0, len(rows), batch)
        ]
    return torch.cat(parts) if parts else torch.empty(0)


def ranks_by_retrieval(
    query_fn: QueryFn,
    items: torch.Tensor,
    histories: SequenceView,
    targets: np.ndarray,
    config: EvalConfig,
    max_length: int,
    users: np.ndarray | None = None,
) -> np.ndarray:
    """Per-user 0-based rank of the target (item id ``targets[u]``) among items ``1..N``.

    ``items`` is ``[N, d]``, row ``j`` holding item ``j + 1``; the searcher is
    ``config.retrieval``'s, built over it.
    """
    targets = np.asarray(targets, dtype=np.int64)
    num_items = items.shape[0]
    users = np.arange(len(histories)) if users is None else np.asarray(users, dtype=np.int64)
    check_inputs(histories, targets, num_items, max_length, users)
    queries = query_vectors(query_fn, histories, users, max_length, config.batch_size)
    return ranks_given_queries(queries, items, histories, targets, config, users)


def ranks_given_queries(
    queries: torch.Tensor,
    items: torch.Tensor,
    histories: SequenceView,
    targets: np.ndarray,
    config: EvalConfig,
    users: np.ndarray,
) -> np.ndarray:
    """``ranks_by_retrieval`` once the users' query vectors ``[len(users), d]`` are known.

    Builds ``config.retrieval``'s searcher and the exclusion lists: the exact
    searcher counts every rank; a FAISS index ranks within max(k) (deeper
    targets get rank N).
    """
    num_items = items.shape[0]
    searcher = build_searcher(items, config.retrieval)  # it checks the query width
    excluded = excluded_rows(histories, users, targets, num_items, config)
    target_rows = targets[users] - 1
    if isinstance(searcher, ExactSearcher):
        return searcher.ranks(queries, target_rows, excluded)
    depth = max(config.ks)
    if excluded is None:
        excluded = [np.empty(0, np.int64)] * len(users)
    found = search_excluding(searcher, queries.cpu().numpy(), min(depth, num_items), excluded)
    return ranks_from_top_k(found.rows, target_rows, num_items)


__all__ = ["QueryFn", "excluded_rows", "query_vectors", "ranks_by_retrieval", "ranks_given_queries"]
