"""Single-process training of every method, through the same pieces.

    load_training_data  ->  Trainer(config, data).run()  ->  TrainingOutcome

Methods (``ExperimentConfig.method``):
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

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from metarec_dist.device import process_device, random_states, restore_random_states, use_device
from metarec_dist.errors import ConfigError
from metarec_dist.eval.metrics import metrics_from_ranks
from metarec_dist.machine import peak_resident_mb
from metarec_dist.meta.codebook_upkeep import codebook_health, reinit_dead_codes_everywhere
from metarec_dist.meta.config import ExperimentConfig
from metarec_dist.meta.evaluation import rank_users
from metarec_dist.meta.method_steps import MethodSteps
from metarec_dist.meta.records import LoopState, SourceWeights, StepTime
from metarec_dist.meta.row_sparse_adam import RowSparseAdam
from metarec_dist.meta.sampling import BatchSampler
from metarec_dist.meta.step import (
    LOCAL,
    WHOLE_TARGET_TABLE,
    Collective,
    MetaConfig,
    TargetRows,
    initial_inner_lrs,
    reduced_names,
)
from metarec_dist.meta.step_codes import StepCodebook, step_codebook_for
from metarec_dist.meta.training_data import TrainingData
from metarec_dist.model.recommender import SequenceRecommender

log = logging.getLogger(__name__)


@dataclass
class TrainingOutcome:
    results: dict[str, Any] | None  # None in a distributed run's non-leader workers
    best_state: dict[str, torch.Tensor]  # theta and the target's parameters at the best validation
    model: SequenceRecommender


class Trainer:
    def __init__(
        self,
        config: ExperimentConfig,
        data: TrainingData,
        progress: bool = True,
        collective: Collective = LOCAL,
        make_optimizer: OptimizerFactory | None = None,
        device: torch.device | None = None,
    ):
        """``make_optimizer(model, inner_lrs, config)``: the optimizer; across workers its ``step``
        sums the gradients over them (``metarec_dist.distributed.optimizer``). Default: Adam in this process.
        ``device``: this process's (a Ray Train worker's); default ``train.device``."""
        self.config = config
        self.device = device if device is not None else process_device(config.train.device)
        use_device(self.device)
        self.data = data
        self.collective = collective
        self.progress = progress and collective.rank == 0
        train = config.train
        if train.threads:
            torch.set_num_threads(train.threads)
        torch.manual_seed(train.seed)  # the same theta and target tables in every worker
        catalogs = data.catalogs if config.method != "target_only" else {data.target: data.catalogs[data.target]}
        self.model = SequenceRecommender(config.effective_model, catalogs).to(self.device)
        for domain in catalogs:
            self.model.set_item_frequencies(domain, torch.from_numpy(data.event_counts(domain)))
        if self.model.quantizer is not None:
            # A data-seeded codebook saw only this worker's domains: theta starts as the leader's.
            collective.broadcast_(self.model.quantizer.codebooks.data, source=0)
        self.meta_config: MetaConfig = config.meta
        if config.method == "uniform":
            self.meta_config = config.meta.model_copy(update={"weighting": "uniform"})
        self.inner_lrs = initial_inner_lrs(self.model, self.meta_config) if self._is_meta else []
        self.optimizer = (make_optimizer or local_adam)(self.model, self.inner_lrs, config)
        # Where the target's table lives: whole here, or split by rows over workers (the optimizer's).
        self.target_rows: TargetRows = getattr(self.optimizer, "target_rows", WHOLE_TARGET_TABLE)
        # Where a step's codes come from: the optimizer's where it shards the codebook, else this process's.
        self.step_codebook: StepCodebook = getattr(self.optimizer, "step_codebook", None) or step_codebook_for(
            self.model)
        self.training_rows = data.split.training_users
        if len(self.training_rows) == 0:
            raise ConfigError("data.limited_target_fraction: no target user keeps training data; raise it")
        self.sampler = BatchSampler(data, self.training_rows, train.batch_size, config.model.encoder.max_length,
                                    np.random.default_rng(train.seed + collective.rank))  # batches differ per worker
        self.weights = SourceWeights()
        self.steps = MethodSteps(self.model, self.optimizer, self.sampler, collective, data.target,
                                 self.meta_config, self.inner_lrs, self.weights, self.target_rows,
                                 self.step_codebook)
        self.loop = LoopState()
        self.step_time = StepTime()
        self.best_state: dict[str, torch.Tensor] | None = None

    @property
    def _is_meta(self) -> bool:
        return self.config.method in ("metarec", "uniform")

    # --- checkpoints ---------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs of this trainer besides the model's parameters and the optimizer:
        the loop position, per-source weights, the best state so far, learned inner rates, the
        running target direction (``meta.direction``) and this process's random streams (JSON-able
        values and tensors)."""
        return {
            "loop": asdict(self.loop),
            "source_weights": self.weights.to_json(),
            "best_state": dict(self.best_state or {}),
            "inner_lrs": list(self.inner_lrs),
            "direction": self.steps.direction.state_dict(),
            "random": {"sampler": self.sampler.rng.bit_generator.state, **random_states(self.device)},
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state_dict()``. ``state["random"]`` None (the run had another number of
        workers): fresh, reproducible random streams from (seed, rank, step) instead."""
        self.loop = LoopState(**state["loop"])
        self.weights.load_json(state["source_weights"])
        self.best_state = dict(state["best_state"]) or None
        for rate, saved in zip(self.inner_lrs, state["inner_lrs"], strict=True):
            rate.copy_(saved)
        self.steps.direction.load_state_dict({k: v.to(self.device) for k, v in state["direction"].items()})
        random = state["random"]
        if random is not None:
            self.sampler.rng.bit_generator.state = random["sampler"]
            restore_random_states(random, self.device)
            return
        seed, rank, step = self.config.train.seed, self.collective.rank, self.loop.step
        self.sampler.rng = np.random.default_rng([seed, rank, step])
        torch.manual_seed(int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0]))

    # --- evaluation ----------------------------------------------------------------

    def evaluate(self, stage: str) -> dict[str, float]:
        """Full-catalog ranking of the target's validation or test items (a collective).

        Every user, or at validation ``eval.valid_users`` of them (the same ones each
        time). Each process ranks its slice of the users (``users[rank::world]``)
        through the configured searcher; the ranks are gathered, so every
        process returns the metrics over all of them.
        """
        users = np.arange(self.data.split.num_users)
        sample = self.config.eval.valid_users
        if stage == "valid" and sample is not None and sample < len(users):  # the same users at every validation
            users = np.sort(np.random.default_rng(self.config.train.seed).choice(len(users), sample, replace=False))
        users = users[self.collective.rank :: self.collective.world_size]
        self.model.eval()
        try:
            ranks = rank_users(
                self.model, self.data.target, self.data.split, stage, self.config.eval, self.sampler.max_length, users
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
        test: bool = True,
    ) -> TrainingOutcome:
        """Train, validate, select, test; from ``self.loop`` on (a resumed run has restored it).

        ``on_validation(entry)`` runs in every process at each validation, and
        ``after_step(step)`` after every main step once its bookkeeping is
        done (where checkpoints are taken). ``test`` False: the test split is
        not read (a tuning trial), and ``results["test"]`` is None. In a distributed run only the
        leader's outcome carries results; the others return ``results=None``.
        """
        train, loop = self.config.train, self.loop
        leader = self.collective.rank == 0
        started = time.perf_counter() - loop.seconds
        if loop.step == 0:
            for step in tqdm(range(train.pretrain_steps), desc="pre-training on sources", disable=not self.progress):
                self.steps.joint(step)
                self._maybe_reinit_codes(step)

        main_step = self.steps.for_method(self.config.method)
        steps = range(loop.step + 1, train.steps + 1) if not loop.stopped else range(0)
        bar = tqdm(steps, desc=self.config.method, disable=not self.progress or loop.stopped)
        for step in bar:
            loop.pending_losses.append(self._timed(main_step, step))
            loop.step = step
            if step % train.eval_every == 0 or step == train.steps:
                with self.whole_model():
                    entry = self._validate(step, started, leader)
                bar.set_postfix(loss=f"{entry['train_loss']:.3f}",
                                valid=f"{entry['valid'][train.selection_metric]:.4f}")
                if on_validation is not None:
                    on_validation(entry)
            self._maybe_reinit_codes(step)
            loop.seconds = time.perf_counter() - started
            if after_step is not None:
                after_step(step)
            if loop.stopped:
                break

        per_worker = self.collective.all_gather_object(self._what_this_process_holds())
        with self.whole_model():
            self.model.load_state_dict(self.best_state, strict=False)
            tested = self.evaluate("test") if test else None  # every process ranks its slice of the users
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
            "test": tested,
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
            log.info("step %d loss %.4f valid %s %.4f", step, entry["train_loss"], train.selection_metric, metric)
            improved = loop.record_validation(entry, metric, train.patience, first=self.best_state is None)
            if loop.stopped:
                log.info("early stop at step %d (best %s %.4f at step %d)",
                         step, train.selection_metric, loop.best_metric, loop.best_step)
        entry, loop.stopped, improved = self.collective.broadcast_object((entry, loop.stopped, improved))
        if improved:
            self.best_state = self._target_model_state()
        loop.pending_losses.clear()
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
            "target_table_block": self.target_rows.block(),  # rows owned where the table is split
            # Codebooks whose Adam state and update live here (None: one process holds them all).
            "codebooks_owned": getattr(self.optimizer, "owned_codebooks", None),
            # Codebook values in the model between steps (0 where the codebook is searched where it lives).
            "codewords_held": self.model.quantizer.codebooks.numel() if self.model.quantizer is not None else 0,
            "peak_rss_mb": peak_resident_mb(),
            "main_step_ms": self.step_time.per_step_ms(),
        }

    def _target_model_state(self) -> dict[str, torch.Tensor]:
        """What recommending in the target needs: theta and the target's own parameters (copies)."""
        state = self.model.state_dict()
        return {name: state[name].detach().clone() for name in reduced_names(self.model, self.data.target)}

    # --- the codebook at step boundaries ----------------------------------------------

    @contextlib.contextmanager
    def whole_model(self, keep_changes: bool = False) -> Iterator[None]:
        """Every parameter whole for a block of code (a target table split by rows, a codebook searched
        where it lives, assembled); ``keep_changes``: the values at the end are kept. A collective."""
        with self.target_rows.whole(keep_changes), self.step_codebook.whole(keep_changes):
            yield

    def _maybe_reinit_codes(self, step: int) -> None:
        every = self.config.train.codebook_reinit_every
        if self.model.quantizer is not None and every and step % every == 0:
            with self.step_codebook.whole(keep_changes=True):
                reinit_dead_codes_everywhere(self.model.quantizer, self.collective)

    def _codebook_health(self) -> dict[str, Any]:
        if self.model.quantizer is None:
            return {}
        return {"codebook": codebook_health(self.model.quantizer, self.collective)}


OptimizerFactory = Callable[[SequenceRecommender, list[torch.Tensor], ExperimentConfig], torch.optim.Optimizer]


def local_adam(
    model: SequenceRecommender, inner_lrs: list[torch.Tensor], config: ExperimentConfig
) -> torch.optim.Optimizer:
    """Adam over every parameter in this process (learned inner rates at their own rate); item tables
    with row-sparse gradients get row-wise updates."""
    groups = [{"params": list(model.parameters())}]
    if inner_lrs:
        groups.append({"params": inner_lrs, "lr": config.meta.inner_lr_learning_rate})
    return RowSparseAdam(groups, lr=config.train.learning_rate, weight_decay=config.train.weight_decay)
