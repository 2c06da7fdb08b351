"""One worker's optimizer: sums gradients over workers and updates each parameter where it lives.

The meta-step (``metarec_dist.meta.step.meta_step``) leaves in ``.grad`` this
worker's share of the update (its tasks' weighted meta-gradients, its own
sources' support gradients). ``WorkerOptimizer.step`` turns the shares into one
update, a sum over all tasks of all workers, applied by four owners:

- **the shared encoder**: a DeepSpeed engine (ZeRO stage ``runner.zero_stage``,
  optimizer state partitioned over workers from stage 1 on). The gradient
  goes in through a surrogate loss ``sum(p * g)``, whose backward is ``g``.
  At stage 0 the encoder's gradients join the one all-reduce below and the
  engine applies the sum under ``engine.no_sync()`` (no collective of its
  own); from stage 1 on DeepSpeed must reduce them itself (its partitions),
  so each worker passes ``world_size * g`` and DeepSpeed's average over
  workers gives the sum. Clipping is off so the step is exact.
- **the VQ codebook**, sharded by codebook: worker r owns codebooks
  ``r, r + N, r + 2N, ...`` and holds the Adam state (and the master copy) of
  those alone. Below ``runner.shard_codebook_from`` codewords per codebook,
  each worker also keeps a read-only replica for its forward passes: after the
  summed gradient is known, each owner steps its codebooks and broadcasts them.
  Such a replica is small next to the item tables and next to a step's items,
  and keeping it makes quantization local. From that size on the codebook is
  searched where it lives (``codebook_shards.ShardedCodebook``): a worker holds
  only its codebooks between steps and the codewords its step chose during one.
  Either way no collective runs inside ``forward``.
- **the target's parameters and learned inner rates**: every worker needs
  them; they are all-reduced and stepped identically everywhere, except a
  large target item table (``runner.shard_target_rows_from``), which is split
  by rows over the workers (``row_shards.ShardedItemTable``: each updates its
  own block; a step gathers the rows it reads first).
- **a source's own parameters**: only on the worker that owns the source,
  updated from that worker's gradient alone.

Item tables trained with row-sparse gradients (``model.item_gradients``) are
summed as (row ids, rows) and updated row by row (``RowSparseAdam``), so
neither the collective nor the update grows with the catalog.

Every update is Adam with the run's learning rate and weight decay, so with
one worker, or with ``runner.zero_stage`` off, the result equals the
single-process step (tests/test_distributed.py checks it across 2 workers).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from metarec_dist.distributed.codebook_shards import ShardedCodebook, owned_codebooks
from metarec_dist.distributed.deepspeed_ops import load_deepspeed_ops
from metarec_dist.distributed.deepspeed_private import give_deepspeed_a_world_group, link_zero_optimizer_state
from metarec_dist.distributed.row_shards import ShardedItemTable
from metarec_dist.errors import ConfigError
from metarec_dist.meta.config import ExperimentConfig, codebook_is_sharded, target_table_is_split
from metarec_dist.meta.row_sparse_adam import RowSparseAdam, adam_state
from metarec_dist.meta.step import WHOLE_TARGET_TABLE, Collective, TargetRows
from metarec_dist.meta.step_codes import StepCodebook, step_codebook_for
from metarec_dist.model.recommender import SequenceRecommender, module_key

log = logging.getLogger(__name__)


def summed_gradients(parameters: list[torch.Tensor], collective: Collective) -> list[torch.Tensor | None]:
    """Each parameter's gradient summed over workers: dense ones in one flat all-reduce; item
    tables with row-sparse gradients as (row ids, rows), gathered and added (never densified).

    None where no worker has a gradient (the target's table during pre-training on
    sources, say): Adam then skips the parameter, as it does in one process.
    """
    sparse = [i for i, p in enumerate(parameters) if getattr(p, "row_sparse", False)]
    dense = [i for i, p in enumerate(parameters) if not getattr(p, "row_sparse", False)]
    summed: list[torch.Tensor | None] = [None] * len(parameters)
    for i, gradient in zip(dense, _summed_dense([parameters[i] for i in dense], collective)):
        summed[i] = gradient
    for i, gradient in zip(sparse, _summed_rows([parameters[i] for i in sparse], collective)):
        summed[i] = gradient
    return summed


def _summed_rows(parameters: list[torch.Tensor], collective: Collective) -> list[torch.Tensor | None]:
    """Row-sparse gradients summed over workers: each worker's (row ids, rows) gathered in one round."""
    if not parameters:
        return []
    mine = [None if p.grad is None else (p.grad if p.grad.is_sparse else p.grad.to_sparse(1)).coalesce()
            for p in parameters]
    if collective.world_size == 1:
        return mine
    # Pickled on the CPU: a GPU tensor would unpickle onto the sender's device index.
    shipped = [None if g is None else (g.indices().cpu(), g.values().cpu()) for g in mine]
    everyone = collective.all_gather_object(shipped)
    summed = []
    for index, p in enumerate(parameters):
        parts = [worker[index] for worker in everyone if worker[index] is not None]
        if not parts:
            summed.append(None)
            continue
        indices = torch.cat([rows for rows, _ in parts], dim=1).to(p.device)
        values = torch.cat([values for _, values in parts]).to(p.device)
        summed.append(torch.sparse_coo_tensor(indices, values, p.shape).coalesce())
    return summed


