"""One device per process, chosen once; the random streams a checkpoint keeps.

A one-process run takes ``train.device`` (``auto``: CUDA when torch sees it);
a Ray Train worker takes the device Ray Train assigned it
(``ray.train.torch.get_device()``: its GPU, or the CPU). Everything of the
process lives there: the model, batches, fast weights, optimizer state,
collective buffers and the exact searcher.
"""

from __future__ import annotations

import os
from typing import Any, Literal

import torch

from metarec_dist.errors import ConfigError

DeviceSetting = Literal["auto", "cpu", "cuda"]


def process_device(setting: DeviceSetting) -> torch.device:
    """The device of a one-process run (``train.device``)."""
    if setting == "cpu" or (setting == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("train.device: cuda, but torch sees no CUDA device (a CPU build of torch, or no GPU "
                          "here); set train.device to auto or cpu")
    return torch.device("cuda", torch.cuda.current_device())


def worker_device() -> torch.device:
    """The device Ray Train gave this worker (its GPU when the run uses GPUs)."""
    from ray.train.torch import get_device

    device = get_device()
    return device[0] if isinstance(device, list) else device


def use_device(device: torch.device) -> None:
    """Make ``device`` this process's: CUDA's current device, and DeepSpeed's accelerator to match
    (unless the user chose one): a CPU process on a GPU machine must not hand DeepSpeed CUDA."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if device.type == "cuda" else "cpu")


def random_states(device: torch.device) -> dict[str, Any]:
    """torch's random streams of this process, JSON-able: the CPU's and, on a GPU, the device's."""
    states: dict[str, Any] = {"torch": torch.get_rng_state().tolist()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device).tolist()
    return states


def restore_random_states(states: dict[str, Any], device: torch.device) -> None:
    """Set the streams ``random_states`` saved. A checkpoint from another kind of device restores the
    CPU's stream; the GPU's starts from the seed (it draws only dropout masks)."""
    torch.set_rng_state(torch.tensor(states["torch"], dtype=torch.uint8))
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(torch.tensor(states["cuda"], dtype=torch.uint8), device)
