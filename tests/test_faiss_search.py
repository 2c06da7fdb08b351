"""FAISS indexes through the searcher interface, and top-k with per-user exclusions."""

import faiss
import numpy as np
import pytest

from metarec_dist.config import build_config
from metarec_dist.errors import ConfigError, RetrievalError
from metarec_dist.retrieval.config import RetrievalConfig
from metarec_dist.retrieval.search import build_searcher, ranks_from_top_k, search_excluding


def vectors(rows, width, seed):
    return np.random.default_rng(seed).normal(size=(rows, width)).astype(np.float32)


def brute_force_excluding(items, queries, k, excluded):
    scores = queries @ items.T
    for user, rows in enumerate(excluded):
        scores[user, rows] = -np.inf
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


@pytest.mark.parametrize("index", ["exact", "flat"])
def test_exclusions_longer_than_the_default_depth_are_still_ranked_exactly(index):
    items, queries = vectors(5000, 16, 0), vectors(40, 16, 1)
    rng = np.random.default_rng(2)
    excluded = [rng.integers(0, 5000, size=rng.integers(0, 30)) for _ in range(40)]
    # User 0 has seen its own 700 best items: its top-10 lies far below them.
    excluded[0] = np.argsort(-(queries[0] @ items.T))[:700]
    searcher = build_searcher(items, RetrievalConfig(index=index))
    found = search_excluding(searcher, queries, 10, excluded)
    np.testing.assert_array_equal(found.rows, brute_force_excluding(items, queries, 10, excluded))


def test_fewer_rows_left_than_k_leaves_empty_slots():
    items, queries = vectors(12, 4, 3), vectors(1, 4, 4)
    found = search_excluding(build_searcher(items, RetrievalConfig()), queries, 10, [np.arange(5)])
    assert (found.rows[0, :7] >= 5).all() and (found.rows[0, 7:] == -1).all()
    assert np.isneginf(found.scores[0, 7:]).all()


@pytest.mark.parametrize(
    "config",
    [
        {"index": "ivf_flat", "nlist": 32, "nprobe": 32},
        {"index": "ivf_pq", "nlist": 32, "nprobe": 32, "pq_m": 8, "refine_factor": 8},
        {"index": "hnsw", "hnsw_m": 16, "ef_search": 256},
    ],
)
def test_approximate_indexes_recall_the_exact_top_10(config):
    items, queries = vectors(4000, 32, 5), vectors(100, 32, 6)
    exact = build_searcher(items, RetrievalConfig()).search(queries, 10).rows
    found = build_searcher(items, RetrievalConfig(**config)).search(queries, 10).rows
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, exact, strict=True)])
    assert recall >= 0.95


def test_a_saved_index_loads_in_plain_faiss_and_answers_the_same(tmp_path):
    items, queries = vectors(3000, 16, 7), vectors(20, 16, 8)
    searcher = build_searcher(items, RetrievalConfig(index="ivf_flat", nlist=16, nprobe=4))
    searcher.save(tmp_path / "items.faiss")
    loaded = faiss.read_index(str(tmp_path / "items.faiss"))
    loaded.nprobe = 4
    np.testing.assert_array_equal(loaded.search(queries, 10)[1], searcher.search(queries, 10).rows)
    assert not list(tmp_path.glob("*.partial"))


def test_ranks_from_top_k_give_the_position_or_a_miss():
    rows = np.array([[4, 2, 9], [1, 3, 5]])
    assert ranks_from_top_k(rows, np.array([9, 7]), num_items=50).tolist() == [2, 50]


@pytest.mark.parametrize(
    ("config", "items", "call", "message"),
    [
        ({"index": "flat"}, (10, 8), lambda s: s.search(np.ones((1, 4), np.float32), 2), "width 8"),
        ({"index": "flat"}, (10, 8), lambda s: s.search(np.ones((1, 8), np.float32), 11), "k must be in 1..10"),
        ({"index": "flat"}, (0, 8), None, "non-empty"),
        ({"index": "ivf_flat", "nlist": 64}, (10, 8), None, "nlist=64 exceeds"),
        ({"index": "ivf_pq", "nlist": 2, "pq_m": 3}, (10, 8), None, "pq_m=3 must divide"),
        ({"index": "flat", "device": "gpu"}, (10, 8), None, "no GPU"),
        ({"index": "exact", "device": "gpu"}, (10, 8), None, "no CUDA"),
    ],
)
def test_bad_indexes_and_searches_fail_with_a_clear_message(config, items, call, message):
    if faiss.get_num_gpus() and "gpu" in str(config):
        pytest.skip("this machine has a GPU")
    with pytest.raises(RetrievalError, match=message):
        searcher = build_searcher(np.ones(items, np.float32), RetrievalConfig(**config))
        call(searcher)


def test_gpu_fallback_searches_on_the_cpu_and_says_so():
    if faiss.get_num_gpus():
        pytest.skip("this machine has a GPU")
    with pytest.warns(UserWarning, match="using the CPU"):
        searcher = build_searcher(vectors(100, 8, 9), RetrievalConfig(index="flat", device="gpu", gpu_fallback=True))
    assert not searcher.on_gpu


@pytest.mark.parametrize("index", ["exact", "flat", "ivf_pq", "hnsw"])
def test_a_catalog_larger_than_memory_is_refused_before_anything_is_allocated(index):
    huge = np.broadcast_to(np.float32(1.0), (10**10, 128))  # a view: no memory behind it
    with pytest.raises(RetrievalError, match=r"needs about .* GiB but .* GiB of memory is available"):
        build_searcher(huge, RetrievalConfig(index=index))


def test_an_unknown_index_type_is_a_config_error():
    with pytest.raises(ConfigError, match="index"):
        build_config(RetrievalConfig, {"index": "lsh"}, "config.yaml: eval.retrieval")


def test_refining_gpu_candidates_on_the_cpu_equals_faiss_refine_flat():
    """Where FAISS cannot copy IndexRefineFlat to a GPU, its base is searched there and re-scored here."""
    from metarec_dist.retrieval.faiss_index import refine_exactly

    items, queries = vectors(5000, 32, 3), vectors(50, 32, 4)
    config = RetrievalConfig(index="ivf_pq", nlist=64, pq_m=8, refine_factor=4, train_size=5000)
    searcher = build_searcher(items, config)
    expected = searcher.search(queries, 10)
    _, candidates = searcher.cpu_index.base_index.search(queries, 10 * config.refine_factor)
    scores, rows = refine_exactly(queries, candidates, items, 10)
    np.testing.assert_array_equal(rows, expected.rows)
    np.testing.assert_allclose(scores, expected.scores, rtol=1e-5, atol=1e-5)
