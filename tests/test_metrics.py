"""Ranks and ranking metrics: hand-computed cases and a plain numpy reference."""

import math

import numpy as np
import pytest
import torch

from metarec_dist.eval.metrics import metrics_from_ranks, ranks_from_scores


def rank_of(scores: list[float], target: int, exclude: list[int] = ()) -> int:
    """Rank for one user given the full score row (column 0 = padding)."""
    mask = None
    if exclude:
        mask = torch.zeros(1, len(scores), dtype=torch.bool)
        mask[0, list(exclude)] = True
    return int(ranks_from_scores(torch.tensor([scores]), torch.tensor([target]), mask)[0])


def reference_ranks(scores: np.ndarray, targets: np.ndarray, exclude: np.ndarray) -> np.ndarray:
    """Loop over users: sort the candidates by (score descending, item id ascending)."""
    num_items = scores.shape[1] - 1
    ranks = []
    for row, target in enumerate(targets):
        candidates = np.array([j for j in range(1, num_items + 1) if not exclude[row, j]], dtype=np.int64)
        order = candidates[np.lexsort((candidates, -scores[row, candidates]))]
        ranks.append(int(np.flatnonzero(order == target)[0]) if target in candidates else num_items)
    return np.array(ranks)


def reference_metrics(ranks: np.ndarray, ks: tuple[int, ...]) -> dict[str, float]:
    out = {}
    for k in ks:
        out[f"HR@{k}"] = sum(1.0 for r in ranks if r < k) / len(ranks)
        out[f"NDCG@{k}"] = sum(1.0 / math.log2(r + 2) for r in ranks if r < k) / len(ranks)
    out["MRR"] = sum(1.0 / (r + 1) for r in ranks) / len(ranks)
    return out


def test_metrics_match_hand_computed_values():
    metrics = metrics_from_ranks(np.array([0, 3, 12]), ks=(5, 10, 20))
    expected = {
        "HR@5": 2 / 3,
        "NDCG@5": (1 + 1 / math.log2(5)) / 3,
        "HR@10": 2 / 3,
        "NDCG@10": (1 + 1 / math.log2(5)) / 3,
        "HR@20": 1.0,
        "NDCG@20": (1 + 1 / math.log2(5) + 1 / math.log2(14)) / 3,
        "MRR": (1 + 1 / 4 + 1 / 13) / 3,
    }
    assert list(metrics) == list(expected)
    assert metrics == pytest.approx(expected, abs=1e-12)


def test_mrr_is_not_truncated_at_the_largest_k():
    assert metrics_from_ranks(np.array([99]), ks=(5,))["MRR"] == pytest.approx(1 / 100)


def test_rank_counts_strictly_higher_scores():
    #        pad  1    2    3    4    5
    scores = [0, 0.1, 0.9, 0.5, 0.3, 0.7]
    assert rank_of(scores, 3) == 2  # items 2 and 5 score higher
    assert rank_of(scores, 2) == 0
    assert rank_of(scores, 1) == 4


def test_tied_target_ranks_after_tied_items_with_smaller_ids():
    #        pad  1    2    3    4
    scores = [0, 0.5, 0.5, 0.5, 0.2]
    assert rank_of(scores, 3) == 2  # items 1 and 2 tie and have smaller ids
    assert rank_of(scores, 2) == 1


def test_tied_target_ranks_ahead_of_tied_items_with_larger_ids():
    scores = [0, 0.5, 0.5, 0.5, 0.2]
    assert rank_of(scores, 1) == 0


def test_padding_column_is_never_a_candidate():
    assert rank_of([100.0, 0.2, 0.9, 0.5], 2) == 0  # padding scores higher
    assert rank_of([0.9, 0.2, 0.9, 0.5], 2) == 0  # padding ties with a smaller id


def test_excluded_items_are_not_counted():
    scores = [0, 0.1, 0.9, 0.5, 0.3, 0.7]
    assert rank_of(scores, 3, exclude=[2]) == 1
    assert rank_of(scores, 3, exclude=[2, 5]) == 0
    assert rank_of([0, 0.5, 0.5, 0.5, 0.2], 3, exclude=[1]) == 1  # an excluded tie is not counted either


def test_excluded_target_is_a_miss_at_every_k():
    scores = [0, 0.1, 0.9, 0.5, 0.3, 0.7]
    rank = rank_of(scores, 2, exclude=[2])
    assert rank == 5  # N
    metrics = metrics_from_ranks(np.array([rank]), ks=(1, 5))
    assert metrics["HR@1"] == metrics["HR@5"] == 0.0
    assert metrics["NDCG@1"] == metrics["NDCG@5"] == 0.0


def test_nan_scores_raise_value_error():
    scores = torch.tensor([[0.0, 0.2, float("nan"), 0.5]])
    with pytest.raises(ValueError, match="NaN"):
        ranks_from_scores(scores, torch.tensor([1]), None)


def test_target_outside_catalog_raises_value_error():
    scores = torch.zeros(2, 4)
    with pytest.raises(ValueError, match=r"1\.\.3"):
        ranks_from_scores(scores, torch.tensor([1, 0]), None)
    with pytest.raises(ValueError, match=r"1\.\.3"):
        ranks_from_scores(scores, torch.tensor([4, 1]), None)


def test_empty_ranks_raise_value_error():
    with pytest.raises(ValueError, match="non-empty"):
        metrics_from_ranks(np.array([], dtype=np.int64))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ranks_and_metrics_match_numpy_reference_with_many_ties_and_random_masks(seed):
    rng = np.random.default_rng(seed)
    users, num_items = 200, 40
    scores = np.round(rng.random((users, num_items + 1)), 1)  # 11 distinct values: many ties
    scores[rng.random(scores.shape) < 0.05] = -np.inf  # infinities tie too
    exclude = rng.random(scores.shape) < 0.3
    targets = rng.integers(1, num_items + 1, size=users)
    expected = reference_ranks(scores, targets, exclude)
    assert (expected == num_items).any() and (expected < num_items).any()  # both kinds of user occur

    ranks = ranks_from_scores(torch.from_numpy(scores), torch.from_numpy(targets), torch.from_numpy(exclude))
    np.testing.assert_array_equal(ranks.numpy(), expected)
    ks = (1, 5, 10, 20)
    assert metrics_from_ranks(ranks.numpy(), ks) == pytest.approx(reference_metrics(expected, ks), abs=1e-12)

    unmasked = ranks_from_scores(torch.from_numpy(scores).float(), torch.from_numpy(targets), None)
    np.testing.assert_array_equal(unmasked.numpy(), reference_ranks(scores, targets, np.zeros_like(exclude)))
