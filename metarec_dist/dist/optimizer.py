"""One worker's optimizer: sums gradients over workers and updates each parameter where it lives.

The meta-step (``metarec_dist.meta.step.meta_step``) leaves in ``.grad`` this
worker's share of the update (its tasks' weighted meta-gradients, its own
sources' support gradients). ``WorkerOptimizer.step`` turns the shares into one
update, a sum over all tasks of all workers, applied by four owners:

- **the shared encoder**: a DeepSpeed engine (ZeRO stage ``runner.zero_stage``,
  optimizer state partitioned over workers from stage 1 on). The summed
  gradient goes in through a surrogate loss, ``world_size * sum(p * g)``,
  whose backward is ``world_size * g`` per worker; DeepSpeed averages over
  workers, which gives the sum. Clipping is off so the step is exact.
- **the VQ codebook**, sharded by codebook: worker r owns codebooks
  ``r, r + N, r + 2N, ...`` and holds the Adam state (and the master copy) of
  those alone. After the summed gradient is known, each owner steps its
  codebooks and broadcasts them, so at every step boundary each worker has a
  read-only replica for its forward passes. The replica is small (codebooks x
  codewords x code width) next to the item tables, and keeping it makes
  quantization local: no collective ever runs inside ``forward``.
- **the target's parameters and learned inner rates**: every worker needs
  them; they are all-reduced and stepped identically everywhere.
- **a source's own parameters**: only on the worker that owns the source,
  updated from that worker's gradient alone.

Every update is Adam with the run's learning rate and weight decay, so with
one worker, or with ``runner.zero_stage`` off, the result equals the
single-process step (tests/test_distributed.py checks it across 2 workers).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from metarec_dist.meta.config import RunConfig
from metarec_dist.meta.step import Collective
from metarec_dist.model.recommender import SequenceRecommender

log = logging.getLogger(__name__)


def sum_over_workers(tensors: list[torch.Tensor], collective: Collective) -> None:
    """Sum tensors over workers in place, through one flat all-reduce."""
    if collective.world_size == 1 or not tensors:
        return
    flat = torch.cat([t.flatten() for t in tensors])
    collective.all_reduce_sum_([flat])
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def codebook_owner(codebook: int, world_size: int) -> int:
    """Codebook m lives on worker m mod N (round-robin: every worker owns about M/N of them)."""
    return codebook % world_size


class WorkerOptimizer:
    """``step()`` / ``zero_grad()`` like a torch optimizer; see the module docstring."""

    def __init__(
        self,
        model: SequenceRecommender,
        inner_lrs: list[torch.Tensor],
        config: RunConfig,
        target: str,
        collective: Collective,
    ):
        self.model = model
        self.collective = collective
        train = config.train
        adam = {"lr": train.learning_rate, "weight_decay": train.weight_decay}
        named = dict(model.named_parameters())
        encoder_names = [n for n in named if n.startswith("encoder.")]
        self.replicated = [named[n] for n in model.local_names(target)] + list(inner_lrs)
        replicated_groups: list[dict[str, Any]] = [{"params": [named[n] for n in model.local_names(target)]}]
        if inner_lrs:
            replicated_groups.append({"params": list(inner_lrs), "lr": config.meta.inner_lr_learning_rate})
        self.replicated_adam = torch.optim.Adam(replicated_groups, **adam)

        taken = set(encoder_names) | set(model.local_names(target)) | {"quantizer.codebooks"}
        own = [p for n, p in named.items() if n not in taken]  # this worker's sources
        self.local_adam = torch.optim.Adam(own, **adam) if own else None

        # The codebook: Adam over this worker's codebooks only.
        self.codebooks = named.get("quantizer.codebooks")
        self.owned_codebooks: list[int] = []
        self.codebook_shard: torch.nn.Parameter | None = None
        self.codebook_adam = None
        if self.codebooks is not None:
            books = self.codebooks.shape[0]
            self.owned_codebooks = [m for m in range(books) if codebook_owner(m, collective.world_size) == collective.rank]
            if self.owned_codebooks:
                self.codebook_shard = torch.nn.Parameter(self.codebooks.detach()[self.owned_codebooks].clone())
                self.codebook_adam = torch.optim.Adam([self.codebook_shard], **adam)

        self.encoder_parameters = [named[n] for n in encoder_names]
        self.engine = None
        self.encoder_adam = None
        if config.runner.zero_stage is None:
            self.encoder_adam = torch.optim.Adam(self.encoder_parameters, **adam)
            self.replicated = self.encoder_parameters + self.replicated
        else:
            self.engine = _deepspeed_engine(model.encoder, config)

    # --- the torch optimizer interface ------------------------------------------------

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.model.parameters():
            p.grad = None
        for p in self.replicated:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        self._step_replicated()
        self._step_codebook()
        if self.local_adam is not None:
            self.local_adam.step()
        if self.engine is not None:
            self._step_encoder()

    # --- the owners -------------------------------------------------------------------

    def _step_replicated(self) -> None:
        gradients = [_grad_or_zero(p) for p in self.replicated]
        sum_over_workers(gradients, self.collective)
        for p, g in zip(self.replicated, gradients):
            p.grad = g
        self.replicated_adam.step()
        if self.encoder_adam is not None:
            self.encoder_adam.step()

    def _step_codebook(self) -> None:
        if self.codebooks is None:
            return
        gradient = _grad_or_zero(self.codebooks)
        sum_over_workers([gradient], self.collective)
        if self.codebook_shard is not None:
            # Start from the replica: dead-code re-initialisation may have replaced codewords.
            self.codebook_shard.copy_(self.codebooks[self.owned_codebooks])
            self.codebook_shard.grad = gradient[self.owned_codebooks]
            self.codebook_adam.step()
            self.codebooks[self.owned_codebooks] = self.codebook_shard
        for m in range(self.codebooks.shape[0]):  # codebook m from its owner to every worker
            self.collective.broadcast_(self.codebooks.data[m], codebook_owner(m, self.collective.world_size))

    def _step_encoder(self) -> None:
        gradients = [_grad_or_zero(p).clone() for p in self.encoder_parameters]
        for p in self.encoder_parameters:
            p.grad = None
        with torch.enable_grad():
            surrogate = sum((p * g).sum() for p, g in zip(self.encoder_parameters, gradients))
            self.engine.backward(surrogate * self.collective.world_size)
        self.engine.step()

    # --- memory accounting (what this worker holds) -----------------------------------

    def optimizer_state_numel(self) -> dict[str, int]:
        """Numbers of optimizer-state values held here, per owner (the codebook's is about 1/N)."""

        def count(optimizer) -> int:
            if optimizer is None:
                return 0
            return sum(v.numel() for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v) and v.dim())

        return {
            "codebook": count(self.codebook_adam),
            "sources": count(self.local_adam),
            "replicated": count(self.replicated_adam) + count(self.encoder_adam),
        }


