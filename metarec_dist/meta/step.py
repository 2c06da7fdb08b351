"""One meta-step of MetaRec, as functions over parameter dicts.

For shared parameters theta (encoder, codebook) and a batch of source tasks:

1. ``adapt_to_task``: copy theta, take K SGD steps on a support batch of the
   source, giving phi_i;
2. score phi_i on a query batch of the *limited target data*; the gradient of
   that query loss is the task's meta-gradient g_i (first order: taken at
   phi_i; second order: at theta, through the inner loop);
3. ``task_similarity``: s_i = cos(phi_i - theta, -g_i) ("descent" sign: a
   source whose adaptation also lowers the target loss scores high), over all
   shared parameters flattened, or averaged per tensor; with ``direction:
   running_mean`` g_i is replaced by a moving average of every task's g;
4. ``task_weights``: w = softmax(s / temperature) (or uniform, the ablation);
5. ``combine``: the update direction sum_i w_i g_i, applied by the optimizer.

Steps 3-5 are pure functions of tensors, so the distributed runner can
compute s_i where the task ran, gather all s, take the softmax globally and
reduce the weighted sums, and get the same update: ``meta_step`` takes a
``Collective`` (one process: ``LocalCollective``; Ray workers: the
torch.distributed one in ``metarec_dist.distributed``) and is the same code either way.

Domain-local parameters: a source's item table and adapter learn from its own
support loss (at theta); the target's learn from the weighted query losses.
"""

from __future__ import annotations

import dataclasses
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
from pydantic import Field
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from metarec_dist.config import StrictModel
from metarec_dist.data.batches import NextItemBatch
from metarec_dist.meta.row_sparse_adam import empty_row_gradient
from metarec_dist.model.recommender import SequenceRecommender

Params = dict[str, torch.Tensor]


class MetaConfig(StrictModel):
    tasks_per_step: int = Field(3, ge=1, description="source tasks sampled per meta-step")
    inner_steps: int = Field(1, ge=1, description="SGD steps of the inner loop (K)")
    inner_lr: float = Field(0.01, gt=0, description="inner learning rate (initial value if learned)")
    learned_inner_lr: bool = Field(False, description="learn one inner rate per shared tensor and step")
    inner_lr_learning_rate: float = Field(1e-4, gt=0, description="outer learning rate of learned inner rates")
    order: Literal["first", "second"] = Field("first", description="second: differentiate through the loop")
    similarity: Literal["cosine", "per_tensor_cosine"] = "cosine"
    sign: Literal["descent", "gradient"] = Field(
        "descent", description="descent: cos(phi - theta, -g); gradient: cos(phi - theta, g)"
    )
    temperature: float = Field(1.0, gt=0, description="softmax temperature over similarities")
    center: bool = Field(
        False, description="compare each task's adaptation less the mean adaptation of the step's tasks"
    )
    direction: Literal["task_query", "running_mean"] = Field(
        "task_query", description="what each adaptation is compared with: task_query, the task's own "
        "meta-gradient g_i; running_mean, a moving average over steps of the mean g_i of every task"
    )
    direction_decay: float = Field(
        0.9, ge=0, lt=1, description="running_mean: the weight of the previous average at each step"
    )
    weighting: Literal["similarity", "uniform"] = "similarity"
    source_gradient_weight: float = Field(
        0.0, ge=0, description="also apply each source's mean support gradient, weighted like its meta-gradient"
    )


@dataclass
class TaskBatch:
    source: str
    support: NextItemBatch
    query: NextItemBatch
    query_negatives: torch.Tensor | None = None  # the sampled softmax's draws (None: drawn in the loss)


@dataclass
class TaskResult:
    """What one task contributes; everything needed for the global weighting."""

    source: str
    adaptation: Params  # phi_i - theta (detached)
    meta_gradient: Params  # g_i over shared names
    target_local_gradient: Params  # gradient of the query loss w.r.t. the target's own parameters
    source_local_gradient: Params  # gradient of the support loss (at theta) w.r.t. the source's own
    inner_lr_gradient: list[torch.Tensor]  # one per learned rate (empty if fixed)
    support_loss: float
    query_loss: float


def _loss(model: SequenceRecommender, params: Params, domain: str, batch: NextItemBatch,
          negatives: torch.Tensor | None = None) -> torch.Tensor:
    arguments = (domain, *model.tensors(batch), negatives)
    return functional_call(model.restricted_to((domain,)), params, arguments, strict=False).loss


