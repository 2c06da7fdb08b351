"""The VQ codebook searched where it lives: each worker holds its codebooks' codewords and Adam state.

The plan is data, the same in every worker: codebook m lives on worker
``m mod W`` (``codebook_owner``). Per training step, every exchange explicit and
at the step's boundaries (never inside ``forward``):

1. ``load(model, batches)`` before it: each worker computes the sub-vectors of the
   items its step quantizes (``SequenceRecommender.quantizer_inputs``); they are
   gathered, each owner finds their nearest codewords in its codebooks and
   answers with the codes and the codewords chosen; each worker's quantizer then
   holds only those codewords (``[M, H, d]``, H the most chosen in one codebook,
   zero rows after a codebook's own) and the codes, renumbered into them
   (``vq.codes: per_step``: the codes are fixed for the step);
2. forward and backward on those codewords, as on a whole codebook;
3. ``step()`` after it: every worker's (codeword ids, gradients) are gathered;
   each owner adds up those of its codebooks and takes an Adam step over them,
   as the replicated codebook's owner does with the all-reduced gradient. The
   quantizer then holds no codeword until the next ``load``.

Owners count the codes they hand out (the codebook's health) and every worker
keeps the last sub-vectors searched (dead-code replacements). Validation,
checkpoints and dead-code upkeep read the whole codebook: ``whole()`` assembles
it (one all-reduce) for a block of code. ``all_gather_object`` hands every
worker every worker's part: fine for the few workers of one run.

What travels per step is the step's sub-vectors and the codewords chosen, not
the codebook; docs/BENCHMARKS.md ("The codebook: replicated, or searched where
it lives") measures when that is less than a replica's two codebook-sized
tensors, which is where ``runner.shard_codebook_from`` switches to this.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from metarec_dist.meta.step import Collective
from metarec_dist.meta.step_codes import Batches, quantized_reads
from metarec_dist.model.recommender import SequenceRecommender
from metarec_dist.model.vq import RECENT_VECTORS, StepCodes, VectorQuantizer, nearest_codewords


def codebook_owner(codebook: int, world_size: int) -> int:
    """Codebook m lives on worker m mod N (round-robin: every worker owns about M/N of them)."""
    return codebook % world_size


def owned_codebooks(books: int, collective: Collective) -> list[int]:
    """The codebooks this worker owns, in order."""
    return [m for m in range(books) if codebook_owner(m, collective.world_size) == collective.rank]


class ShardedCodebook:
    """The model's codebook, each codebook on its owner (see the module docstring)."""

    def __init__(self, quantizer: VectorQuantizer, collective: Collective, learning_rate: float,
                 weight_decay: float):
        """``quantizer`` holds the whole codebook now (the same in every worker) and only a step's
        codewords from here on."""
        self.quantizer, self.collective = quantizer, collective
        self.shape = tuple(quantizer.codebooks.shape)  # [M, K, d]
        self.owned = owned_codebooks(self.shape[0], collective)
        self.own = torch.nn.Parameter(quantizer.codebooks.detach()[self.owned].clone())
        self.adam = torch.optim.Adam([self.own], lr=learning_rate, weight_decay=weight_decay)
        self.held: list[torch.Tensor] = []  # per codebook, the ids of the codewords held (sorted)
        self._hold_nothing()

    # --- a step ---------------------------------------------------------------------

    @torch.no_grad()
    def load(self, model: SequenceRecommender, batches: Batches) -> None:
        """Codes of the items ``batches`` quantize, found by the owners; hold the codewords chosen (a
        collective)."""
        items = dict(sorted(quantized_reads(model, batches).items()))
        device = self.own.device
        # Pickled on the CPU: a GPU tensor would unpickle onto the sender's device index.
        mine = torch.cat([model.quantizer_inputs(domain, ids) for domain, ids in items.items()]).cpu() \
            if items else torch.empty(0, self.shape[0], self.shape[2])
        everyone = self.collective.all_gather_object(mine)  # [rank] -> [n_r, M, d]
        answers = {rank: {} for rank in range(len(everyone))}
        for position, book in enumerate(self.owned):
            codewords = self.own[position : position + 1].detach().float()
            for rank, sub_vectors in enumerate(everyone):
                codes = nearest_codewords(sub_vectors[:, book : book + 1].to(device), codewords)[:, 0]
                self.quantizer.usage[book] += torch.bincount(codes, minlength=self.shape[1]).to(self.quantizer.usage)
                chosen = torch.unique(codes)
                answers[rank][book] = (codes.cpu(), chosen.cpu(), self.own[position, chosen].detach().cpu())
        replies = self.collective.all_gather_object(answers)  # [owner][requester] -> {book: answer}
        by_book = {book: answer for owner in replies for book, answer in owner[self.collective.rank].items()}
        self._hold([by_book[book] for book in range(self.shape[0])], items)
        self.quantizer.recent = torch.cat(everyone)[-RECENT_VECTORS:].float().to(device)

    def _hold(self, answers: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
              items: dict[str, torch.Tensor]) -> None:
        """Hold each codebook's chosen codewords; codes renumbered into them, split back per domain."""
        device = self.own.device
        self.held = [chosen.to(device) for _, chosen, _ in answers]
        width = max([len(chosen) for chosen in self.held] + [1])
        held = torch.zeros(self.shape[0], width, self.shape[2], dtype=self.own.dtype, device=device)
        codes = []
        for book, (book_codes, chosen, rows) in enumerate(answers):
            held[book, : len(chosen)] = rows.to(device)
            codes.append(torch.searchsorted(chosen, book_codes).to(device))
        self.quantizer.codebooks.data = held
        codes = torch.stack(codes, dim=1)
        by_domain, start = {}, 0
        for domain, ids in items.items():
            by_domain[domain] = (ids, codes[start : start + len(ids)])
            start += len(ids)
        self.quantizer.step_codes = StepCodes(by_domain)

    @torch.no_grad()
    def step(self) -> None:
        """Every worker's gradients of the codewords it held to their owners; each owner updates its
        codebooks (a collective; every worker calls it, with or without a gradient)."""
        gradient = self.quantizer.codebooks.grad
        part = None
        if gradient is not None:
            part = [(ids.cpu(), gradient[book, : len(ids)].cpu()) for book, ids in enumerate(self.held)]
        everyone = [p for p in self.collective.all_gather_object(part) if p is not None]
        self.quantizer.codebooks.grad = None
        self._hold_nothing()
        if not everyone or not self.owned:
            return  # no worker used the codebook (as the replicated owner skips a missing gradient)
        summed = torch.zeros_like(self.own)
        for position, book in enumerate(self.owned):
            for worker in everyone:
                ids, rows = worker[book]
                summed[position].index_add_(0, ids.to(summed.device), rows.to(summed))
        self.own.grad = summed
        self.adam.step()
        self.own.grad = None

    # --- the whole codebook ---------------------------------------------------------

    @contextlib.contextmanager
    def whole(self, keep_changes: bool = False) -> Iterator[None]:
        codebook = self.own.new_zeros(self.shape)
        codebook[self.owned] = self.own.detach()
        self.collective.all_reduce_sum_([codebook])  # every codebook has one owner: the sum is the whole
        self.quantizer.codebooks.data = codebook
        self.quantizer.step_codes = None
        try:
            yield
        finally:
            if keep_changes:
                with torch.no_grad():
                    self.own.copy_(self.quantizer.codebooks[self.owned])
            self._hold_nothing()

    def numel(self) -> int:
        """Values held here between steps: the owned codebooks and their moments."""
        return self.own.numel() + sum(v.numel() for v in self.adam.state.get(self.own, {}).values()
                                      if torch.is_tensor(v) and v.dim())

    def _hold_nothing(self) -> None:
        self.quantizer.codebooks.data = self.own.new_zeros(self.shape[0], 0, self.shape[2])
        self.quantizer.step_codes = None
        self.held = []