def _grad_or_zero(p: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(p) if p.grad is None else p.grad


def _deepspeed_engine(encoder: torch.nn.Module, config: RunConfig):
    """The encoder in a DeepSpeed engine on the process group Ray Train set up."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    deepspeed.utils.logger.setLevel(logging.WARNING)
    ds_config = deepspeed_config(config)
    engine, _, _, _ = deepspeed.initialize(
        model=encoder, model_parameters=list(encoder.parameters()), config=ds_config, dist_init_required=False
    )
    return engine


def deepspeed_config(config: RunConfig) -> dict[str, Any]:
    """The engine's config: from ``runner.deepspeed_config`` if given, with the settings exactness needs."""
    import json

    runner, train = config.runner, config.train
    values: dict[str, Any] = {}
    if runner.deepspeed_config is not None:
        values = json.loads(runner.deepspeed_config.read_text())
    values.setdefault("zero_optimization", {})["stage"] = runner.zero_stage
    values.setdefault("train_micro_batch_size_per_gpu", 1)  # batches are ours; DeepSpeed only steps
    values.setdefault("gradient_accumulation_steps", 1)
    values.setdefault("steps_per_print", 10**9)
    values["gradient_clipping"] = 0.0  # DeepSpeed clips at 1.0 by default: the meta-update must be exact
    values["optimizer"] = {
        "type": "Adam",
        "params": {"lr": train.learning_rate, "weight_decay": train.weight_decay, "torch_adam": True,
                   "adam_w_mode": False},
    }
    return values
