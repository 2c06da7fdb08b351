"""One training step of each method: what a step samples, which loss it takes, how it updates.

    joint    one batch from each of ``meta.tasks_per_step`` sampled sources, the losses summed
    target   one batch of the target (``target_only`` and fine-tuning)
    meta     ``meta.tasks_per_step`` tasks (source support, target query) through ``step.meta_step``

Gradients of a sum over source tasks are summed over workers by the optimizer; target
batches are data parallel, so their gradients are averaged. Every step returns its loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from metarec_dist.errors import TrainingError
from metarec_dist.meta.records import SourceWeights
from metarec_dist.meta.sampling import BatchSampler
from metarec_dist.meta.step import Collective, MetaConfig, RunningDirection, TargetRows, TaskBatch, meta_step
from metarec_dist.meta.step_codes import Batches, StepCodebook
from metarec_dist.model.recommender import SequenceRecommender


class MethodSteps:
    """The step functions of every method over one model, optimizer, sampler and collective."""

    def __init__(
        self,
        model: SequenceRecommender,
        optimizer: torch.optim.Optimizer,
        sampler: BatchSampler,
        collective: Collective,
        target: str,
        meta_config: MetaConfig,
        inner_lrs: list[torch.Tensor],
        weights: SourceWeights,
        target_rows: TargetRows,
        step_codebook: StepCodebook,
    ):
        self.model, self.optimizer, self.sampler, self.collective = model, optimizer, sampler, collective
        self.target_domain, self.meta_config, self.inner_lrs, self.weights = target, meta_config, inner_lrs, weights
        self.target_rows, self.step_codebook = target_rows, step_codebook
        self.direction = RunningDirection(meta_config.direction_decay)  # read with meta.direction running_mean

    def for_method(self, method: str) -> Callable[[int], float]:
        """The main step of ``method`` (``joint`` pre-trains with ``joint`` and fine-tunes with ``target``)."""
        return self.meta if method in ("metarec", "uniform") else self.target

    def joint(self, step: int) -> float:
        """One batch from each sampled source, summed (pre-training / warm-up)."""
        batches = {source: self.model.tensors(self.sampler.source_batch(source))
                   for source in self.sampler.sources(self.meta_config.tasks_per_step)}
        self._load_codes([(source, inputs) for source, (inputs, _) in batches.items()])
        losses = {source: self.model(source, *tensors).loss for source, tensors in batches.items()}
        return self._gradient_step(losses, step, average=False)

    def target(self, step: int) -> float:
        batch = self.sampler.target_batch()
        inputs, targets = self.model.tensors(batch)
        negatives = self.model.draw_negatives(self.target_domain)
        self._load_target_rows([(inputs, targets, negatives)])
        self._load_codes([(self.target_domain, inputs)])
        loss = self.model(self.target_domain, inputs, targets, negatives).loss
        return self._gradient_step({self.target_domain: loss}, step, average=True)

    def meta(self, step: int) -> float:
        tasks = [TaskBatch(source, self.sampler.source_batch(source), self.sampler.target_batch(),
                           self.model.draw_negatives(self.target_domain))
                 for source in self.sampler.sources(self.meta_config.tasks_per_step)]
        self._load_target_rows([(*self.model.tensors(task.query), task.query_negatives) for task in tasks])
        self._load_codes([(domain, self.model.tensors(batch)[0]) for task in tasks
                          for domain, batch in ((task.source, task.support), (self.target_domain, task.query))])
        result = meta_step(self.model, self.optimizer, self.target_domain, tasks, self.meta_config, self.inner_lrs,
                           self.collective, self.direction)
        self._forget_codes()
        if not math.isfinite(result.query_loss):
            raise TrainingError(
                f"step {step}: query loss on target '{self.target_domain}' is {result.query_loss} "
                f"(sources {result.sources}); lower train.learning_rate or meta.inner_lr"
            )
        self.weights.record(step, result.sources, result.similarities, result.weights)
        return result.query_loss

    def _load_target_rows(self, reads: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]) -> None:
        """Before a step: the target's rows its (inputs, targets, negatives) read, where the table lives
        (split over workers, it holds only those)."""
        ids = [self.model.rows_read(self.target_domain, *read) for read in reads]
        if all(rows is not None for rows in ids):  # the full softmax reads every row: never split
            self.target_rows.load(torch.unique(torch.cat(ids)))

    def _load_codes(self, batches: Batches) -> None:
        """Before a step with codes fixed per step (``vq.codes``): the codes of the items the step's
        (domain, inputs) batches quantize, where the codebook lives (nothing with live codes)."""
        self.step_codebook.load(self.model, batches)

    def _forget_codes(self) -> None:
        """After a step: its codes describe the codebook it started from, not the updated one."""
        if self.model.quantizer is not None:
            self.model.quantizer.step_codes = None

    def _gradient_step(self, losses: dict[str, torch.Tensor], step: int, average: bool) -> float:
        """Gradients of the summed losses; the optimizer sums them over workers (source tasks),
        or averages them when ``average`` (target batches: plain data parallelism)."""
        total = sum(losses.values())
        everyone = self.collective.all_gather_object({domain: loss.item() for domain, loss in losses.items()})
        check_finite(step, {domain: loss for rows in everyone for domain, loss in rows.items()})
        # autograd.grad, not backward(): a DeepSpeed engine's gradient hooks must only see its own backward.
        parameters = [p for p in self.model.parameters() if p.requires_grad]
        gradients = torch.autograd.grad(total, parameters, allow_unused=True)
        scale = 1.0 / self.collective.world_size if average else 1.0
        for p, gradient in zip(parameters, gradients):
            p.grad = None if gradient is None else gradient * scale
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._forget_codes()
        return total.item()


def check_finite(step: int, losses: dict[str, float]) -> None:
    """Every worker sees every worker's losses, so all of them stop together."""
    bad = {domain: loss for domain, loss in losses.items() if not math.isfinite(loss)}
    if bad:
        raise TrainingError(f"step {step}: non-finite loss on domain(s) {bad}; lower train.learning_rate")