def run_task(
    model: SequenceRecommender,
    target: str,
    task: TaskBatch,
    config: MetaConfig,
    inner_lrs: list[torch.Tensor] | None = None,
) -> TaskResult:
    """Inner loop on the source's support batch, then the target query (one task)."""
    shared = model.shared_names()
    parameters = model.parameter_index()
    theta = {name: parameters[name] for name in shared}
    source_local = {name: parameters[name] for name in model.local_names(task.source)}
    target_local = {name: parameters[name] for name in model.local_names(target)}
    second_order = config.order == "second"
    rates = inner_lrs or []

    # Only the math attention kernel has the double backward that second order needs.
    with sdpa_kernel([SDPBackend.MATH]) if second_order else nullcontext():
        fast = dict(theta)
        source_local_gradient: Params = {}
        support_loss = 0.0
        for step in range(config.inner_steps):
            loss = _loss(model, {**fast, **source_local}, task.source, task.support)
            wrt = [fast[name] for name in shared] + (list(source_local.values()) if step == 0 else [])
            gradients = torch.autograd.grad(loss, wrt, create_graph=second_order, allow_unused=True)
            if step == 0:
                support_loss = loss.item()
                source_local_gradient = {
                    name: _zero_if_none(g, p).detach()
                    for (name, p), g in zip(source_local.items(), gradients[len(shared) :])
                }
            fast = _sgd_step(fast, shared, gradients[: len(shared)], rates, config, step, second_order)

        query = _loss(model, {**fast, **target_local}, target, task.query, task.query_negatives)
        # First order: g_i at phi_i (the fast tensors); second order: at theta, through the loop.
        meta_wrt = [fast[name] for name in shared] if not second_order else [theta[name] for name in shared]
        wrt = meta_wrt + list(target_local.values()) + list(rates)
        gradients = torch.autograd.grad(query, wrt, allow_unused=True)

    n_shared, n_target = len(shared), len(target_local)
    return TaskResult(
        source=task.source,
        adaptation={name: (fast[name] - theta[name]).detach() for name in shared},
        meta_gradient={name: _zero_if_none(g, theta[name]) for name, g in zip(shared, gradients[:n_shared])},
        target_local_gradient={
            name: _zero_if_none(g, p)
            for (name, p), g in zip(target_local.items(), gradients[n_shared : n_shared + n_target])
        },
        source_local_gradient=source_local_gradient,
        inner_lr_gradient=[_zero_if_none(g, r) for g, r in zip(gradients[n_shared + n_target :], rates)],
        support_loss=support_loss,
        query_loss=query.item(),
    )


def _zero_if_none(gradient: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """A missing gradient as zeros: no rows for a table whose gradients are row-sparse."""
    if gradient is not None:
        return gradient
    return empty_row_gradient(like) if getattr(like, "row_sparse", False) else torch.zeros_like(like)


def _sgd_step(fast, shared, gradients, rates, config, step, second_order) -> Params:
    """phi <- phi - lr * grad; first order detaches grad (rates still get gradients)."""
    updated = {}
    for index, (name, gradient) in enumerate(zip(shared, gradients)):
        gradient = _zero_if_none(gradient, fast[name])
        if not second_order:
            gradient = gradient.detach()
        rate = rates[step * len(shared) + index] if rates else config.inner_lr
        updated[name] = fast[name] - rate * gradient
    return updated


def initial_inner_lrs(model: SequenceRecommender, config: MetaConfig) -> list[torch.Tensor]:
    """Learned inner rates: one scalar per (inner step, shared tensor), as in Meta-SGD per layer."""
    if not config.learned_inner_lr:
        return []
    count = config.inner_steps * len(model.shared_names())
    like = next(model.parameters())
    return [torch.nn.Parameter(torch.tensor(config.inner_lr, dtype=like.dtype, device=like.device))
            for _ in range(count)]


# --- the pure part: similarity, weights, combination -------------------------------


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0, eps=1e-12)


def task_similarity(adaptation: Params, meta_gradient: Params, config: MetaConfig) -> float:
    """s_i = cos(phi_i - theta, -g_i) ("descent") or cos(phi_i - theta, g_i) ("gradient")."""
    sign = -1.0 if config.sign == "descent" else 1.0
    names = sorted(adaptation)
    if config.similarity == "cosine":
        a = torch.cat([adaptation[name].flatten() for name in names])
        g = torch.cat([meta_gradient[name].flatten() for name in names])
        return float(_cosine(a, sign * g))
    return float(torch.stack([_cosine(adaptation[name], sign * meta_gradient[name]) for name in names]).mean())


