"""Single-process training of every method, through the same pieces.

    load_training_data  ->  Trainer(config, data).run()  ->  TrainingOutcome

Methods (``RunConfig.method``):
- ``metarec``: meta-steps with similarity-rescaled task weights;
- ``uniform``: the same meta-steps with uniform weights (isolates the rescaling);
- ``joint``: multi-source training through the shared VQ space
  (``train.pretrain_steps``), then fine-tuning on the target;
- ``target_only``: SASRec on the target's item ids, no codebook, no sources.

Any method may start with ``train.pretrain_steps`` of joint multi-source
training (a warm-up for MetaRec). Validation on the target every
``train.eval_every`` steps drives early stopping and model selection; the best
state is tested at the end. Nothing here writes files: the caller decides
where results land.

The same trainer runs in every worker of a distributed run: it is handed the
worker's shard of the sources and a ``Collective`` over the workers. Gradients
of theta and the target's parameters are summed over workers (source tasks) or
averaged (target batches, data parallel), so every worker holds the same theta
and target. Every worker ranks its slice of the users at validation and test
(the ranks are gathered); rank 0 (the leader) decides on early stopping and
its decision is broadcast so all workers leave the loop together.
"""

from __future__ import annotations

import logging
import math
import resource
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from tqdm import tqdm

from metarec_dist.data.batches import NextItemBatch, next_item_batch, sample_rows
from metarec_dist.data.sequences import SequenceView
from metarec_dist.data.splits import LeaveOneOutSplit, leave_one_out, limit_target
from metarec_dist.data.store import DomainStore
from metarec_dist.errors import ConfigError, TrainingError
from metarec_dist.eval.metrics import metrics_from_ranks
from metarec_dist.meta.config import RunConfig
from metarec_dist.meta.evaluation import rank_users
from metarec_dist.meta.step import (
    LOCAL,
    Collective,
    MetaConfig,
    TaskBatch,
    initial_inner_lrs,
    meta_step,
    reduced_names,
)
from metarec_dist.model.recommender import SequenceRecommender

log = logging.getLogger(__name__)


@dataclass
class TrainingData:
    target: str
    split: LeaveOneOutSplit  # limited-target training rows; validation and test for every user
    catalogs: dict[str, int]  # domain -> number of items
    sources: dict[str, SequenceView]  # a source's whole sequences are training data


def load_training_data(config: RunConfig, sources: list[str] | None = None) -> TrainingData:
    """Open the target and the sources (default: all configured; a worker: its shard), nothing else."""
    store = DomainStore(config.data.store)
    opening = config.data.sources if sources is None else sources
    wanted = [("data.target", config.data.target)] + [("data.sources", s) for s in opening]
    for field_name, domain in wanted:
        if domain not in store:
            present = ", ".join(store.names()[:10]) or "none"
            raise ConfigError(
                f"{field_name}: domain '{domain}' is not in the store {store.root} (present: {present}); "
                "import or generate it first"
            )
    target = store.open(config.data.target)
    split = limit_target(
        leave_one_out(target.sequences), config.data.limited_target_fraction, config.data.split_seed
    )
    opened = {name: store.open(name) for name in opening}
    catalogs = {config.data.target: target.num_items}
    catalogs.update({name: domain.num_items for name, domain in opened.items()})
    return TrainingData(
        target=config.data.target,
        split=split,
        catalogs=catalogs,
        sources={name: domain.sequences for name, domain in opened.items()},
    )


@dataclass
class TrainingOutcome:
    results: dict[str, Any] | None  # None in a distributed run's non-leader workers
    best_state: dict[str, torch.Tensor]  # theta and the target's parameters at the best validation
    model: SequenceRecommender


@dataclass
class LoopState:
    """Where the main loop stands: with the parameters, all a resumed run needs (JSON-able)."""

    step: int = 0  # main-phase steps done; pre-training is done once step > 0
    best_metric: float = -math.inf
    best_step: int = 0
    best_valid: dict[str, float] = field(default_factory=dict)
    stale: int = 0  # validations since the best
    stopped: bool = False  # early stopping fired
    history: list[dict[str, Any]] = field(default_factory=list)
    pending_losses: list[float] = field(default_factory=list)  # since the last validation
    seconds: float = 0.0  # training time spent before this process started


