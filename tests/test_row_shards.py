"""A target table split by rows: the plan, one process's view of the protocol, and what it saves.

Across two Ray workers, the split table's meta-steps equal one process's: tests/test_distributed.py.
"""

import pytest
import torch

from metarec_dist.distributed.row_shards import ShardedItemTable, row_blocks
from metarec_dist.meta.config import ExperimentConfig
from metarec_dist.meta.memory_check import training_bytes
from metarec_dist.meta.row_sparse_adam import RowSparseAdam
from metarec_dist.meta.step import LOCAL
from metarec_dist.model.encoder import EncoderConfig
from metarec_dist.model.recommender import ModelConfig, SequenceRecommender


@pytest.mark.parametrize(("rows", "workers"), [(41, 2), (10, 3), (1_000_001, 7), (3, 3)])
def test_row_blocks_cover_every_row_once_in_blocks_differing_by_at_most_one(rows, workers):
    blocks = row_blocks(rows, workers)
    assert len(blocks) == workers and blocks[0][0] == 0 and blocks[-1][1] == rows
    assert all(stop == start for (_, stop), (start, _) in zip(blocks, blocks[1:]))
    sizes = [stop - start for start, stop in blocks]
    assert max(sizes) - min(sizes) <= 1


def sampled_model():
    torch.manual_seed(0)
    config = ModelConfig(width=8, item_width=6, loss="sampled", sampled_negatives=5,
                         encoder=EncoderConfig(layers=1, heads=2, max_length=5, dropout=0.0),
                         vq={"num_codebooks": 2, "codewords": 6})
    return SequenceRecommender(config, {"t": 40})


INPUTS = torch.tensor([[0, 3, 7, 9], [0, 0, 12, 3]])
TARGETS = torch.tensor([[3, 7, 9, 21], [0, 0, 3, 30]])
NEGATIVES = torch.tensor([2, 17, 29, 38, 39])


def test_a_table_split_over_one_worker_takes_the_steps_of_the_whole_table():
    whole, split = sampled_model(), sampled_model()
    table = "domains.t.embedding.weight"
    whole_adam = RowSparseAdam([whole.get_parameter(table)], lr=0.05)
    rows = ShardedItemTable(split.domains["t"], table, LOCAL, learning_rate=0.05, weight_decay=0.0)
    for _ in range(3):
        whole("t", INPUTS, TARGETS, NEGATIVES).loss.backward()
        whole_adam.step()
        whole_adam.zero_grad()
        rows.load(split.rows_read("t", INPUTS, TARGETS, NEGATIVES))
        split("t", INPUTS, TARGETS, NEGATIVES).loss.backward()
        rows.step()
    assert split.get_parameter(table).shape == (1, 6)  # between steps: the padding row only
    with rows.whole():
        assert torch.allclose(split.get_parameter(table), whole.get_parameter(table), atol=1e-6)
    assert rows.moments()[f"{table}/step"] == 3


def test_a_split_table_refuses_to_read_rows_it_was_not_given():
    model = sampled_model()
    rows = ShardedItemTable(model.domains["t"], "domains.t.embedding.weight", LOCAL, 0.05, 0.0)
    rows.load(torch.tensor([0, 3, 7]))
    with pytest.raises(RuntimeError, match=r"items \[9\] are not among the rows"):
        model.domains["t"](torch.tensor([3, 9]))


def test_splitting_the_target_table_lowers_the_memory_estimate_with_more_workers():
    def estimate(workers, split_from):
        config = ExperimentConfig.model_validate({
            "method": "target_only", "data": {"target": "big"}, "model": {"loss": "sampled"},
            "runner": {"workers": workers, "shard_target_rows_from": split_from}})
        return training_bytes(config, {"big": 10_000_000})

    table = 10_000_001 * 64 * 4  # one copy of the values
    # A replica per worker: three copies (values, two moments) and the best state each.
    assert estimate(4, None) - estimate(1, None) > 3 * 4 * table
    # Split: a quarter of the three copies, the whole table while validating, the best state:
    # 2.75 copies a worker instead of 4.
    assert estimate(4, 1) < estimate(4, None) - 4.5 * table
