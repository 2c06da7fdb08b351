"""Full-catalog evaluation, brute force in torch: the reference that faster top-k code is checked against.

For each evaluated user (a row of ``histories``) the scoring function scores
every item ``1..N`` from the user's last ``max_length`` history items; the
held-out item's rank among the candidates gives HR@k, NDCG@k and MRR
(``metrics.py``; ties broken by item id).

Masking (which items are *not* candidates), set by ``EvalConfig``:

- ``exclude_seen="history"`` (default): every item in the user's evaluation
  history is excluded, i.e. everything the user interacted with before the
  held-out item. With the leave-one-out split the test history ends with the
  validation item, so that item is excluded when ranking the test item. The
  mask is built from the user's *full* history row, not only the last
  ``max_length`` items the model reads.
- ``exclude_seen="none"``: nothing is excluded; ``allow_repeats`` has no effect.
- ``allow_repeats=False`` (default): a held-out item that also appears in the
  history is excluded like any other history item, so the user counts as a
  miss (rank ``N``) at every cutoff.
- ``allow_repeats=True`` (for domains where users re-consume, like Yelp): the
  held-out item itself is never excluded, even if it appears in the history;
  the other history items still are.

Padding (item 0) is never a candidate. Users are processed in chunks of
``batch_size``, so memory is bounded by ``batch_size x (N + 1)`` scores and
masks; ranks do not depend on the chunking.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
from pydantic import Field, field_validator

from metarec_dist.config import StrictModel
from metarec_dist.data.batches import left_padded
from metarec_dist.data.sequences import SequenceView
from metarec_dist.eval.metrics import DEFAULT_KS, metrics_from_ranks, ranks_from_scores
from metarec_dist.retrieval.config import RetrievalConfig

ScoreFn = Callable[[torch.Tensor], torch.Tensor]
"""Left-padded item ids ``[B, L]`` int64 -> float scores ``[B, N+1]`` (column j scores item j)."""


class EvalConfig(StrictModel):
    """How evaluation ranks: cutoffs, history masking, repeats, users per chunk, the searcher.

    ``retrieval`` picks the searcher of ``eval.retrieval_ranking`` (training's
    evaluation): ``exact`` by default; the brute-force functions here are the
    reference it is tested against.
    """

    ks: tuple[int, ...] = DEFAULT_KS
    exclude_seen: Literal["history", "none"] = "history"
    allow_repeats: bool = False
    batch_size: int = Field(default=1024, gt=0)
    valid_users: int | None = Field(
        default=None, ge=1, description="validate on a fixed random sample of this many users (default: all); "
        "the test ranks every user"
    )
    retrieval: RetrievalConfig = RetrievalConfig()

    @field_validator("ks")
    @classmethod
    def _ks_positive_and_sorted(cls, ks: tuple[int, ...]) -> tuple[int, ...]:
        if not ks or min(ks) < 1 or list(ks) != sorted(set(ks)):
            raise ValueError(f"must be distinct positive integers in increasing order, e.g. [5, 10, 20]; got {ks}")
        return ks


def history_pairs(
    histories: SequenceView, rows: np.ndarray, targets: np.ndarray, num_items: int, allow_repeats: bool
) -> tuple[np.ndarray, np.ndarray]:
    """The excluded (index into ``rows``, item id) pairs: each row's full history.

    With ``allow_repeats`` the row's own target is left out, so a re-consumed
    item stays rankable; otherwise it stays excluded and the user is a miss.
    """
    row_index, _, items = histories.flat_rows(rows)
    items = items.astype(np.int64)
    if len(items) and (items.min() < 1 or items.max() > num_items):
        raise ValueError(f"history contains item ids outside 1..{num_items}; is num_items the domain's item count?")
    if allow_repeats:
        keep = items != np.asarray(targets, dtype=np.int64)[row_index]
        row_index, items = row_index[keep], items[keep]
    return row_index, items


def history_exclusion(
    histories: SequenceView, rows: np.ndarray, targets: np.ndarray, num_items: int, allow_repeats: bool
) -> np.ndarray:
    """``[len(rows), N+1]`` bool: True for each item of ``history_pairs``."""
    row_index, items = history_pairs(histories, rows, targets, num_items, allow_repeats)
    mask = np.zeros((len(rows), num_items + 1), dtype=bool)
    mask[row_index, items] = True
    return mask


def check_inputs(
    histories: SequenceView, targets: np.ndarray, num_items: int, max_length: int, users: np.ndarray
) -> None:
    """Fail early, with the fix, on inputs that would otherwise give wrong numbers or an IndexError."""
    if num_items < 1:
        raise ValueError(f"num_items must be >= 1; got {num_items}")
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1; got {max_length}")
    if len(targets) != len(histories):
        raise ValueError(f"{len(targets)} targets for {len(histories)} history rows; pass one target per row")
    if len(users) == 0:
        raise ValueError("no users to evaluate")
    if users.min() < 0 or users.max() >= len(histories):
        raise ValueError(f"users must be row indices in 0..{len(histories) - 1}")
    chosen = targets[users]
    bad = (chosen < 1) | (chosen > num_items)
    if bad.any():
        row = int(users[np.argmax(bad)])
        raise ValueError(
            f"target of user row {row} is item {int(targets[row])}; targets must be in 1..{num_items} (0 is padding)"
        )


def _score_chunk(score_fn: ScoreFn, inputs: np.ndarray, num_items: int) -> torch.Tensor:
    """Call the scoring function and check it returned float scores of shape ``[B, N+1]``."""
    scores = score_fn(torch.from_numpy(inputs))
    expected = (len(inputs), num_items + 1)
    if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != expected:
        got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ValueError(
            f"score_fn must return scores of shape [batch, num_items + 1] = {list(expected)} "
            f"(column 0 for padding); got {got}"
        )
    if not scores.is_floating_point():
        raise ValueError(f"score_fn must return a floating-point tensor; got {scores.dtype}")
    return scores


def ranks_full_ranking(
    score_fn: ScoreFn,
    histories: SequenceView,
    targets: np.ndarray,
    num_items: int,
    config: EvalConfig,
    max_length: int,
    users: np.ndarray | None = None,
) -> np.ndarray:
    """Per-user 0-based rank (int64, in the order of ``users``) of the target over the full catalog."""
    targets = np.asarray(targets, dtype=np.int64)
    users = np.arange(len(histories)) if users is None else np.asarray(users, dtype=np.int64)
    check_inputs(histories, targets, num_items, max_length, users)
    ranks = np.empty(len(users), dtype=np.int64)
    with torch.no_grad():
        for begin in range(0, len(users), config.batch_size):
            rows = users[begin : begin + config.batch_size]
            scores = _score_chunk(score_fn, left_padded(histories, rows, max_length), num_items)
            exclude = None
            if config.exclude_seen == "history":
                mask = history_exclusion(histories, rows, targets[rows], num_items, config.allow_repeats)
                exclude = torch.from_numpy(mask).to(scores.device)
            chunk_ranks = ranks_from_scores(scores, torch.from_numpy(targets[rows]).to(scores.device), exclude)
            ranks[begin : begin + len(rows)] = chunk_ranks.cpu().numpy()
    return ranks


def evaluate_full_ranking(
    score_fn: ScoreFn,
    histories: SequenceView,
    targets: np.ndarray,
    num_items: int,
    config: EvalConfig,
    max_length: int,
    users: np.ndarray | None = None,
) -> dict[str, float | int]:
    """HR@k, NDCG@k, MRR over the evaluated users (default: every row), plus ``users``: their count."""
    ranks = ranks_full_ranking(score_fn, histories, targets, num_items, config, max_length, users)
    return {**metrics_from_ranks(ranks, config.ks), "users": len(ranks)}


__all__ = ["EvalConfig", "ScoreFn", "check_inputs", "evaluate_full_ranking", "history_exclusion", "history_pairs",
           "ranks_full_ranking"]
