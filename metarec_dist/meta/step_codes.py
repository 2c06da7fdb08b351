"""Where a training step's codes come from (``vq.codes``), and which codewords a process holds.

- ``LIVE_CODES`` (``vq.codes: live``): every forward searches the codebook it holds;
  nothing happens between steps.
- ``LocalStepCodes`` (``vq.codes: per_step``, the codebook held whole here): before
  a step's forwards, ``load`` finds the codes of every item the step quantizes
  once, against the codebook the step starts from, and counts them for the
  codebook's health; the forwards then look them up.
- ``metarec_dist.distributed.codebook_shards.ShardedCodebook``: the same per-step
  codes, found by the workers that own each codebook; a worker holds only the
  codewords its step chose.

A step passes ``load`` the (domain, inputs) batches its forwards read
(``quantized_reads`` turns them into the items quantized per domain);
``whole()`` gives a block of code (validation, checkpoints, dead-code upkeep)
the whole codebook, searched live.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Protocol

import torch

from metarec_dist.model.recommender import SequenceRecommender
from metarec_dist.model.vq import StepCodes

# The items (sorted ids) a step quantizes, per domain.
Reads = dict[str, torch.Tensor]
# What a step's forwards read: (domain, inputs) pairs.
Batches = list[tuple[str, torch.Tensor]]


class StepCodebook(Protocol):
    def load(self, model: SequenceRecommender, batches: Batches) -> None:
        """Before a step: codes of the items ``batches`` quantize, for its forwards (a collective where
        sharded)."""

    def whole(self, keep_changes: bool = False) -> contextlib.AbstractContextManager[None]:
        """The whole codebook, searched live, for a block of code; ``keep_changes``: its values at the end
        are kept (dead codewords replaced, a checkpoint loaded). A collective where sharded."""


class LiveCodes:
    """``vq.codes: live``: forwards search; nothing to load."""

    def load(self, model: SequenceRecommender, batches: Batches) -> None:
        return None

    def whole(self, keep_changes: bool = False) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()


LIVE_CODES = LiveCodes()


class LocalStepCodes:
    """``vq.codes: per_step`` with the whole codebook in this process."""

    def __init__(self, model: SequenceRecommender):
        self.quantizer = model.quantizer

    @torch.no_grad()
    def load(self, model: SequenceRecommender, batches: Batches) -> None:
        by_domain = {}
        for domain, ids in sorted(quantized_reads(model, batches).items()):
            sub_vectors = model.quantizer_inputs(domain, ids)
            codes = self.quantizer.search(sub_vectors)
            self.quantizer.record(codes, sub_vectors)
            by_domain[domain] = (ids, codes)
        self.quantizer.step_codes = StepCodes(by_domain)

    @contextlib.contextmanager
    def whole(self, keep_changes: bool = False) -> Iterator[None]:
        self.quantizer.step_codes = None  # the codebook may change in the block: the next step searches again
        yield


def step_codebook_for(model: SequenceRecommender) -> StepCodebook:
    """Where a step's codes come from when the whole codebook is in this process (``vq.codes``)."""
    if model.quantizer is not None and model.config.vq.codes == "per_step":
        return LocalStepCodes(model)
    return LIVE_CODES


def quantized_reads(model: SequenceRecommender, batches: Batches) -> Reads:
    """The items a step's forwards quantize, per domain: ``batches`` are (domain, inputs) pairs."""
    reads: Reads = {}
    for domain, inputs in batches:
        ids = model.quantized_ids(domain, inputs)
        reads[domain] = ids if domain not in reads else torch.unique(torch.cat([reads[domain], ids]))
    return reads