def _summed_dense(parameters: list[torch.Tensor], collective: Collective) -> list[torch.Tensor | None]:
    gradients = [_grad_or_zero(p) for p in parameters]
    present = [p.grad is not None for p in parameters]
    if collective.world_size > 1 and parameters:
        flat = torch.cat([g.flatten() for g in gradients] + [gradients[0].new_tensor(present)])
        collective.all_reduce_sum_([flat])
        offset = 0
        for g in gradients:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
        present = [bool(flag > 0) for flag in flat[offset:]]
    return [g if has else None for g, has in zip(gradients, present)]


class WorkerOptimizer:
    """``step()`` / ``zero_grad()`` like a torch optimizer; see the module docstring."""

    def __init__(
        self,
        model: SequenceRecommender,
        inner_lrs: list[torch.Tensor],
        config: ExperimentConfig,
        target: str,
        collective: Collective,
    ):
        self.model = model
        self.collective = collective
        train = config.train
        adam = {"lr": train.learning_rate, "weight_decay": train.weight_decay}
        named = model.parameter_index()
        encoder_names = [n for n in named if n.startswith("encoder.")]
        target_names = model.local_names(target)
        items = model.domains[module_key(target)]
        table = f"domains.{module_key(target)}.embedding.weight"
        self.split_table: ShardedItemTable | None = None  # the target's table, where it is split by rows
        if target_table_is_split(config.runner, items.num_items, items.row_sparse, collective.world_size):
            self.split_table = ShardedItemTable(items, table, collective, train.learning_rate, train.weight_decay)
        self.target_rows: TargetRows = WHOLE_TARGET_TABLE if self.split_table is None else self.split_table
        target_parameters = [named[n] for n in target_names if not (n == table and self.split_table is not None)]
        self.replicated = target_parameters + list(inner_lrs)
        replicated_groups: list[dict[str, Any]] = [{"params": target_parameters}]
        if inner_lrs:
            replicated_groups.append({"params": list(inner_lrs), "lr": config.meta.inner_lr_learning_rate})
        self.replicated_adam = RowSparseAdam(replicated_groups, **adam)

        taken = set(encoder_names) | set(target_names) | {"quantizer.codebooks"}
        own = [p for n, p in named.items() if n not in taken]  # this worker's sources
        self.local_adam = RowSparseAdam(own, **adam) if own else None

        # The codebook: Adam over this worker's codebooks only.
        self.codebooks = named.get("quantizer.codebooks")
        self.owned_codebooks: list[int] = []
        self.codebook_shard: torch.nn.Parameter | None = None
        self.codebook_adam = None
        self.sharded_codebook: ShardedCodebook | None = None  # searched where it lives
        # Where a step's codes come from (the trainer loads them before each step's forwards).
        self.step_codebook: StepCodebook = step_codebook_for(model)
        if self.codebooks is not None and codebook_is_sharded(config, collective.world_size):
            self.sharded_codebook = ShardedCodebook(model.quantizer, collective, train.learning_rate,
                                                    train.weight_decay)
            self.step_codebook = self.sharded_codebook
            self.owned_codebooks = self.sharded_codebook.owned
            self.codebook_shard, self.codebook_adam = self.sharded_codebook.own, self.sharded_codebook.adam
        elif self.codebooks is not None:
            self.owned_codebooks = owned_codebooks(self.codebooks.shape[0], collective)
            if self.owned_codebooks:
                self.codebook_shard = torch.nn.Parameter(self.codebooks.detach()[self.owned_codebooks].clone())
                self.codebook_adam = torch.optim.Adam([self.codebook_shard], **adam)

        self.encoder_parameters = [named[n] for n in encoder_names]
        self.engine_seconds = 0.0  # wall time in the DeepSpeed engine's backward and step (its collectives)
        self.engine = None
        self.encoder_adam = None
        # ZeRO stage 0 partitions nothing: the encoder's gradients join this class's all-reduce.
        self.encoder_summed_here = config.runner.zero_stage == 0
        if config.runner.zero_stage is None:
            self.encoder_adam = torch.optim.Adam(self.encoder_parameters, **adam)
            self.replicated = self.encoder_parameters + self.replicated
        else:
            self.engine = _deepspeed_engine(model.encoder, config)

    # --- the torch optimizer interface ------------------------------------------------

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.model.parameter_index().values():
            p.grad = None
        for p in self.replicated:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        # Every gradient this class sums goes in one all-reduce (the replicated tensors', the
        # codebook's, the encoder's at ZeRO stage 0): each collective costs a round trip in which
        # both workers wait.
        replica = self.codebooks is not None and self.sharded_codebook is None
        codebook = [self.codebooks] if replica else []
        encoder = self.encoder_parameters if self.encoder_summed_here else []
        summed = summed_gradients(self.replicated + encoder + codebook, self.collective)
        replicated, rest = summed[: len(self.replicated)], summed[len(self.replicated) :]
        self._step_replicated(replicated)
        if replica:
            self._step_codebook(rest[-1])
        elif self.sharded_codebook is not None:
            self.sharded_codebook.step()
        if self.local_adam is not None:
            self.local_adam.step()
        for p, g in zip(encoder, rest):  # stage 0: the engine applies these sums as they are
            p.grad = g
        if self.engine is not None:
            self._step_encoder()
        if self.split_table is not None:
            self.split_table.step()

    # --- the owners -------------------------------------------------------------------

    def _step_replicated(self, gradients: list[torch.Tensor | None]) -> None:
        for p, g in zip(self.replicated, gradients):
            p.grad = g
        self.replicated_adam.step()
        if self.encoder_adam is not None:
            self.encoder_adam.step()

    def _step_codebook(self, gradient: torch.Tensor | None) -> None:
        """``gradient``: the codebook's, summed over workers (None: no worker used it this step)."""
        if gradient is None:
            return
        updated = torch.zeros_like(self.codebooks)
        if self.codebook_shard is not None:
            # Start from the replica: dead-code re-initialisation may have replaced codewords.
            self.codebook_shard.copy_(self.codebooks[self.owned_codebooks])
            self.codebook_shard.grad = gradient[self.owned_codebooks]
            self.codebook_adam.step()
            updated[self.owned_codebooks] = self.codebook_shard
        # Every codebook from its owner to every worker, in one collective (one owner each, zeros elsewhere).
        self.collective.all_reduce_sum_([updated])
        self.codebooks.copy_(updated)

    def _step_encoder(self) -> None:
        """Apply the encoder's ``.grad``: already summed over workers at stage 0, else DeepSpeed sums them."""
        started = time.perf_counter()
        gradients = [_grad_or_zero(p).clone() for p in self.encoder_parameters]
        if self.encoder_summed_here:
            scale, reduction = 1, self.engine.no_sync()  # already summed: the engine must not average them
        else:
            scale, reduction = self.collective.world_size, contextlib.nullcontext()
        for p in self.encoder_parameters:
            p.grad = None
        with torch.enable_grad(), reduction:
            surrogate = sum((p * g).sum() for p, g in zip(self.encoder_parameters, gradients))
            self.engine.backward(surrogate * scale)
        self.engine.step()
        self.engine_seconds += time.perf_counter() - started

    # --- checkpoints: state that does not depend on the number of workers --------------

    def consolidated_state(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Adam's moments at full size, keyed ``<parameter>/<exp_avg|exp_avg_sq|step>``.

        Returns (shared, own): ``shared`` covers the encoder, the codebook, the
        target and the inner rates (equal in every worker); ``own`` this worker's
        sources. A collective: every worker calls it (partitions are gathered).
        """
        names = self._names()
        shared: dict[str, torch.Tensor] = {}
        for optimizer in (self.replicated_adam, self.encoder_adam, self._engine_torch_adam()):
            shared.update(_adam_entries(optimizer, names))
        if self.engine is not None and self._engine_torch_adam() is None:
            shared.update(self._zero_entries(names))
        shared.update(self._codebook_entries())
        if self.split_table is not None:
            shared.update(self.split_table.moments())
        own = _adam_entries(self.local_adam, names)
        return shared, own

    @torch.no_grad()
    def load_consolidated_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what ``consolidated_state`` returned (shared and own merged), after the parameters.

        Optimizer state of parameters absent from ``state`` starts fresh (a
        source never sampled before the checkpoint, say).
        """
        names = self._names()
        for optimizer in (self.replicated_adam, self.encoder_adam, self.local_adam, self._engine_torch_adam()):
            if optimizer is not None:
                _load_adam_entries(optimizer, names, state)
        if self.codebook_adam is not None and "quantizer.codebooks/step" in state:
            if self.sharded_codebook is None:  # a sharded one took its values in whole(keep_changes=True)
                self.codebook_shard.copy_(self.codebooks[self.owned_codebooks])
            self.codebook_adam.state[self.codebook_shard] = adam_state(
                state["quantizer.codebooks/step"],
                state["quantizer.codebooks/exp_avg"][self.owned_codebooks],
                state["quantizer.codebooks/exp_avg_sq"][self.owned_codebooks],
                like=self.codebook_shard,
            )
        if self.engine is not None and self._engine_torch_adam() is None:
            self._load_zero(state)
        if self.split_table is not None:
            self.split_table.load_moments(state)

    def _names(self) -> dict[int, str]:
        """id(parameter) -> the name it is checkpointed under."""
        names = {id(p): name for name, p in self.model.named_parameters()}
        inner = [p for p in self.replicated if id(p) not in names]
        names.update({id(p): f"inner_lr.{i}" for i, p in enumerate(inner)})
        return names

    def _engine_torch_adam(self):
        """ZeRO stage 0 keeps a plain torch Adam over the encoder's parameters."""
        if self.engine is not None and isinstance(self.engine.optimizer, torch.optim.Adam):
            return self.engine.optimizer
        return None

    def _codebook_entries(self) -> dict[str, torch.Tensor]:
        """The codebook's moments from their owners, assembled at full size in every worker."""
        if self.codebooks is None:
            return {}
        state = self.codebook_adam.state.get(self.codebook_shard, {}) if self.codebook_adam else {}
        steps = self.collective.all_gather_object(float(state["step"]) if state else None)
        if all(step is None for step in steps):
            return {}
        entries = {"quantizer.codebooks/step": torch.tensor(max(s for s in steps if s is not None))}
        shape = self.sharded_codebook.shape if self.sharded_codebook is not None else self.codebooks.shape
        for key in ("exp_avg", "exp_avg_sq"):
            full = self.codebooks.new_zeros(shape)
            if state:
                full[self.owned_codebooks] = state[key]
            self.collective.all_reduce_sum_([full])  # each codebook has exactly one owner
            entries[f"quantizer.codebooks/{key}"] = full
        return entries

    def _zero_entries(self, names: dict[int, str]) -> dict[str, torch.Tensor]:
        """ZeRO 1/2 partitions the encoder's moments: assemble each parameter's (a collective)."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        inner = self.engine.optimizer.optimizer
        flat_states = [inner.state[flat] for flat in self.engine.optimizer.single_partition_of_fp32_groups]
        if not flat_states or not flat_states[0]:
            return {}  # no step taken yet
        step = flat_states[0]["step"]
        entries = {}
        for p in self.encoder_parameters:
            # The fp32 master copy: with bf16 parameters it holds precision the parameters lack.
            entries[f"{names[id(p)]}/master"] = safe_get_full_fp32_param(p).clone()
            for key in ("exp_avg", "exp_avg_sq"):
                entries[f"{names[id(p)]}/{key}"] = safe_get_full_optimizer_state(p, key).clone()
            entries[f"{names[id(p)]}/step"] = step.clone()
        return entries

    def _load_zero(self, state: dict[str, torch.Tensor]) -> None:
        """Refresh ZeRO's fp32 master copy from the loaded parameters, then its moments."""
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        zero = self.engine.optimizer
        names = self._names()
        for p in self.encoder_parameters:
            master = state.get(f"{names[id(p)]}/master")
            safe_set_full_fp32_param(p, master if master is not None else p.detach().float())
        first = names[id(self.encoder_parameters[0])]
        if f"{first}/step" not in state:
            return
        # Moments exist only after a first step: create them (zeros), link them to the
        # parameters' fragments, then fill each parameter's fragment from the full tensor.
        for flat in zero.single_partition_of_fp32_groups:
            zero.optimizer.state[flat] = {
                "step": state[f"{first}/step"].clone(),
                "exp_avg": torch.zeros_like(flat),
                "exp_avg_sq": torch.zeros_like(flat),
            }
        link_zero_optimizer_state(zero)
        for p in self.encoder_parameters:
            for key in ("exp_avg", "exp_avg_sq"):
                safe_set_full_optimizer_state(p, state[f"{names[id(p)]}/{key}"], key)

    # --- memory accounting (what this worker holds) -----------------------------------

    def optimizer_state_numel(self) -> dict[str, int]:
        """Numbers of optimizer-state values held here, per owner (the codebook's is about 1/N)."""

        def count(optimizer) -> int:
            if optimizer is None:
                return 0
            return sum(v.numel() for state in optimizer.state.values() for v in state.values()
                       if torch.is_tensor(v) and v.dim())

        return {
            "codebook": count(self.codebook_adam),
            "sources": count(self.local_adam),
            "replicated": count(self.replicated_adam) + count(self.encoder_adam),
            "target_table_block": self.split_table.numel() if self.split_table is not None else 0,
        }


ADAM_KEYS = ("step", "exp_avg", "exp_avg_sq")


def _adam_entries(optimizer, names: dict[int, str]) -> dict[str, torch.Tensor]:
    """``<name>/<key>`` for every parameter a torch Adam has state for."""
    if optimizer is None:
        return {}
    return {
        f"{names[id(p)]}/{key}": state[key].detach().clone()
        for p, state in optimizer.state.items()
        if id(p) in names
        for key in ADAM_KEYS
    }


def _load_adam_entries(optimizer, names: dict[int, str], state: dict[str, torch.Tensor]) -> None:
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = names.get(id(p))
            if name is not None and f"{name}/step" in state:
                optimizer.state[p] = adam_state(*(state[f"{name}/{key}"] for key in ADAM_KEYS), like=p)


def _grad_or_zero(p: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(p) if p.grad is None else p.grad


def _deepspeed_engine(encoder: torch.nn.Module, config: ExperimentConfig):
    """The encoder in a DeepSpeed engine on the process group Ray Train set up."""
    load_deepspeed_ops()  # chooses the accelerator; never waits on a lock a killed build left
    import deepspeed

    deepspeed.utils.logger.setLevel(logging.WARNING)
    # Without this, a frozen worker would hang the other inside the ZeRO step for 30 minutes.
    give_deepspeed_a_world_group(config.runner.collective_timeout_s)
    ds_config = deepspeed_config(config)
    try:
        engine, _, _, _ = deepspeed.initialize(
            model=encoder, model_parameters=list(encoder.parameters()), config=ds_config, dist_init_required=False
        )
    except (AssertionError, ValueError, TypeError, KeyError) as error:  # not RuntimeError: gloo failures
        where = config.runner.deepspeed_config or "the built-in DeepSpeed config"
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"runner.deepspeed_config: DeepSpeed rejected {where} for this model ({first})") from None
    return engine


# Keys that would change what one meta-step's update is (or its checkpointed state).
UNSUPPORTED_DEEPSPEED_KEYS = (
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
    "scheduler", "fp16", "amp", "optimizer",
)


def deepspeed_config(config: ExperimentConfig) -> dict[str, Any]:
    """The engine's config: from ``runner.deepspeed_config`` if given, with the settings exactness needs."""
    runner, train = config.runner, config.train
    values: dict[str, Any] = {}
    path = runner.deepspeed_config
    if path is not None:
        if runner.zero_stage is None:
            raise ConfigError("runner.deepspeed_config: set runner.zero_stage (0-2) to use a DeepSpeed engine")
        try:
            values = json.loads(Path(path).read_text())
        except OSError as error:
            raise ConfigError(f"runner.deepspeed_config: cannot read {path} ({error.strerror})") from None
        except ValueError as error:
            raise ConfigError(f"runner.deepspeed_config: {path} is not valid JSON ({error})") from None
        if not isinstance(values, dict):
            raise ConfigError(f"runner.deepspeed_config: {path} must hold a JSON object")
        stage = values.get("zero_optimization", {}).get("stage", runner.zero_stage)
        if stage != runner.zero_stage:
            raise ConfigError(
                f"runner.deepspeed_config: {path} asks for ZeRO stage {stage}, runner.zero_stage is "
                f"{runner.zero_stage}; make them equal"
            )
        bending = sorted(key for key in UNSUPPORTED_DEEPSPEED_KEYS if key in values)
        if bending:
            raise ConfigError(
                f"runner.deepspeed_config: {path} sets {', '.join(bending)}; the runner owns the batch, the "
                "optimizer's schedule and precision of the update (use model.precision for bf16 autocast); remove them"
            )
        if values.get("bf16", {}).get("enabled") and runner.zero_stage == 0:
            raise ConfigError(f"runner.deepspeed_config: {path} enables bf16 at ZeRO stage 0; use stage 1 or 2 "
                              "(configs/deepspeed/zero2_bf16.json)")
    values.setdefault("zero_optimization", {})["stage"] = runner.zero_stage
    values["train_micro_batch_size_per_gpu"] = 1  # batches are the trainer's; DeepSpeed only applies updates
    values["gradient_accumulation_steps"] = 1  # every meta-step is one update, for every parameter
    values.setdefault("steps_per_print", 10**9)
    values["gradient_clipping"] = 0.0  # DeepSpeed clips at 1.0 by default: the meta-update must be exact
    values["optimizer"] = {
        "type": "Adam",
        "params": {"lr": train.learning_rate, "weight_decay": train.weight_decay, "torch_adam": True,
                   "adam_w_mode": False},
    }
    return values
