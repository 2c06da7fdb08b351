"""A finished run read back from its directory: config, target data and the best model.

Only ``config.yaml``, ``model.pt`` (plain tensors) and the store are read, so a
run trained on many workers loads in one process without Ray or DeepSpeed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from metarec_dist.config import load_config
from metarec_dist.errors import ConfigError
from metarec_dist.meta.config import ExperimentConfig
from metarec_dist.meta.training_data import TrainingData, load_training_data
from metarec_dist.model.recommender import SequenceRecommender

MODEL_FILE = "model.pt"


@dataclass
class SavedRun:
    run_dir: Path
    config: ExperimentConfig
    data: TrainingData  # the target only
    model: SequenceRecommender  # the target's model, in eval mode


def run_config(run_dir: Path, overrides: list[str] | tuple[str, ...], may_change: str, kind: str) -> ExperimentConfig:
    """A run directory's own ``config.yaml``, with ``overrides`` only under ``may_change`` (e.g. ``eval.``)."""
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir}: not a run directory (no config.yaml); give a directory under runs/")
    for text in overrides:
        if not text.startswith(may_change):
            raise ConfigError(f"--set {text!r}: {kind} keeps its config; only {may_change}* may change")
    return load_config(ExperimentConfig, run_dir / "config.yaml", list(overrides))


def load_saved_run(run_dir: Path, overrides: list[str] | tuple[str, ...] = ()) -> SavedRun:
    """Read a finished run; ``overrides`` may change only ``eval.*`` (how it is evaluated)."""
    import torch

    if (run_dir / "config.yaml").is_file() and not (run_dir / MODEL_FILE).is_file():
        raise ConfigError(
            f"{run_dir}: no saved model ({MODEL_FILE}); the run did not finish: "
            "resume it with `metarec-dist train --resume` or train again"
        )
    config = run_config(run_dir, overrides, "eval.", "a saved run")
    data = load_training_data(config, sources=[])
    target = config.data.target
    model = SequenceRecommender(config.effective_model, {target: data.catalogs[target]})
    try:
        state = torch.load(run_dir / MODEL_FILE, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated, not a torch file, or holding more than tensors
        raise ConfigError(f"{run_dir / MODEL_FILE}: unreadable ({str(error).splitlines()[0]})") from None
    try:
        # strict=False only to name the mismatch below; model.pt holds exactly theta and the target's.
        problems = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shapes differ: the store's target changed since training
        line = " ".join(str(error).split())[:300]
        raise ConfigError(f"{run_dir / MODEL_FILE}: does not fit domain '{target}' in the store ({line})") from None
    for kind, names in (("lacks", problems.missing_keys), ("has unexpected", problems.unexpected_keys)):
        if names:
            raise ConfigError(
                f"{run_dir / MODEL_FILE}: {kind} parameters for this config ({len(names)}, e.g. {names[0]}); "
                "it was not written by this run's config"
            )
    return SavedRun(run_dir=run_dir, config=config, data=data, model=model.eval())


__all__ = ["MODEL_FILE", "SavedRun", "load_saved_run", "run_config"]
