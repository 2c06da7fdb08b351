"""Checkpoints of a distributed run: plain tensors and JSON, independent of the number of workers.

One directory per checkpointed meta-step, assembled by Ray Train from every
worker's files:

    state.json            rank 0: the loop state, per-source weights, the plan, the world size
    shared.pt             rank 0: theta (encoder, codebook), the target's parameters, learned inner rates
    shared_optimizer.pt   rank 0: their Adam moments at full size (ZeRO partitions and codebook
                          shards gathered first), so any number of workers can load them
    best.pt               rank 0: the best validated weights so far (theta and the target's)
    sources/<domain>.pt   each source's owner: the source's parameters and Adam moments
    rng-<rank>.json       each worker's batch sampler and torch random state
    done-<rank>.json      written last by each worker, naming its files and their sizes: a
                          checkpoint is complete when every rank of ``state.json``'s world size
                          has one and every file it names has its size (a copy to storage cut
                          short by a full disk or a kill is incomplete)

Nothing is ever unpickled: tensors load with ``weights_only=True``. A resumed
run with the same number of workers continues each worker's random streams; with
another number, the streams are re-seeded from (seed, rank, step) and the
sources are dealt by a new plan (each worker reads the files of the sources it
now owns).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from metarec_dist.distributed.optimizer import WorkerOptimizer
from metarec_dist.distributed.plan import DomainPlan
from metarec_dist.errors import TrainingError
from metarec_dist.meta.codebook_upkeep import summed_usage
from metarec_dist.meta.step import reduced_names
from metarec_dist.meta.trainer import Trainer
from metarec_dist.storage import Location, location

FORMAT_VERSION = 1


def write_checkpoint(directory: Path, trainer: Trainer, optimizer: WorkerOptimizer, plan: DomainPlan) -> None:
    """This worker's part of the checkpoint, into ``directory`` (a collective: every worker calls it)."""
    rank, world_size = trainer.collective.rank, trainer.collective.world_size
    shared_moments, own_moments = optimizer.consolidated_state()  # gathers partitions: everyone calls
    codebook_usage = _codebook_usage(trainer)  # summed over workers: everyone calls
    with trainer.whole_model():  # a table split by rows, a codebook searched where it lives: saved whole
        state = {name: value.clone() for name, value in trainer.model.state_dict().items()}
    trainer_state = trainer.state_dict()
    written: list[str] = []

    def save(name: str, tensors: dict[str, torch.Tensor]) -> None:
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.detach().cpu().clone() for k, v in tensors.items()}, path)
        written.append(name)

    if rank == 0:
        shared_names = reduced_names(trainer.model, trainer.data.target)
        inner_rates = {f"inner_lr.{index}": rate for index, rate in enumerate(trainer_state["inner_lrs"])}
        save("shared.pt", {**{n: state[n] for n in shared_names}, **inner_rates, **codebook_usage})
        save("shared_optimizer.pt", shared_moments)
        save("best.pt", trainer_state["best_state"])
        save("direction.pt", trainer_state["direction"])
        (directory / "state.json").write_text(json.dumps({
            "format": FORMAT_VERSION,
            "world_size": world_size,
            "step": trainer_state["loop"]["step"],
            "loop": trainer_state["loop"],
            "source_weights": trainer_state["source_weights"],
            "plan": json.loads(plan.to_json()),
        }))
        written.append("state.json")
    for source in plan.shard(rank):
        names = trainer.model.local_names(source)
        save(f"sources/{source}.pt", {
            **{n: state[n] for n in names},
            **{k: v for k, v in own_moments.items() if k.rsplit("/", 1)[0] in names},
        })
    (directory / f"rng-{rank}.json").write_text(json.dumps(trainer_state["random"]))
    written.append(f"rng-{rank}.json")
    sizes = {name: (directory / name).stat().st_size for name in written}
    (directory / f"done-{rank}.json").write_text(json.dumps({"files": sizes}))


def is_complete(directory: Path | Location) -> bool:
    """Every worker finished writing its part (a crash while writing leaves it incomplete)."""
    folder = directory if isinstance(directory, Location) else location(directory, "checkpoint")
    return _complete_state(folder) is not None