@dataclass
class StepTime:
    """Where this process's main-step wall time went (since it started; for per-worker results)."""

    steps: int = 0
    total: float = 0.0
    in_collectives: float = 0.0  # gathers and reductions, waiting for the slower worker included
    in_encoder_engine: float = 0.0  # the DeepSpeed engine's backward and step, its collectives included

    def per_step_ms(self) -> dict[str, float]:
        per = 1000.0 / max(self.steps, 1)
        return {"total": self.total * per, "in_collectives": self.in_collectives * per,
                "in_encoder_engine": self.in_encoder_engine * per}


@dataclass
class _SourceWeights:
    """Per-source weight bookkeeping: which sources the target listens to."""

    total_relative: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    times_sampled: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    history: list[dict[str, Any]] = field(default_factory=list)

    def record(self, step: int, sources: list[str], similarities: list[float], weights: list[float]) -> None:
        for source, weight in zip(sources, weights):
            self.total_relative[source] += weight * len(sources)  # 1.0 = a uniform share
            self.times_sampled[source] += 1
        self.history.append({"step": step, "sources": sources, "similarities": similarities, "weights": weights})

    def to_json(self) -> dict[str, Any]:
        return {"total_relative": dict(self.total_relative), "times_sampled": dict(self.times_sampled),
                "history": self.history}

    def load_json(self, values: dict[str, Any]) -> None:
        self.total_relative.clear()
        self.total_relative.update(values["total_relative"])
        self.times_sampled.clear()
        self.times_sampled.update(values["times_sampled"])
        self.history[:] = values["history"]

    def summary(self) -> dict[str, dict[str, float]]:
        return {
            source: {
                "mean_relative_weight": self.total_relative[source] / self.times_sampled[source],
                "times_sampled": self.times_sampled[source],
            }
            for source in sorted(self.times_sampled)
        }


