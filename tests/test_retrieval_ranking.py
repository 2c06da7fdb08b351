"""Evaluation through a searcher gives the brute-force reference's ranks and metrics on real data."""

import numpy as np
import pytest
import torch

from metarec_dist.data.importer import import_file
from metarec_dist.data.splits import leave_one_out
from metarec_dist.eval.full_ranking import EvalConfig, evaluate_full_ranking, ranks_full_ranking
from metarec_dist.eval.metrics import metrics_from_ranks
from metarec_dist.eval.retrieval_ranking import ranks_by_retrieval
from metarec_dist.model.recommender import ModelConfig, SequenceRecommender
from metarec_dist.retrieval.config import RetrievalConfig


@pytest.fixture(scope="module")
def beauty(shared_data, tmp_path_factory):
    from metarec_dist.data.store import DomainStore

    store = DomainStore(tmp_path_factory.mktemp("store"))
    import_file(shared_data / "Beauty.txt", store)
    domain = store.open("Beauty")
    return leave_one_out(domain.sequences), domain.num_items


def model_for(num_items, score_with):
    torch.manual_seed(0)
    config = ModelConfig(width=32, item_width=32, score_with=score_with)
    model = SequenceRecommender(config, {"Beauty": num_items})
    model.initialize_codebook(torch.Generator().manual_seed(1))
    return model.eval()


@pytest.mark.parametrize("score_with", ["continuous", "quantized"])
@pytest.mark.parametrize("exclude_seen", ["history", "none"])
def test_exact_retrieval_equals_the_reference_on_beauty(beauty, score_with, exclude_seen):
    """Beauty's test split (every other user); 'quantized' items share codewords, so exact ties occur."""
    split, num_items = beauty
    users = np.arange(0, split.num_users, 2)
    model = model_for(num_items, score_with)
    config = EvalConfig(exclude_seen=exclude_seen, retrieval=RetrievalConfig(item_block=5000))
    reference = ranks_full_ranking(
        lambda inputs: model.scores("Beauty", inputs), split.test_history, split.test_item, num_items, config, 50, users
    )
    ranks = ranks_by_retrieval(
        lambda inputs: model.query_vectors("Beauty", inputs),
        model.item_vectors("Beauty"), split.test_history, split.test_item, config, 50, users,
    )
    np.testing.assert_array_equal(ranks, reference)
    assert metrics_from_ranks(ranks) == metrics_from_ranks(reference)


def test_a_flat_faiss_index_gives_the_reference_hit_rates(beauty):
    split, num_items = beauty
    model = model_for(num_items, "continuous")
    config = EvalConfig(retrieval=RetrievalConfig(index="flat"))
    users = np.arange(0, split.num_users, 7)
    reference = evaluate_full_ranking(
        lambda inputs: model.scores("Beauty", inputs), split.test_history, split.test_item, num_items, config, 50, users
    )
    ranks = ranks_by_retrieval(
        lambda inputs: model.query_vectors("Beauty", inputs),
        model.item_vectors("Beauty"), split.test_history, split.test_item, config, 50, users,
    )
    metrics = metrics_from_ranks(ranks)
    for name, value in metrics.items():
        if name != "MRR":  # truncated at max(ks) for FAISS indexes
            assert value == pytest.approx(reference[name], abs=1e-12), name


def test_shards_of_users_merge_to_the_whole(beauty):
    split, num_items = beauty
    model = model_for(num_items, "continuous")
    config = EvalConfig()
    args = (lambda inputs: model.query_vectors("Beauty", inputs), model.item_vectors("Beauty"),
            split.test_history, split.test_item, config, 50)
    users = np.arange(split.num_users)
    whole = ranks_by_retrieval(*args, users=users)
    shards = [ranks_by_retrieval(*args, users=users[rank::3]) for rank in range(3)]
    merged = np.empty_like(whole)
    for rank, shard in enumerate(shards):
        merged[rank::3] = shard
    np.testing.assert_array_equal(merged, whole)
