"""Adam that updates only the rows a step touched, for item tables with row-sparse gradients.

A training step reads a few thousand items of a catalog that may hold millions.
``torch.nn.functional.embedding(..., sparse=True)`` gives such a table a sparse
gradient (row ids and rows); plain Adam would still decay every row's moments
and move every row. Here a sparse gradient updates its rows only (lazy Adam, as
TensorFlow's LazyAdam and TorchRec's fused row-wise optimizers do): the rows
not in the gradient keep their values and their moments, so a step's cost does
not grow with the catalog. Bias correction uses the parameter's step count.
Dense gradients take torch's Adam step unchanged, so one optimizer serves a
model whose tables are sparse and whose encoder is dense, and the state has
Adam's keys (``step``, ``exp_avg``, ``exp_avg_sq``) for checkpoints.
"""

from __future__ import annotations

import torch


class RowSparseAdam(torch.optim.Adam):
    """``torch.optim.Adam`` (no amsgrad) whose sparse-gradient parameters get row-wise lazy updates."""

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("RowSparseAdam.step takes no closure")
        held = []
        for group in self.param_groups:
            if group["amsgrad"] or group["maximize"]:
                raise ValueError("RowSparseAdam supports neither amsgrad nor maximize")
            for p in group["params"]:
                if p.grad is not None and p.grad.is_sparse:
                    self._sparse_step(p, p.grad, group)
                    held.append((p, p.grad))
                    p.grad = None  # Adam's own step skips it
        try:
            super().step()
        finally:
            for p, grad in held:
                p.grad = grad

    @torch.no_grad()
    def count_step(self, p: torch.Tensor) -> None:
        """Count a step of ``p`` that changed none of its rows (the rest of its table, held by another
        process, was updated): the step count drives the bias correction of later updates."""
        self._state(p)["step"] += 1

    def _state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _sparse_step(self, p: torch.Tensor, grad: torch.Tensor, group: dict) -> None:
        state = self._state(p)
        grad = grad.coalesce()
        rows, values = grad.indices()[0], grad.values().to(p.dtype)
        if len(rows) == 0:
            return
        beta1, beta2 = group["betas"]
        state["step"] += 1
        step = float(state["step"])
        if group["weight_decay"]:
            values = values + group["weight_decay"] * p[rows]
        exp_avg = state["exp_avg"][rows].mul_(beta1).add_(values, alpha=1 - beta1)
        exp_avg_sq = state["exp_avg_sq"][rows].mul_(beta2).addcmul_(values, values, value=1 - beta2)
        state["exp_avg"][rows] = exp_avg
        state["exp_avg_sq"][rows] = exp_avg_sq
        step_size = group["lr"] / (1 - beta1**step)
        denominator = (exp_avg_sq.sqrt() / (1 - beta2**step) ** 0.5).add_(group["eps"])
        p[rows] = p[rows].addcdiv_(exp_avg, denominator, value=-step_size)


def empty_row_gradient(like: torch.Tensor) -> torch.Tensor:
    """A sparse gradient with no rows, shaped like the table ``like``."""
    return torch.sparse_coo_tensor(
        torch.empty(1, 0, dtype=torch.long, device=like.device),
        torch.empty(0, *like.shape[1:], dtype=like.dtype, device=like.device),
        like.shape,
    )


def adam_state(step: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
               like: torch.Tensor) -> dict[str, torch.Tensor]:
    """Adam's state for parameter ``like`` from saved (CPU) tensors: the moments on its device, the
    step count on the CPU, as torch's Adam keeps them (a checkpoint may come from another device)."""
    return {"step": step.detach().cpu().clone(), "exp_avg": exp_avg.to(like.device, copy=True),
            "exp_avg_sq": exp_avg_sq.to(like.device, copy=True)}
