"""Codes found once per step (``vq.codes: per_step``) and the codebook searched where it lives."""

import json

import pytest
import torch
from conftest import random_batch, write_config

from metarec_dist.cli import main
from metarec_dist.distributed.codebook_shards import ShardedCodebook
from metarec_dist.meta.config import ExperimentConfig, codebook_is_sharded
from metarec_dist.meta.step import LOCAL
from metarec_dist.meta.step_codes import LocalStepCodes, quantized_reads
from metarec_dist.model.encoder import EncoderConfig
from metarec_dist.model.recommender import ModelConfig, SequenceRecommender

CATALOGS = {"t": 30, "s": 25}


def small_model(codes="live"):
    torch.manual_seed(0)
    config = ModelConfig(width=8, item_width=6, encoder=EncoderConfig(layers=1, heads=2, max_length=5, dropout=0.0),
                         vq={"num_codebooks": 2, "codewords": 16, "codes": codes})
    return SequenceRecommender(config, CATALOGS)


def loss_and_gradients(model, domain, batch):
    loss = model(domain, *model.tensors(batch)).loss
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    gradients = torch.autograd.grad(loss, [model.parameter_index()[n] for n in names], allow_unused=True)
    return loss, dict(zip(names, gradients))


def inputs_of(model, *batches):
    """(domain, inputs) pairs, as a step hands them to ``load``."""
    return [(domain, model.tensors(batch)[0]) for domain, batch in batches]


def test_codes_found_before_a_step_give_the_loss_and_gradients_of_a_live_search():
    batch = random_batch(CATALOGS["t"], seed=1, rows=4)
    live = small_model()
    per_step = small_model(codes="per_step")
    LocalStepCodes(per_step).load(per_step, inputs_of(per_step, ("t", batch)))

    want_loss, want = loss_and_gradients(live, "t", batch)
    got_loss, got = loss_and_gradients(per_step, "t", batch)

    assert torch.equal(got_loss, want_loss)
    for name, gradient in want.items():
        assert (gradient is None) == (got[name] is None), name
        if gradient is not None:
            assert torch.equal(got[name], gradient), name
    # Counted once, when found: every quantized item, in every codebook.
    items = len(quantized_reads(per_step, inputs_of(per_step, ("t", batch)))["t"])
    assert per_step.quantizer.usage.sum(dim=1).tolist() == [items, items]
    assert live.quantizer.usage.sum(dim=1).tolist() == [items, items]


def test_a_forward_refuses_items_whose_codes_were_not_found_for_the_step():
    model = small_model(codes="per_step")
    LocalStepCodes(model).load(model, inputs_of(model, ("t", random_batch(CATALOGS["t"], seed=1))))
    with pytest.raises(RuntimeError, match="no codes were found for domain 's'"):
        model("s", *model.tensors(random_batch(CATALOGS["s"], seed=2)))


def test_a_sharded_codebook_holds_only_the_codewords_a_step_chose_and_updates_them_as_the_whole_one():
    support, query = random_batch(CATALOGS["s"], seed=3, rows=4), random_batch(CATALOGS["t"], seed=4, rows=4)
    whole = small_model(codes="per_step")
    LocalStepCodes(whole).load(whole, inputs_of(whole, ("s", support), ("t", query)))
    sharded = small_model(codes="per_step")
    codebook = ShardedCodebook(sharded.quantizer, LOCAL, learning_rate=0.01, weight_decay=0.0)
    assert sharded.quantizer.codebooks.shape[1] == 0  # between steps: nothing but the owned copy

    codebook.load(sharded, inputs_of(sharded, ("s", support), ("t", query)))
    full_codes = [whole.quantizer.step_codes.by_domain[d][1] for d in ("s", "t")]
    chosen = [torch.unique(torch.cat([codes[:, book] for codes in full_codes])) for book in range(2)]
    assert [len(ids) for ids in codebook.held] == [len(ids) for ids in chosen]
    assert sharded.quantizer.codebooks.shape[1] == max(len(ids) for ids in chosen) < 16

    loss = {}
    for name, model in (("whole", whole), ("sharded", sharded)):
        total = model("s", *model.tensors(support)).loss + model("t", *model.tensors(query)).loss
        total.backward()
        loss[name] = total
    assert torch.allclose(loss["sharded"], loss["whole"], atol=1e-6, rtol=0)
    full_gradient = whole.quantizer.codebooks.grad
    for book, ids in enumerate(codebook.held):
        held_gradient = sharded.quantizer.codebooks.grad[book, : len(ids)]
        assert torch.allclose(held_gradient, full_gradient[book, ids], atol=1e-6, rtol=0)
        untouched = torch.ones(16, dtype=torch.bool)
        untouched[ids] = False
        assert torch.all(full_gradient[book, untouched] == 0)  # the rows not held had nothing to learn

    reference = torch.nn.Parameter(whole.quantizer.codebooks.detach().clone())
    reference.grad = full_gradient.clone()
    torch.optim.Adam([reference], lr=0.01).step()
    codebook.step()
    assert sharded.quantizer.codebooks.shape[1] == 0
    with codebook.whole():
        assert torch.allclose(sharded.quantizer.codebooks, reference.detach(), atol=1e-6, rtol=0)
        assert sharded.quantizer.step_codes is None  # whole: searched live (validation)


def test_codebooks_from_the_threshold_on_are_searched_where_they_live_over_several_workers():
    def config(workers, **vq):
        return ExperimentConfig(data={"target": "t", "sources": ["s"]}, model={"vq": {"codewords": 256, **vq}},
                                runner={"workers": workers, "shard_codebook_from": 256})

    assert codebook_is_sharded(config(2), 2)
    assert not codebook_is_sharded(config(1), 1)
    assert not codebook_is_sharded(config(2, codewords=255), 2)
    with pytest.raises(ValueError, match="model.vq.kind: the codebook is searched where it lives"):
        config(2, kind="residual")
    with pytest.raises(ValueError, match="meta.center"):
        ExperimentConfig(data={"target": "t", "sources": ["s"]}, model={"vq": {"codewords": 256}},
                         meta={"center": True}, runner={"workers": 2, "shard_codebook_from": 256})


@pytest.mark.parametrize("method", ["metarec", "joint"])
def test_a_run_with_codes_found_per_step_trains_and_counts_the_codes_it_finds(synthetic_store, tmp_path, capsys,
                                                                               method):
    extra = {"train.pretrain_steps": 3} if method == "joint" else {}
    config = write_config(tmp_path, synthetic_store, method=method, **extra,
                          model={"width": 16, "item_width": 8, "vq": {"num_codebooks": 2, "codewords": 8,
                                                                       "codes": "per_step"},
                                 "encoder": {"layers": 1, "heads": 2, "max_length": 10, "dropout": 0.0}},
                          **{"train.codebook_reinit_every": 2})
    assert main(["train", str(config)]) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    results = json.loads((run_dir / "results.json").read_text())
    assert all(0 < entry["codebook"]["perplexity"] <= 8 for entry in results["history"])  # counted when found
    assert 0 <= results["test"]["NDCG@10"] <= 1