class Trainer:
    def __init__(
        self,
        config: RunConfig,
        data: TrainingData,
        progress: bool = True,
        collective: Collective = LOCAL,
        make_optimizer: OptimizerFactory | None = None,
    ):
        """``make_optimizer(model, inner_lrs, config)``: the optimizer; across workers its ``step``
        sums the gradients over them (``metarec_dist.dist.optimizer``). Default: Adam in this process."""
        self.config = config
        self.data = data
        self.collective = collective
        self.progress = progress and collective.rank == 0
        train = config.train
        if train.threads:
            torch.set_num_threads(train.threads)
        torch.manual_seed(train.seed)  # the same theta and target tables in every worker
        self.rng = np.random.default_rng(train.seed + collective.rank)  # batches differ per worker
        catalogs = data.catalogs if config.method != "target_only" else {data.target: data.catalogs[data.target]}
        self.model = SequenceRecommender(config.effective_model, catalogs)
        if self.model.quantizer is not None:
            # A data-seeded codebook saw only this worker's domains: theta starts as the leader's.
            collective.broadcast_(self.model.quantizer.codebooks.data, source=0)
        self.meta_config: MetaConfig = config.meta
        if config.method == "uniform":
            self.meta_config = config.meta.model_copy(update={"weighting": "uniform"})
        self.inner_lrs = initial_inner_lrs(self.model, self.meta_config) if self._is_meta else []
        self.optimizer = (make_optimizer or local_adam)(self.model, self.inner_lrs, config)
        self.training_rows = data.split.training_users
        if len(self.training_rows) == 0:
            raise ConfigError("data.limited_target_fraction: no target user keeps training data; raise it")
        self.length = config.model.encoder.max_length
        self.weights = _SourceWeights()
        self.loop = LoopState()
        self.step_time = StepTime()
        self.best_state: dict[str, torch.Tensor] | None = None

    @property
    def _is_meta(self) -> bool:
        return self.config.method in ("metarec", "uniform")

    # --- batches -------------------------------------------------------------------

    def _target_batch(self) -> NextItemBatch:
        rows = sample_rows(self.training_rows, self.config.train.batch_size, self.rng)
        return next_item_batch(self.data.split.train, rows, self.length)

    def _source_batch(self, source: str) -> NextItemBatch:
        view = self.data.sources[source]
        rows = sample_rows(np.arange(len(view)), self.config.train.batch_size, self.rng)
        return next_item_batch(view, rows, self.length)

    def _sample_sources(self) -> list[str]:
        names = sorted(self.data.sources)
        count = min(self.meta_config.tasks_per_step, len(names))
        return [names[i] for i in self.rng.choice(len(names), size=count, replace=False)]

    # --- steps ---------------------------------------------------------------------

    def _gradient_step(self, losses: dict[str, torch.Tensor], step: int, average: bool) -> float:
        """Gradients of the summed losses; the optimizer sums them over workers (source tasks),
        or averages them when ``average`` (target batches: plain data parallelism)."""
        total = sum(losses.values())
        everyone = self.collective.all_gather_object({domain: loss.item() for domain, loss in losses.items()})
        _check_finite(step, {domain: loss for rows in everyone for domain, loss in rows.items()})
        # autograd.grad, not backward(): a DeepSpeed engine's gradient hooks must only see its own backward.
        parameters = [p for p in self.model.parameters() if p.requires_grad]
        gradients = torch.autograd.grad(total, parameters, allow_unused=True)
        scale = 1.0 / self.collective.world_size if average else 1.0
        for p, gradient in zip(parameters, gradients):
            p.grad = None if gradient is None else gradient * scale
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total.item()

    def _joint_step(self, step: int) -> float:
        """One batch from each sampled source, summed (pre-training / warm-up)."""
        losses = {}
        for source in self._sample_sources():
            batch = self._source_batch(source)
            losses[source] = self.model(source, torch.as_tensor(batch.inputs), torch.as_tensor(batch.targets)).loss
        return self._gradient_step(losses, step, average=False)

    def _target_step(self, step: int) -> float:
        batch = self._target_batch()
        loss = self.model(self.data.target, torch.as_tensor(batch.inputs), torch.as_tensor(batch.targets)).loss
        return self._gradient_step({self.data.target: loss}, step, average=True)

    def _meta_step(self, step: int) -> float:
        tasks = [TaskBatch(source, self._source_batch(source), self._target_batch()) for source in self._sample_sources()]
        result = meta_step(
            self.model, self.optimizer, self.data.target, tasks, self.meta_config, self.inner_lrs, self.collective
        )
        if not math.isfinite(result.query_loss):
            raise TrainingError(
                f"step {step}: query loss on target '{self.data.target}' is {result.query_loss} "
                f"(sources {result.sources}); lower train.learning_rate or meta.inner_lr"
            )
        self.weights.record(step, result.sources, result.similarities, result.weights)
        return result.query_loss

    # --- evaluation ----------------------------------------------------------------

    def evaluate(self, stage: str) -> dict[str, float]:
        """Full-catalog ranking of the target's validation or test items, every user (a collective).

        Each process ranks its slice of the users (``users[rank::world]``)
        through the configured searcher; the ranks are gathered, so every
        process returns the metrics over all users.
        """
        users = np.arange(self.data.split.num_users)[self.collective.rank :: self.collective.world_size]
        self.model.eval()
        try:
            ranks = rank_users(
                self.model, self.data.target, self.data.split, stage, self.config.eval, self.length, users
            )
        finally:
            self.model.train()
        all_ranks = np.concatenate(self.collective.all_gather_object(ranks))
        return {**metrics_from_ranks(all_ranks, self.config.eval.ks), "users": len(all_ranks)}

    # --- the loop ------------------------------------------------------------------

    def run(
        self,
        on_validation: Callable[[dict[str, Any]], None] | None = None,
        after_step: Callable[[int], None] | None = None,
    ) -> TrainingOutcome:
        """Train, validate, select, test; from ``self.loop`` on (a resumed run has restored it).

        ``on_validation(entry)`` runs in every process at each validation, and
        ``after_step(step)`` after every main step once its bookkeeping is
        done (where checkpoints are taken). In a distributed run only the
        leader's outcome carries results; the others return ``results=None``.
        """
        train, loop = self.config.train, self.loop
        leader = self.collective.rank == 0
        started = time.perf_counter() - loop.seconds
        if loop.step == 0:
            for step in tqdm(range(train.pretrain_steps), desc="pre-training on sources", disable=not self.progress):
                self._joint_step(step)
                self._maybe_reinit_codes(step)

        main_step = self._meta_step if self._is_meta else self._target_step
        steps = range(loop.step + 1, train.steps + 1) if not loop.stopped else range(0)
        bar = tqdm(steps, desc=self.config.method, disable=not self.progress or loop.stopped)
        for step in bar:
            loop.pending_losses.append(self._timed(main_step, step))
            loop.step = step
            if step % train.eval_every == 0 or step == train.steps:
                entry = self._validate(step, started, leader)
                bar.set_postfix(loss=f"{entry['train_loss']:.3f}", valid=f"{entry['valid'][train.selection_metric]:.4f}")
                if on_validation is not None:
                    on_validation(entry)
            else:
                self._maybe_reinit_codes(step)
            loop.seconds = time.perf_counter() - started
            if after_step is not None:
                after_step(step)
            if loop.stopped:
                break

        per_worker = self.collective.all_gather_object(self._what_this_process_holds())
        self.model.load_state_dict(self.best_state, strict=False)
        test = self.evaluate("test")  # every process ranks its slice of the users
        if not leader:
            return TrainingOutcome(results=None, best_state=self.best_state, model=self.model)
        results = {
            "method": self.config.method,
            "target": self.data.target,
            "sources": sorted(self.config.data.sources),
            "limited_target_fraction": self.config.data.limited_target_fraction,
            "training_users": int(len(self.training_rows)),
            "seed": train.seed,
            "workers": self.collective.world_size,
            "per_worker": per_worker,
            "best_step": loop.best_step,
            "steps_run": loop.history[-1]["step"],
            "wall_seconds": time.perf_counter() - started,
            "selection_metric": train.selection_metric,
            "validation": loop.best_valid,
            "test": test,
            "history": loop.history,
            "parameters": sum(p.numel() for p in self.model.parameters()),  # this process's
        }
        if self._is_meta:
            results["source_weights"] = {"final": self.weights.summary(), "history": self.weights.history}
        return TrainingOutcome(results=results, best_state=self.best_state, model=self.model)

    def progress_record(self, step: int) -> dict[str, Any]:
        """What progress displays and logs show after ``step`` (the leader's view; JSON-able).

        ``loss``: the step's (at a validation, the mean since the previous one);
        at validations ``valid`` (the selection metric) and ``valid_metrics``
        (all); for meta-steps ``step_weights``, each task's weight relative to
        a uniform share, and ``top_sources`` by mean relative weight so far.
        """
        loop = self.loop
        record: dict[str, Any] = {"step": step, "seconds": loop.seconds}
        if loop.pending_losses:
            record["loss"] = loop.pending_losses[-1]
        if loop.history and loop.history[-1]["step"] == step:  # just validated
            record["loss"] = loop.history[-1]["train_loss"]
            record["valid_metrics"] = loop.history[-1]["valid"]
            record["valid"] = record["valid_metrics"][self.config.train.selection_metric]
        if self.weights.history and self.weights.history[-1]["step"] == step:
            last = self.weights.history[-1]
            record["step_weights"] = {source: weight * len(last["sources"])
                                      for source, weight in zip(last["sources"], last["weights"])}
        summary = self.weights.summary()
        if summary:
            top = sorted(summary.items(), key=lambda item: -item[1]["mean_relative_weight"])[:3]
            record["top_sources"] = [(name, round(values["mean_relative_weight"], 2)) for name, values in top]
        return record

    def _timed(self, main_step: Callable[[int], float], step: int) -> float:
        """``main_step(step)``, its wall time added to ``self.step_time``."""
        started, collectives, engine = time.perf_counter(), self.collective.seconds, self._engine_seconds()
        loss = main_step(step)
        self.step_time.steps += 1
        self.step_time.total += time.perf_counter() - started
        self.step_time.in_collectives += self.collective.seconds - collectives
        self.step_time.in_encoder_engine += self._engine_seconds() - engine
        return loss

    def _engine_seconds(self) -> float:
        """A WorkerOptimizer times its DeepSpeed engine; a plain torch optimizer has none."""
        return getattr(self.optimizer, "engine_seconds", 0.0)

    def _validate(self, step: int, started: float, leader: bool) -> dict[str, Any]:
        """Every process ranks its slice of the users; the leader decides on early stopping for all.

        Each process keeps its own copy of the best state (theta and the target
        are the same everywhere), so the final test is sharded too.
        """
        train, loop = self.config.train, self.loop
        health = self._codebook_health()  # read before dead codes are replaced
        valid = self.evaluate("valid")
        entry, improved = None, False
        if leader:
            metric = valid[train.selection_metric]
            entry = {
                "step": step,
                "seconds": time.perf_counter() - started,
                "train_loss": float(np.mean(loop.pending_losses)),
                "valid": valid,
                **health,
            }
            loop.history.append(entry)
            log.info("step %d loss %.4f valid %s %.4f", step, entry["train_loss"], train.selection_metric, metric)
            improved = metric > loop.best_metric or self.best_state is None  # a NaN metric still yields a model
            if improved:
                loop.best_metric, loop.best_step, loop.best_valid, loop.stale = metric, step, valid, 0
            else:
                loop.stale += 1
                loop.stopped = loop.stale >= train.patience
                if loop.stopped:
                    log.info("early stop at step %d (best %s %.4f at step %d)",
                             step, train.selection_metric, loop.best_metric, loop.best_step)
        entry, loop.stopped, improved = self.collective.broadcast_object((entry, loop.stopped, improved))
        if improved:
            self.best_state = self._target_model_state()
        loop.pending_losses.clear()
        self._maybe_reinit_codes(step)
        return entry

    def _what_this_process_holds(self) -> dict[str, Any]:
        """Sources, parameter counts and peak memory of this process (per worker in results)."""
        shared = set(self.model.shared_names())
        counts = {"shared": 0, "target": 0, "sources": 0}
        target = set(self.model.local_names(self.data.target))
        for name, p in self.model.named_parameters():
            counts["shared" if name in shared else "target" if name in target else "sources"] += p.numel()
        return {
            "rank": self.collective.rank,
            "sources": len(self.data.sources),
            "parameters": counts,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: KiB
            "main_step_ms": self.step_time.per_step_ms(),
        }

    def _target_model_state(self) -> dict[str, torch.Tensor]:
        """What recommending in the target needs: theta and the target's own parameters (copies)."""
        state = self.model.state_dict()
        return {name: state[name].detach().clone() for name in reduced_names(self.model, self.data.target)}

    # --- the codebook at step boundaries ----------------------------------------------

    def _maybe_reinit_codes(self, step: int) -> None:
        """Replace dead codewords, the same way in every worker.

        Usage is summed over workers; the leader picks the replacements and its
        codebook is broadcast, so theta stays identical everywhere.
        """
        every = self.config.train.codebook_reinit_every
        quantizer = self.model.quantizer
        if quantizer is None or not every or step % every:
            return
        self.collective.all_reduce_sum_([quantizer.usage])
        if self.collective.rank == 0:
            quantizer.reinit_dead_codes()
        else:
            quantizer.usage.zero_()
        self.collective.broadcast_(quantizer.codebooks.data, source=0)

    def summed_codebook_usage(self) -> torch.Tensor:
        """Codeword assignment counts since the last re-initialisation, summed over workers (a collective)."""
        usage = self.model.quantizer.usage.clone()
        self.collective.all_reduce_sum_([usage])
        return usage

    def _codebook_health(self) -> dict[str, Any]:
        """Perplexity and dead codes over every worker's assignments since the last re-initialisation."""
        if self.model.quantizer is None:
            return {}
        return {"codebook": self.model.quantizer.health(self.summed_codebook_usage())}


OptimizerFactory = Callable[[SequenceRecommender, list[torch.Tensor], RunConfig], torch.optim.Optimizer]


def local_adam(model: SequenceRecommender, inner_lrs: list[torch.Tensor], config: RunConfig) -> torch.optim.Optimizer:
    """Adam over every parameter in this process (learned inner rates at their own rate)."""
    groups = [{"params": list(model.parameters())}]
    if inner_lrs:
        groups.append({"params": inner_lrs, "lr": config.meta.inner_lr_learning_rate})
    return torch.optim.Adam(groups, lr=config.train.learning_rate, weight_decay=config.train.weight_decay)


def _check_finite(step: int, losses: dict[str, float]) -> None:
    """Every worker sees every worker's losses, so all of them stop together."""
    bad = {domain: loss for domain, loss in losses.items() if not math.isfinite(loss)}
    if bad:
        raise TrainingError(f"step {step}: non-finite loss on domain(s) {bad}; lower train.learning_rate")
