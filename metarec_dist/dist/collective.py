"""The ``Collective`` of ``metarec_dist.meta.step`` over torch.distributed (set up by Ray Train).

Explicit calls at step boundaries, never inside ``forward``: the meta-step
gathers the tasks' similarities and sums the weighted gradients here.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist


class TorchCollective:
    """The default process group: gloo on CPUs, NCCL on GPUs (Ray Train chooses)."""

    def __init__(self) -> None:
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised: run inside a Ray Train worker")
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.seconds = 0.0  # wall time inside these calls, waiting for the other workers included

    @contextmanager
    def _timed(self) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - started

    def all_gather_object(self, value: Any) -> list[Any]:
        gathered: list[Any] = [None] * self.world_size
        with self._timed():
            dist.all_gather_object(gathered, value)
        return gathered

    def all_reduce_sum_(self, tensors: list[torch.Tensor]) -> None:
        with self._timed():
            for tensor in tensors:
                dist.all_reduce(tensor, op=dist.ReduceOp.SUM)

    def broadcast_object(self, value: Any, source: int = 0) -> Any:
        holder = [value]
        with self._timed():
            dist.broadcast_object_list(holder, src=source)
        return holder[0]

    def broadcast_(self, tensor: torch.Tensor, source: int = 0) -> None:
        with self._timed():
            dist.broadcast(tensor, src=source)
