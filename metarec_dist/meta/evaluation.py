"""Ranking a model's target-domain users, shared by training, ``evaluate`` and ``export``."""

from __future__ import annotations

from typing import Literal

import numpy as np

from metarec_dist.data.splits import LeaveOneOutSplit
from metarec_dist.eval.full_ranking import EvalConfig
from metarec_dist.eval.retrieval_ranking import ranks_by_retrieval
from metarec_dist.model.recommender import SequenceRecommender

Stage = Literal["valid", "test"]


def stage_data(split: LeaveOneOutSplit, stage: Stage):
    """(histories, held-out items) of the validation or test stage."""
    if stage == "valid":
        return split.valid_history, split.valid_item
    return split.test_history, split.test_item


def rank_users(
    model: SequenceRecommender,
    target: str,
    split: LeaveOneOutSplit,
    stage: Stage,
    config: EvalConfig,
    max_length: int,
    users: np.ndarray | None = None,
) -> np.ndarray:
    """0-based rank of each user's held-out item (``users``: rows, default all) through ``config.retrieval``."""
    histories, items = stage_data(split, stage)
    users = np.arange(len(histories)) if users is None else users
    if len(users) == 0:
        return np.empty(0, np.int64)
    catalog = model.catalog(target)  # every item quantized once, for all the users' batches
    return ranks_by_retrieval(
        lambda inputs: model.query_vectors(target, inputs, catalog),
        model.item_vectors(target, catalog),
        histories,
        items,
        config,
        max_length,
        users,
    )


__all__ = ["Stage", "rank_users", "stage_data"]
