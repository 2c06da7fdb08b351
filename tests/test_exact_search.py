"""The exact searcher returns what a flat FAISS index returns, and the ranks the torch reference gives."""

import faiss
import numpy as np
import pytest
import torch

from metarec_dist.errors import RetrievalError
from metarec_dist.eval.metrics import ranks_from_scores
from metarec_dist.retrieval.exact import ExactSearcher, bf16_error_bound


def clustered(num_items, width, seed, clusters=20):
    """Items around a few centres with varying norms, like trained item vectors."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, width))
    items = centres[rng.integers(clusters, size=num_items)] + 0.5 * rng.normal(size=(num_items, width))
    return (items * rng.uniform(0.5, 2.0, size=(num_items, 1))).astype(np.float32)


def flat_search(items, queries, k):
    index = faiss.IndexFlatIP(items.shape[1])
    index.add(items)
    return index.search(queries, k)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_exact_search_returns_the_flat_index_ids(precision):
    items = clustered(20_000, 32, seed=0)
    queries = clustered(300, 32, seed=1)
    searcher = ExactSearcher(items, precision=precision, query_block=64, item_block=1500)
    found = searcher.search(queries, 10)
    flat_scores, flat_rows = flat_search(items, queries, 10)
    np.testing.assert_array_equal(found.rows, flat_rows)
    np.testing.assert_allclose(found.scores, flat_scores, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_near_ties_below_bf16_resolution_are_ordered_exactly(precision):
    """Scores 1e-5 apart (bf16 sees them as equal) must still come out in fp32 order."""
    rng = np.random.default_rng(2)
    width = 64
    query = rng.normal(size=width).astype(np.float32)
    unit = query / np.linalg.norm(query)
    base = rng.normal(size=(5000, width)).astype(np.float32)
    base -= np.outer(base @ unit, unit)  # orthogonal to the query: score 0
    # 40 adversarial items whose scores are 10 * (1 + j * 1e-5), in shuffled rows.
    contenders = rng.permutation(5000)[:40]
    steps = rng.permutation(40)
    base[contenders] += np.outer(10.0 * (1 + steps * 1e-5) / np.linalg.norm(query), unit).astype(np.float32)
    searcher = ExactSearcher(base, precision=precision, item_block=700)
    found = searcher.search(query[None, :], 10)
    expected = contenders[np.argsort(-steps)][:10]
    np.testing.assert_array_equal(found.rows[0], expected)
    np.testing.assert_array_equal(found.rows, flat_search(base, query[None, :], 10)[1])


def test_exact_ties_are_broken_by_the_smaller_row():
    items = np.ones((1000, 8), dtype=np.float32)
    items[500:510] *= 2  # ten tied winners in the middle of the second block
    found = ExactSearcher(items, precision="fp32", item_block=256).search(np.ones((3, 8), np.float32), 15)
    assert found.rows[0].tolist() == list(range(500, 510)) + [0, 1, 2, 3, 4]


def test_bf16_error_bound_holds_for_every_pair():
    items = torch.from_numpy(clustered(4000, 48, seed=3)) * 7
    queries = torch.from_numpy(clustered(200, 48, seed=4)) / 3
    exact = queries.double() @ items.double().T
    low = (queries.bfloat16() @ items.bfloat16().T).double()
    bound = bf16_error_bound(queries.norm(dim=1), float(items.norm(dim=1).max()), 48).double()
    error = (low - exact).abs().max(dim=1).values
    assert (error <= bound).all()
    assert (error > bound / 100).all()  # the bound is not vacuous


def test_ranks_equal_the_torch_reference_with_exclusions_and_ties():
    rng = np.random.default_rng(5)
    items = clustered(3000, 16, seed=6)
    items[100:110] = items[2000]  # exact duplicates of some targets
    queries = clustered(120, 16, seed=7)
    targets = rng.integers(0, 3000, size=120)
    targets[:10] = 2000
    excluded = [rng.integers(0, 3000, size=rng.integers(0, 60)) for _ in range(120)]
    excluded[3] = np.array([targets[3], targets[3], 7])  # the target itself: a miss
    excluded[4] = np.arange(100, 105)  # some of the duplicates
    ranks = ExactSearcher(items, precision="fp32", query_block=32, item_block=700).ranks(queries, targets, excluded)
    # Reference: full score matrix, padding column 0, item ids = rows + 1.
    scores = torch.from_numpy(queries) @ torch.from_numpy(items).T
    scores = torch.cat([torch.full((120, 1), float("-inf")), scores], dim=1)
    mask = torch.zeros(120, 3001, dtype=torch.bool)
    for user, rows in enumerate(excluded):
        mask[user, torch.from_numpy(rows + 1)] = True
    reference = ranks_from_scores(scores, torch.from_numpy(targets + 1), mask).numpy()
    np.testing.assert_array_equal(ranks, reference)
    assert ranks[3] == 3000


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda s: s.search(np.ones((2, 5), np.float32), 3), "width 8"),
        (lambda s: s.search(np.ones((2, 8), np.float32), 11), "k must be in 1..10"),
        (lambda s: s.search(np.full((2, 8), np.nan, np.float32), 3), "NaN"),
        (lambda s: s.ranks(np.ones((2, 8), np.float32), np.array([1, 10])), "targets must be item rows"),
    ],
)
def test_bad_searches_fail_with_a_clear_message(call, message):
    searcher = ExactSearcher(np.ones((10, 8), np.float32))
    with pytest.raises(RetrievalError, match=message):
        call(searcher)


def test_an_empty_catalog_is_refused():
    with pytest.raises(RetrievalError, match="non-empty"):
        ExactSearcher(np.empty((0, 8), np.float32))


def test_search_under_reduced_precision_settings_is_exact_and_leaves_them_as_they_were():
    rng = np.random.default_rng(0)
    items, queries = rng.standard_normal((500, 64), np.float32), rng.standard_normal((20, 64), np.float32)
    searcher = ExactSearcher(items)
    expected = searcher.search(queries, 5)
    torch.set_float32_matmul_precision("medium")
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = True
    try:
        found = searcher.search(queries, 5)
        ranks = searcher.ranks(queries, expected.rows[:, 0])
        assert torch.get_float32_matmul_precision() == "medium"
        assert torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction
    finally:
        torch.set_float32_matmul_precision("highest")
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    np.testing.assert_array_equal(found.rows, expected.rows)
    np.testing.assert_array_equal(ranks, 0)
