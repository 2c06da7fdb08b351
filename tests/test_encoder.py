"""The shared causal encoder and the recommender built on it."""

import numpy as np
import pytest
import torch

from metarec_dist.meta.row_sparse_adam import RowSparseAdam
from metarec_dist.model.encoder import EncoderConfig, SequenceEncoder, encoded_length, length_groups
from metarec_dist.model.recommender import ModelConfig, SequenceRecommender

TINY = EncoderConfig(layers=2, heads=2, max_length=6, dropout=0.0)


def test_outputs_do_not_see_the_future():
    torch.manual_seed(0)
    encoder = SequenceEncoder(8, TINY).eval()
    x = torch.randn(1, 6, 8)
    padding = torch.zeros(1, 6, dtype=torch.bool)
    changed = x.clone()
    changed[0, 4:] = torch.randn(2, 8)
    a, b = encoder(x, padding), encoder(changed, padding)
    assert torch.allclose(a[0, :4], b[0, :4], atol=1e-6)
    assert not torch.allclose(a[0, 4:], b[0, 4:])


def test_left_padding_does_not_change_the_latest_state():
    torch.manual_seed(1)
    encoder = SequenceEncoder(8, TINY.model_copy(update={"group_by_length": False})).eval()  # padding kept
    x = torch.randn(1, 3, 8)
    short = encoder(x, torch.zeros(1, 3, dtype=torch.bool))[0, -1]
    padded_x = torch.cat([torch.randn(1, 3, 8), x], dim=1)  # garbage in the padded slots
    padding = torch.tensor([[True, True, True, False, False, False]])
    padded = encoder(padded_x, padding)[0, -1]
    assert torch.allclose(short, padded, atol=1e-5)
    assert not torch.isnan(encoder(padded_x, padding)).any()


def test_sequences_longer_than_max_length_are_rejected():
    encoder = SequenceEncoder(8, TINY)
    with pytest.raises(ValueError, match="max_length"):
        encoder(torch.randn(1, 7, 8), torch.zeros(1, 7, dtype=torch.bool))


def model(**overrides):
    config = ModelConfig(
        width=16, item_width=8, item_widths={"b": 12}, encoder=TINY, vq={"num_codebooks": 2, "codewords": 8},
        **overrides,
    )
    return SequenceRecommender(config, {"t": 20, "a": 30, "b": 25})


def test_domains_own_item_tables_of_their_own_width_and_only_shared_parts_are_shared():
    recommender = model()
    params = dict(recommender.named_parameters())
    assert params["domains.a.embedding.weight"].shape == (31, 8)
    assert params["domains.b.embedding.weight"].shape == (26, 12)
    assert params["domains.b.adapter.weight"].shape == (16, 12)
    shared = recommender.shared_names()
    assert "quantizer.codebooks" in shared and all(not n.startswith("domains.") for n in shared)
    assert set(recommender.local_names("a")) == {n for n in params if n.startswith("domains.a.")}


def test_identity_adapters_start_the_shared_space_at_each_item_table_of_any_width():
    recommender = model(adapter_init="identity", item_init_std=0.02)
    for domain, width in (("a", 8), ("b", 12)):
        table = recommender.domains[domain].embedding.weight
        assert 0.015 < float(table[1:].std()) < 0.025
        z = recommender.domains[domain]()
        assert torch.allclose(z[:, :width], table) and torch.equal(z[:, width:], torch.zeros(len(z), 16 - width))


def test_encoder_reads_only_quantized_vectors():
    recommender = model()
    tables = recommender.item_tables("a")
    codes = recommender.quantizer(recommender.domains["a"]()[1:]).codes
    # Straight-through: z + (q - z) equals q up to rounding.
    assert torch.allclose(tables.inputs[1:], recommender.quantizer.codebooks[[0, 1], codes].reshape(30, 16), atol=1e-6)
    assert torch.equal(tables.inputs[0], torch.zeros(16))


def test_scores_cover_the_catalog_with_padding_excluded():
    recommender = model().eval()
    scores = recommender.scores("b", torch.tensor([[0, 0, 3, 4, 5, 6]]))
    assert scores.shape == (1, 26) and scores[0, 0] == float("-inf")
    assert torch.isfinite(scores[0, 1:]).all()