def task_mean(values: list[Params], collective: Collective) -> Params:
    """The mean over every process's tasks of the step (one all-reduce)."""
    names = sorted(values[0])
    sums = [torch.stack([v[name] for v in values]).sum(0) for name in names]
    count = sums[0].new_tensor([float(len(values))])  # on the tensors' device, for NCCL
    collective.all_reduce_sum_([*sums, count])
    return {name: total / count for name, total in zip(names, sums)}


def centered(adaptations: list[Params], collective: Collective) -> list[Params]:
    """Each adaptation less the mean over every process's tasks of the step."""
    mean = task_mean(adaptations, collective)
    return [{name: a[name] - mean[name] for name in mean} for a in adaptations]


class RunningDirection:
    """What every adaptation is compared with under ``meta.direction: running_mean``: an
    exponential moving average over steps of the mean meta-gradient of all the step's tasks.

    One query batch's gradient is noisy, and g_i, taken at phi_i, also carries the task's
    own step (g_i ~ g + H (phi_i - theta)), so each task is compared with a direction it
    moved itself. Every process holds the same average: it is updated from the
    all-reduced mean.
    """

    def __init__(self, decay: float):
        self.decay = decay
        self.value: Params | None = None

    def update(self, mean: Params) -> Params:
        if self.value is None:
            self.value = {name: tensor.clone() for name, tensor in mean.items()}
        else:
            for name, tensor in mean.items():
                self.value[name].mul_(self.decay).add_(tensor, alpha=1 - self.decay)
        return self.value

    def state_dict(self) -> Params:
        return dict(self.value or {})  # a checkpoint copies what it saves, as for the best state

    def load_state_dict(self, state: Params) -> None:
        self.value = {name: t.clone() for name, t in state.items()} or None


def task_weights(similarities: torch.Tensor, config: MetaConfig) -> torch.Tensor:
    """w = softmax(s / temperature), or 1/T each for the uniform ablation."""
    similarities = torch.as_tensor(similarities, dtype=torch.float64)
    if config.weighting == "uniform":
        return torch.full_like(similarities, 1.0 / len(similarities))
    return torch.softmax(similarities / config.temperature, dim=0)


def task_update(result: TaskResult, config: MetaConfig) -> TaskResult:
    """The task's contribution to theta: g_i, plus lambda times its mean support gradient.

    With ``source_gradient_weight`` (lambda) > 0 the sources also train theta
    directly, each in proportion to its similarity weight, so the target still
    decides how much of each source is taken. The mean support gradient along
    the inner path is -(phi_i - theta) / (K * inner_lr).
    """
    if config.source_gradient_weight == 0:
        return result
    scale = config.source_gradient_weight / (config.inner_steps * config.inner_lr)
    update = {name: g - scale * result.adaptation[name] for name, g in result.meta_gradient.items()}
    return dataclasses.replace(result, meta_gradient=update)


def combine(gradients: list[Params], weights: torch.Tensor) -> Params:
    """sum_i w_i g_i, per tensor (a sum over tasks, never an average over workers)."""
    combined = {}
    for name in gradients[0]:
        terms = [float(w) * g[name] for w, g in zip(weights, gradients)]
        total = terms[0]
        for term in terms[1:]:
            total = total + term  # not sum(): 0 + a sparse tensor is not defined
        combined[name] = total
    return combined


# --- the processes a meta-step spans ------------------------------------------------


class Collective(Protocol):
    """What a meta-step needs from the processes it spans (explicit calls, never in ``forward``)."""

    rank: int
    world_size: int
    seconds: float  # wall time spent in these calls so far (waiting for other processes included)

    def all_gather_object(self, value: Any) -> list[Any]:
        """Every process's ``value``, in rank order."""

    def all_reduce_sum_(self, tensors: list[torch.Tensor]) -> None:
        """Replace each tensor, in place, by its sum over processes."""

    def broadcast_object(self, value: Any, source: int = 0) -> Any:
        """``value`` from rank ``source``, on every process."""

    def broadcast_(self, tensor: torch.Tensor, source: int = 0) -> None:
        """Overwrite ``tensor``, in place, with rank ``source``'s."""


class LocalCollective:
    """One process: gathering and reducing are the identity."""

    rank = 0
    world_size = 1
    seconds = 0.0

    def all_gather_object(self, value: Any) -> list[Any]:
        return [value]

    def all_reduce_sum_(self, tensors: list[torch.Tensor]) -> None:
        return None

    def broadcast_object(self, value: Any, source: int = 0) -> Any:
        return value

    def broadcast_(self, tensor: torch.Tensor, source: int = 0) -> None:
        return None


LOCAL = LocalCollective()


