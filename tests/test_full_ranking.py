"""Full-catalog evaluation: chunking invariance, history masking, input checks, a sanity check on LastFM."""

import numpy as np
import pytest
import torch

from metarec_dist.data.batches import left_padded
from metarec_dist.data.importer import import_file
from metarec_dist.data.sequences import SequenceView
from metarec_dist.data.splits import LeaveOneOutSplit, leave_one_out
from metarec_dist.eval.full_ranking import EvalConfig, evaluate_full_ranking, ranks_full_ranking


def integer_embeddings(num_items: int, dim: int = 8, seed: int = 0) -> torch.Tensor:
    """Small integer item vectors (row 0 = padding = 0): float64 sums and products are exact,
    so the scores cannot depend on how users are batched, and they tie often."""
    generator = torch.Generator().manual_seed(seed)
    table = torch.randint(-2, 3, (num_items + 1, dim), generator=generator).double()
    table[0] = 0
    return table


def embedding_scorer(table: torch.Tensor):
    """Sequence vector = sum of the history's item vectors (the mean up to a per-user scale,
    which leaves ranks unchanged); score of item j = its dot product with that vector."""
    return lambda inputs: table[inputs].sum(dim=1) @ table.T


def constant_scorer(row: list[float]):
    """Every user gets the same score row (column j scores item j)."""
    scores = torch.tensor(row, dtype=torch.float64)
    return lambda inputs: scores.expand(len(inputs), -1).clone()


def sequences(rows: list[list[int]]) -> SequenceView:
    offsets = np.cumsum([0] + [len(r) for r in rows]).astype(np.int64)
    values = np.array([item for r in rows for item in r], dtype=np.int32)
    return SequenceView.from_offsets(values, offsets)


@pytest.fixture
def lastfm(store, shared_data) -> tuple[LeaveOneOutSplit, int]:
    import_file(shared_data / "LastFM.txt", store)
    domain = store.open("LastFM")
    return leave_one_out(domain.sequences), domain.num_items


def test_lastfm_ranks_and_metrics_do_not_depend_on_batch_size(lastfm):
    split, num_items = lastfm
    score = embedding_scorer(integer_embeddings(num_items))
    results = {}
    for batch_size in (1, 7, 64, 2048):
        config = EvalConfig(batch_size=batch_size)
        ranks = ranks_full_ranking(score, split.test_history, split.test_item, num_items, config, max_length=50)
        metrics = evaluate_full_ranking(score, split.test_history, split.test_item, num_items, config, max_length=50)
        results[batch_size] = (ranks, metrics)
    reference_ranks, reference_metrics = results[2048]
    assert reference_metrics["users"] == split.num_users == len(reference_ranks)
    assert set(reference_metrics) == {f"{m}@{k}" for m in ("HR", "NDCG") for k in (5, 10, 20)} | {"MRR", "users"}
    for ranks, metrics in results.values():
        np.testing.assert_array_equal(ranks, reference_ranks)
        assert metrics == reference_metrics
    # The check is only meaningful if ties with the target actually occur.
    with torch.no_grad():
        rows = np.arange(split.num_users)
        scores = score(torch.from_numpy(left_padded(split.test_history, rows, 50)))
        target_scores = scores[torch.from_numpy(rows), torch.from_numpy(split.test_item.astype(np.int64))]
        assert ((scores == target_scores[:, None]).sum(dim=1) > 1).float().mean() > 0.5


def test_validation_item_is_excluded_when_ranking_the_test_item():
    split = leave_one_out(sequences([[1, 2, 3, 4]]))  # validation item 3, test item 4
    #                        pad 1  2  3   4  5  6
    score = constant_scorer([0, 0, 0, 10, 5, 0, 0])  # only the validation item beats the target
    ranks = ranks_full_ranking(score, split.test_history, split.test_item, 6, EvalConfig(), max_length=10)
    assert ranks.tolist() == [0]
    ranks = ranks_full_ranking(score, split.valid_history, split.valid_item, 6, EvalConfig(), max_length=10)
    assert ranks.tolist() == [0]  # ranking the validation item: the test item 4 is not history, 3 is the target


def test_exclude_seen_none_excludes_nothing():
    split = leave_one_out(sequences([[1, 2, 3, 4]]))
    score = constant_scorer([0, 6, 5, 4, 3, 2, 1])  # lower id scores higher
    none = EvalConfig(exclude_seen="none")
    assert ranks_full_ranking(score, split.test_history, split.test_item, 6, none, 10).tolist() == [3]
    history = EvalConfig(exclude_seen="history")
    assert ranks_full_ranking(score, split.test_history, split.test_item, 6, history, 10).tolist() == [0]


def test_allow_repeats_keeps_a_repeated_target_rankable():
    split = leave_one_out(sequences([[5, 2, 5], [1, 2, 3, 4]]))  # user 0 re-consumes item 5
    score = constant_scorer([0, 6, 5, 4, 3, 2, 1])
    ranks = ranks_full_ranking(score, split.test_history, split.test_item, 6, EvalConfig(allow_repeats=True), 10)
    assert ranks.tolist() == [3, 0]  # items 1, 3, 4 ahead of 5; history item 2 still excluded