@pytest.mark.parametrize("overrides", [{}, {"loss": "sampled", "sampled_negatives": 5}, {"precision": "bf16"},
                                       {"use_vq": False}])
def test_training_reduces_the_loss(overrides):
    torch.manual_seed(0)
    recommender = model(**overrides)
    rng = np.random.default_rng(0)
    inputs = torch.as_tensor(rng.integers(1, 21, (16, 6)))
    targets = (inputs % 20) + 1  # a learnable next-item rule
    optimizer = RowSparseAdam(recommender.parameters(), lr=1e-2)  # the sampled loss: row-sparse tables
    first = None
    for _ in range(100):
        loss = recommender("t", inputs, targets).loss
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5 * first


def test_rows_are_encoded_at_the_next_power_of_two_of_their_span_within_the_batch_width():
    spans = (1, 2, 3, 4, 5, 9, 16, 17, 33, 50)
    assert [encoded_length(span, 50) for span in spans] == [1, 2, 4, 4, 8, 16, 16, 32, 50, 50]
    assert encoded_length(20, 24) == 24
    groups = length_groups([3, 50, 2, 4, 3, 49, 1], 50)
    assert groups == {1: [6], 2: [2], 4: [0, 3, 4], 50: [1, 5]}


def test_grouping_rows_by_length_does_not_change_their_states():
    torch.manual_seed(2)
    grouped = SequenceEncoder(8, TINY).eval()
    whole = SequenceEncoder(8, TINY.model_copy(update={"group_by_length": False})).eval()
    whole.load_state_dict(grouped.state_dict())
    x = torch.randn(4, 6, 8)
    padding = torch.tensor([[True] * 5 + [False], [False] * 6, [True] * 3 + [False] * 3, [True] * 4 + [False] * 2])
    assert len(length_groups((~padding).sum(1).tolist(), 6)) == 4
    real = ~padding
    assert torch.allclose(grouped(x, padding)[real], whole(x, padding)[real], atol=1e-6)
    assert grouped(x[:0], padding[:0]).shape == (0, 6, 8)
    assert grouped(x[:, :0], padding[:, :0]).shape == (4, 0, 8)


def test_a_rows_states_are_the_same_bit_for_bit_whatever_it_is_batched_with():
    torch.manual_seed(4)
    encoder = SequenceEncoder(8, TINY).eval()
    row, row_padding = torch.randn(1, 6, 8), torch.tensor([[True] * 3 + [False] * 3])
    others = torch.randn(5, 6, 8)
    short, long = torch.ones(5, 6, dtype=torch.bool), torch.zeros(5, 6, dtype=torch.bool)
    short[:, -1] = False
    alone = encoder(row, row_padding)[0, -3:]
    with_short = encoder(torch.cat([others, row]), torch.cat([short, row_padding]))[-1, -3:]
    with_long = encoder(torch.cat([row, others]), torch.cat([row_padding, long]))[0, -3:]
    assert torch.equal(alone, with_short) and torch.equal(alone, with_long)


def test_grouping_does_not_change_the_loss_or_its_gradients():
    losses, gradients = [], []
    for group_by_length in (True, False):
        torch.manual_seed(3)
        config = ModelConfig(width=16, item_width=8, vq={"num_codebooks": 2, "codewords": 8},
                             encoder=TINY.model_copy(update={"group_by_length": group_by_length}))
        recommender = SequenceRecommender(config, {"t": 20})
        inputs = torch.tensor([[0, 0, 0, 0, 3, 4], [1, 2, 3, 4, 5, 6], [0, 0, 0, 7, 8, 9]])
        targets = torch.tensor([[0, 0, 0, 0, 4, 5], [2, 3, 4, 5, 6, 7], [0, 0, 0, 8, 9, 10]])
        loss = recommender("t", inputs, targets).loss
        losses.append(loss)
        gradients.append(torch.autograd.grad(loss, list(recommender.parameters()), allow_unused=True))
    assert torch.allclose(losses[0], losses[1], atol=1e-6)
    for grouped, whole in zip(*gradients):
        assert (grouped is None) == (whole is None)
        if grouped is not None:
            assert torch.allclose(grouped, whole, atol=1e-6)