class TargetRows(Protocol):
    """Where the target's item table lives (``metarec_dist.distributed.row_shards`` splits it over workers)."""

    def load(self, ids: torch.Tensor) -> None:
        """Hold the rows of ``ids`` (sorted, unique) for the next step (a collective)."""

    def whole(self, keep_changes: bool = False) -> AbstractContextManager[None]:
        """The whole table for a block of code (validation, checkpoints); a collective."""

    def block(self) -> tuple[int, int] | None:
        """The rows [start, stop) this process owns; None: it holds the whole table."""


class WholeTargetTable:
    """The whole table in this process: nothing to load or assemble."""

    def load(self, ids: torch.Tensor) -> None:
        return None

    def block(self) -> tuple[int, int] | None:
        return None

    def whole(self, keep_changes: bool = False) -> AbstractContextManager[None]:
        return nullcontext()


WHOLE_TARGET_TABLE = WholeTargetTable()


def reduced_names(model: SequenceRecommender, target: str) -> list[str]:
    """Parameters every process holds and updates identically: theta and the target's own."""
    return model.shared_names() + model.local_names(target)


# --- one meta-step ----------------------------------------------------------------------


@dataclass
class MetaStepLog:
    sources: list[str]
    similarities: list[float]
    weights: list[float]
    query_loss: float  # mean over tasks
    support_loss: float  # mean over tasks


def meta_step(
    model: SequenceRecommender,
    optimizer: torch.optim.Optimizer,
    target: str,
    tasks: list[TaskBatch],
    config: MetaConfig,
    inner_lrs: list[torch.Tensor] | None = None,
    collective: Collective = LOCAL,
    direction: RunningDirection | None = None,
) -> MetaStepLog:
    """Run this process's tasks, weight all tasks globally, apply one summed update.

    Across processes: every process runs its own tasks and their similarities;
    the similarities of all tasks are gathered and the softmax taken over all
    of them; each process sets the gradients of its tasks weighted by their
    global weights, and ``optimizer.step()`` sums them over processes (a sum
    over tasks, not an average over processes: ``metarec_dist.distributed.optimizer``),
    so every process applies the same step to theta and the target's
    parameters, equal to one process running every task. A source's own
    parameters live, and are updated, only where it runs.
    """
    if not tasks:
        raise ValueError("a meta-step needs at least one task in every process")
    results = [run_task(model, target, task, config, inner_lrs) for task in tasks]
    compared = [r.adaptation for r in results]
    if config.center:
        compared = centered(compared, collective)
    directions = [r.meta_gradient for r in results]
    if config.direction == "running_mean":
        if direction is None:
            raise ValueError("meta.direction running_mean: pass the run's RunningDirection")
        average = direction.update(task_mean(directions, collective))
        directions = [average] * len(results)
    local = [
        (r.source, task_similarity(a, d, config), r.query_loss, r.support_loss)
        for r, a, d in zip(results, compared, directions)
    ]
    gathered = collective.all_gather_object(local)  # [rank][task] -> (source, s_i, query, support)
    everyone = [row for rows in gathered for row in rows]
    sources = [row[0] for row in everyone]
    if len(set(sources)) != len(sources):
        raise ValueError(f"a meta-step's tasks must come from distinct sources, got {sources}")
    weights = task_weights(torch.tensor([row[1] for row in everyone]), config)
    first = sum(len(rows) for rows in gathered[: collective.rank])  # this process's tasks in the global order
    apply_gradients(model, [task_update(r, config) for r in results], weights[first : first + len(results)],
                    inner_lrs or [])
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return MetaStepLog(
        sources=sources,
        similarities=[row[1] for row in everyone],
        weights=[float(w) for w in weights],
        query_loss=sum(row[2] for row in everyone) / len(everyone),
        support_loss=sum(row[3] for row in everyone) / len(everyone),
    )


def apply_gradients(
    model: SequenceRecommender, results: list[TaskResult], weights: torch.Tensor, inner_lrs: list[torch.Tensor]
) -> None:
    """Set .grad: shared and target-local get sum_i w_i g_i; each source its own support gradient."""
    parameters = model.parameter_index()
    weighted = {
        **combine([r.meta_gradient for r in results], weights),
        **combine([r.target_local_gradient for r in results], weights),
    }
    for result in results:
        weighted.update(result.source_local_gradient)
    for name, gradient in weighted.items():
        parameters[name].grad = gradient.to(parameters[name].dtype)
    if inner_lrs:
        rate_gradients = combine([dict(enumerate(r.inner_lr_gradient)) for r in results], weights)
        for index, rate in enumerate(inner_lrs):
            rate.grad = rate_gradients[index]
