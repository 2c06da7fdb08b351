"""Ranking metrics as pure functions: scores -> ranks -> HR, NDCG, MRR.

Every user has exactly one held-out item (leave-one-out), so a user's result
is the 0-based rank of that item among the candidates and every metric is a
mean over users of a function of that rank.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

DEFAULT_KS = (5, 10, 20)


def ranks_from_scores(
    scores: torch.Tensor, targets: torch.Tensor, exclude: torch.Tensor | None = None
) -> torch.Tensor:
    """0-based rank of each user's target among the candidate items, ``[B]`` int64.

    ``scores`` is ``[B, N+1]`` (column ``j`` scores item ``j``); candidates are
    items ``1..N`` not marked in ``exclude`` (column 0 is padding, never one)::

        rank_b = #{j candidate : s_bj > s_bt}  +  #{j candidate : s_bj == s_bt and j < t}

    with ``t = targets[b]``: ties are broken by item id, so ranks are
    deterministic and do not depend on how users are batched. A target that is
    itself excluded gets ``rank = N``, a miss at every cutoff K <= N.
    NaN scores raise ``ValueError`` (a NaN compares false to everything and
    would silently rank the target first).
    """
    if scores.dim() != 2 or scores.shape[1] < 2:
        raise ValueError(f"scores must be [B, N+1] with N >= 1 items; got shape {tuple(scores.shape)}")
    batch, width = scores.shape
    num_items = width - 1
    if targets.shape != (batch,):
        raise ValueError(f"targets must be [{batch}] to match scores {tuple(scores.shape)}; got {tuple(targets.shape)}")
    if exclude is not None and (exclude.shape != scores.shape or exclude.dtype != torch.bool):
        raise ValueError(
            f"exclude must be a bool tensor shaped like scores {tuple(scores.shape)}; "
            f"got {exclude.dtype} {tuple(exclude.shape)}"
        )
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN; the scoring function is broken (check for 0/0 or overflow)")
    targets = targets.to(device=scores.device, dtype=torch.long)
    if batch and (targets.min() < 1 or targets.max() > num_items):
        raise ValueError(f"targets must be item ids in 1..{num_items} (0 is padding)")
    target_scores = scores.gather(1, targets[:, None])
    item_ids = torch.arange(width, device=scores.device)
    ahead = (scores > target_scores) | ((scores == target_scores) & (item_ids < targets[:, None]))
    ahead[:, 0] = False  # padding is never a candidate
    if exclude is None:
        return ahead.sum(dim=1)
    exclude = exclude.to(scores.device)
    ranks = (ahead & ~exclude).sum(dim=1)
    target_excluded = exclude.gather(1, targets[:, None]).squeeze(1)
    return torch.where(target_excluded, torch.full_like(ranks, num_items), ranks)


def metrics_from_ranks(ranks: np.ndarray, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """HR@k, NDCG@k for each k, and MRR: means over users of functions of the 0-based rank r.

    - ``HR@k   = mean[r < k]``
    - ``NDCG@k = mean[1 / log2(r + 2) if r < k else 0]`` (one relevant item, so IDCG = 1)
    - ``MRR    = mean[1 / (r + 1)]`` over the full ranking, not truncated at any k
    """
    ranks = np.asarray(ranks)
    if ranks.ndim != 1 or len(ranks) == 0:
        raise ValueError(f"ranks must be a non-empty 1-D array; got shape {ranks.shape}")
    if not np.issubdtype(ranks.dtype, np.integer) or ranks.min() < 0:
        raise ValueError("ranks must be non-negative integers (0 = ranked first)")
    if any(int(k) != k or k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers; got {tuple(ks)}")
    ranks = ranks.astype(np.float64)
    gains = 1.0 / np.log2(ranks + 2.0)
    out: dict[str, float] = {}
    for k in ks:
        hit = ranks < k
        out[f"HR@{k}"] = float(hit.mean())
        out[f"NDCG@{k}"] = float(np.where(hit, gains, 0.0).mean())
    out["MRR"] = float((1.0 / (ranks + 1.0)).mean())
    return out


__all__ = ["DEFAULT_KS", "metrics_from_ranks", "ranks_from_scores"]