def batch_of(rng, items=20, rows=8, length=6):
    inputs = torch.as_tensor(rng.integers(1, items + 1, (rows, length)))
    inputs[:2, :3] = 0  # some left padding
    targets = torch.roll(inputs, -1, dims=1) % items + 1
    targets[inputs == 0] = 0
    return inputs, targets


@pytest.mark.parametrize("score_with", ["continuous", "quantized"])
def test_sampled_softmax_with_every_item_as_candidate_equals_the_full_softmax(score_with):
    rng = np.random.default_rng(0)
    inputs, targets = batch_of(rng)
    losses, gradients = [], []
    for loss in ("full", "sampled"):
        torch.manual_seed(0)
        recommender = model(loss=loss, sampled_negatives=20, score_with=score_with)
        out = recommender("t", inputs, targets)
        losses.append(out.loss)
        gradients.append(torch.autograd.grad(out.loss, list(recommender.parameters()), allow_unused=True))
    assert torch.allclose(losses[0], losses[1], atol=1e-6)
    assert any(g is not None and g.is_sparse for g in gradients[1])  # the sampled loss's tables: row-sparse
    for full, sampled in zip(*gradients):
        assert (full is None) == (sampled is None)
        if full is not None:
            assert torch.allclose(full, sampled.to_dense() if sampled.is_sparse else sampled, atol=1e-6)


def test_quantizing_some_items_equals_the_same_rows_of_quantizing_every_item():
    recommender = model()
    everything = recommender.item_tables("a")
    ids = torch.tensor([0, 3, 4, 17, 30])
    some = recommender.item_tables("a", ids)
    assert torch.equal(some.inputs, everything.inputs[ids]) and torch.equal(some.outputs, everything.outputs[ids])
    assert torch.equal(some.rows_of(torch.tensor([17, 0, 3])), torch.tensor([3, 0, 1]))


@pytest.mark.parametrize("loss", ["full", "sampled"])
def test_a_training_step_reads_and_updates_only_the_items_of_its_batch(loss):
    rng = np.random.default_rng(1)
    inputs, targets = batch_of(rng, items=30)
    recommender = model(loss=loss, sampled_negatives=3)
    torch.manual_seed(0)
    out = recommender("a", inputs, targets)
    out.loss.backward()
    touched = torch.unique(torch.cat([inputs.flatten(), targets.flatten()]))
    table_gradient = recommender.domains["a"].embedding.weight.grad
    if loss == "sampled":  # row-sparse: the gradient holds the rows read (inputs, targets, negatives) only
        assert table_gradient.is_sparse
        assert len(table_gradient.coalesce().indices()[0]) <= len(touched) + 3
        table_gradient = table_gradient.to_dense()
    untouched = torch.ones(31, dtype=torch.bool)
    untouched[touched] = False
    if loss == "full":  # every item is scored, only the batch's inputs are quantized
        assert recommender.quantizer.usage.sum() == (len(torch.unique(inputs)) - 1) * 2
    else:  # the batch's items and at most 3 negatives
        assert int((table_gradient.abs().sum(1) > 0).sum()) <= len(touched) - 1 + 3
    assert table_gradient[0].abs().sum() == 0
    assert untouched.sum() > 0 and table_gradient[untouched].abs().sum(1).gt(0).sum() <= (3 if loss == "sampled"
                                                                                           else 31)


def test_the_logq_correction_lowers_the_logits_of_items_the_batch_proposes_often():
    recommender = model(loss="sampled", sampled_negatives=4)
    counts = torch.zeros(21)
    counts[1:] = 1.0
    counts[5] = 100.0  # item 5: most of the domain's events
    recommender.set_item_frequencies("t", counts)
    wanted = torch.tensor([5, 5, 7, 9])
    candidates, log_q = recommender._candidates("t", wanted, recommender.draw_negatives("t"))
    assert set(wanted.tolist()) <= set(candidates.tolist()) and torch.equal(candidates, candidates.unique())
    q = dict(zip(candidates.tolist(), log_q.exp().tolist()))
    assert q[5] > q[7] and q[7] == pytest.approx(q[9]) and all(0 < v <= 1 for v in q.values())
