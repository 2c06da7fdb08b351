"""The ``Collective`` of ``metarec_dist.meta.step`` over torch.distributed (set up by Ray Train).

Explicit calls at step boundaries, never inside ``forward``: the meta-step
gathers the tasks' similarities and sums the weighted gradients here.
"""

from __future__ import annotations

import pickle
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

# Objects gathered every step (a meta-step's similarities, a step's losses) pickle to a few
# hundred bytes: in a buffer this size they take one all_gather, where torch's
# all_gather_object always takes two (the sizes, then the payloads). Each round costs
# milliseconds of latency in which every worker waits.
SMALL_OBJECT_BYTES = 4096
_LENGTH_BYTES = 8  # the pickle's length, ahead of it in each buffer


class TorchCollective:
    """The default process group: gloo on CPUs, NCCL on GPUs (Ray Train chooses)."""

    def __init__(self) -> None:
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised: run inside a Ray Train worker")
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.seconds = 0.0  # wall time inside these calls, waiting for the other workers included
        # NCCL moves only tensors on this process's GPU (metarec_dist.device.use_device made it current).
        nccl = dist.get_backend() == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")

    @contextmanager
    def _timed(self) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - started

    def all_gather_object(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order: one all_gather when every rank's pickle fits
        in ``SMALL_OBJECT_BYTES``, else a second one sized for the largest."""
        payload = pickle.dumps(value)
        with self._timed():
            buffers = self._all_gather_bytes(payload, SMALL_OBJECT_BYTES)
            lengths = [int(buffer[:_LENGTH_BYTES].view(torch.int64)) for buffer in buffers]
            if max(lengths) > SMALL_OBJECT_BYTES:
                buffers = self._all_gather_bytes(payload, max(lengths))
        return [pickle.loads(buffer[_LENGTH_BYTES : _LENGTH_BYTES + length].numpy().tobytes())
                for buffer, length in zip(buffers, lengths)]

    def _all_gather_bytes(self, payload: bytes, capacity: int) -> list[torch.Tensor]:
        """Each rank's buffer: the payload's length, then the payload if it fits in ``capacity``."""
        buffer = torch.zeros(_LENGTH_BYTES + capacity, dtype=torch.uint8)
        buffer[:_LENGTH_BYTES].view(torch.int64).fill_(len(payload))
        if len(payload) <= capacity:
            buffer[_LENGTH_BYTES : _LENGTH_BYTES + len(payload)] = torch.frombuffer(bytearray(payload),
                                                                                   dtype=torch.uint8)
        buffer = buffer.to(self.device)
        gathered = [torch.empty_like(buffer) for _ in range(self.world_size)]
        dist.all_gather(gathered, buffer)
        return [tensor.cpu() for tensor in gathered]

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