def latest_complete(storage: Path | Location) -> Location | None:
    """The complete checkpoint of the highest step under ``storage`` (any attempt), or None."""
    storage = storage if isinstance(storage, Location) else location(storage, "runner.storage_path")
    found = []
    for state_file in storage.files_named("state.json"):
        state = _complete_state(state_file.parent)
        if state is not None:
            found.append(((state["step"], state_file.parent.uri), state_file.parent))
    return max(found, key=lambda entry: entry[0])[1] if found else None


def _complete_state(folder: Location) -> dict | None:
    """The checkpoint's ``state.json`` if every rank's ``done-<rank>.json`` names files of the sizes
    written, else None (one listing of the folder: it may be remote)."""
    try:
        state = json.loads(folder.child("state.json").read_text())
        present = folder.sizes()
        for rank in range(state["world_size"]):
            files = json.loads(folder.child(f"done-{rank}.json").read_text())["files"]
            sizes = files if isinstance(files, dict) else dict.fromkeys(files)  # a list: written without sizes
            if not all(name in present and size in (None, present[name]) for name, size in sizes.items()):
                return None
    except (OSError, ValueError, KeyError):
        return None
    return state


@torch.no_grad()
def read_checkpoint(directory: Path, trainer: Trainer, optimizer: WorkerOptimizer, plan: DomainPlan) -> int:
    """Load the checkpoint into this worker's trainer and optimizer; returns the step it was taken at."""
    if not is_complete(directory):
        raise TrainingError(f"{directory}: incomplete checkpoint (a worker did not finish writing it)")
    rank = trainer.collective.rank
    meta = json.loads((directory / "state.json").read_text())
    if meta.get("format") != FORMAT_VERSION:
        raise TrainingError(f"{directory}: checkpoint format {meta.get('format')} is not {FORMAT_VERSION}")

    def load(name: str) -> dict[str, torch.Tensor]:
        return torch.load(directory / name, map_location="cpu", weights_only=True)

    shared = load("shared.pt")
    moments = load("shared_optimizer.pt")
    parameters = {k: v for k, v in shared.items() if not k.startswith(("inner_lr.", USAGE, RECENT))}
    for source in plan.shard(rank):
        values = load(f"sources/{source}.pt")
        parameters.update({k: v for k, v in values.items() if "/" not in k})
        moments.update({k: v for k, v in values.items() if "/" in k})
    with trainer.whole_model(keep_changes=True):  # then each worker keeps its block, its codebooks
        missing = trainer.model.load_state_dict(parameters, strict=False).missing_keys
    if missing:
        raise TrainingError(f"{directory}: checkpoint lacks {len(missing)} parameters, e.g. {missing[0]}")
    optimizer.load_consolidated_state(moments)
    quantizer = trainer.model.quantizer
    if quantizer is not None and USAGE in shared:
        # The leader holds every worker's counts since the last re-initialisation (their sum
        # is what re-initialisation and health read), and the vectors it picks from.
        quantizer.usage.copy_(shared[USAGE] if rank == 0 else torch.zeros_like(quantizer.usage))
        quantizer.recent = shared.get(RECENT) if rank == 0 else None

    same_world = meta["world_size"] == trainer.collective.world_size  # else each rank's streams start anew
    trainer.load_state_dict({
        "loop": meta["loop"],
        "source_weights": meta["source_weights"],
        "best_state": load("best.pt"),
        "direction": load("direction.pt") if (directory / "direction.pt").exists() else {},
        "inner_lrs": [shared[f"inner_lr.{index}"] for index in range(sum(k.startswith("inner_lr.") for k in shared))],
        "random": json.loads((directory / f"rng-{rank}.json").read_text()) if same_world else None,
    })
    return int(meta["step"])


USAGE, RECENT = "codebook_usage", "codebook_recent"


def _codebook_usage(trainer: Trainer) -> dict[str, torch.Tensor]:
    quantizer = trainer.model.quantizer
    if quantizer is None:
        return {}
    recent = quantizer.recent
    return {USAGE: summed_usage(quantizer, trainer.collective), **({RECENT: recent} if recent is not None else {})}