def test_repeated_target_is_a_miss_without_allow_repeats():
    split = leave_one_out(sequences([[5, 2, 5], [1, 2, 3, 4]]))
    score = constant_scorer([0, 6, 5, 4, 3, 2, 1])
    config = EvalConfig(allow_repeats=False, ks=(5, 6))
    ranks = ranks_full_ranking(score, split.test_history, split.test_item, 6, config, 10)
    assert ranks.tolist() == [6, 0]  # rank N: a miss
    metrics = evaluate_full_ranking(score, split.test_history, split.test_item, 6, config, 10)
    assert metrics["HR@5"] == 0.5 and metrics["users"] == 2


def test_masking_uses_the_full_history_beyond_max_length():
    history = sequences([list(range(1, 9))])  # items 1..8, the model reads only the last 2
    seen_widths = []

    def score(inputs):
        seen_widths.append(inputs.shape[1])
        return torch.tensor([[0.0] + [-float(j) for j in range(1, 11)]]).expand(len(inputs), -1)

    ranks = ranks_full_ranking(score, history, np.array([9]), 10, EvalConfig(), max_length=2)
    assert seen_widths == [2]
    assert ranks.tolist() == [0]  # masking only items 7, 8 would leave 1..6 ahead: rank 6


def reference_full_ranking(
    table: np.ndarray,
    rows: list[list[int]],
    targets: list[int],
    max_length: int,
    exclude_seen: str,
    allow_repeats: bool,
) -> list[int]:
    """Plain Python/numpy: score from the last max_length items, mask with sets, sort with the id tie-break."""
    num_items = table.shape[0] - 1
    ranks = []
    for history, target in zip(rows, targets):
        scores = table @ table[history[-max_length:]].sum(axis=0)
        excluded = set(history) if exclude_seen == "history" else set()
        if allow_repeats:
            excluded.discard(target)
        candidates = np.array([j for j in range(1, num_items + 1) if j not in excluded])
        order = candidates[np.lexsort((candidates, -scores[candidates]))]
        ranks.append(int(np.flatnonzero(order == target)[0]) if target not in excluded else num_items)
    return ranks


@pytest.mark.parametrize("exclude_seen", ["history", "none"])
@pytest.mark.parametrize("allow_repeats", [False, True])
def test_ranks_match_a_loop_reference_on_random_histories(exclude_seen, allow_repeats):
    rng = np.random.default_rng(7)
    num_items, users, max_length = 30, 40, 5
    rows = [rng.integers(1, num_items + 1, size=rng.integers(1, 15)).tolist() for _ in range(users)]
    targets = rng.integers(1, num_items + 1, size=users)
    targets[:10] = [row[0] for row in rows[:10]]  # some repeats of the oldest history item
    table = integer_embeddings(num_items, dim=4, seed=3)
    config = EvalConfig(exclude_seen=exclude_seen, allow_repeats=allow_repeats, batch_size=3)
    chosen = rng.permutation(users)[:25]  # a subset, out of order
    ranks = ranks_full_ranking(embedding_scorer(table), sequences(rows), targets, num_items, config, max_length, chosen)
    expected = reference_full_ranking(
        table.numpy(), [rows[u] for u in chosen], targets[chosen].tolist(), max_length, exclude_seen, allow_repeats
    )
    assert ranks.tolist() == expected


@pytest.mark.parametrize("bad_target", [0, 7])
def test_target_outside_catalog_raises_value_error(bad_target):
    history = sequences([[1, 2], [3, 4]])
    with pytest.raises(ValueError, match=r"user row 1 .* targets must be in 1\.\.6"):
        evaluate_full_ranking(constant_scorer([0] * 7), history, np.array([5, bad_target]), 6, EvalConfig(), 10)


def test_wrong_score_shape_raises_value_error_naming_the_expected_shape():
    history = sequences([[1, 2], [3, 4]])
    with pytest.raises(ValueError, match=r"\[batch, num_items \+ 1\] = \[2, 7\].*got \(2, 6\)"):
        evaluate_full_ranking(constant_scorer([0] * 6), history, np.array([5, 6]), 6, EvalConfig(), 10)


def test_integer_scores_raise_value_error():
    history = sequences([[1, 2]])
    with pytest.raises(ValueError, match="floating-point"):
        evaluate_full_ranking(
            lambda inputs: torch.zeros(len(inputs), 7, dtype=torch.long), history, np.array([5]), 6, EvalConfig(), 10
        )


@pytest.mark.parametrize(
    "values", [{"ks": [10, 5]}, {"ks": [0, 5]}, {"ks": []}, {"batch_size": 0}, {"exclude_seen": "all"}]
)
def test_invalid_eval_config_is_rejected(values):
    with pytest.raises(ValueError):
        EvalConfig(**values)


def test_popularity_beats_random_scores_on_lastfm(lastfm):
    split, num_items = lastfm
    train_items = np.concatenate([split.train.row(i) for i in range(len(split.train))])
    popularity = torch.from_numpy(np.bincount(train_items, minlength=num_items + 1).astype(np.float64))
    generator = torch.Generator().manual_seed(0)
    config = EvalConfig(ks=(10,))

    def popular(inputs):
        return popularity.expand(len(inputs), -1)

    def random(inputs):
        return torch.rand(len(inputs), num_items + 1, generator=generator, dtype=torch.float64)

    args = (split.test_history, split.test_item, num_items, config, 50)
    popular_hr = evaluate_full_ranking(popular, *args)["HR@10"]
    random_hr = evaluate_full_ranking(random, *args)["HR@10"]
    assert popular_hr > 3 * random_hr and popular_hr > 0.02, (popular_hr, random_hr)
