"""``metarec-dist tune``: Ray Tune trials over the config's search space, chosen on validation only.

    tune_method(config, method, trials, directory)
        -> Ray Tune: random search over tune.space (meta_search_space.method_space),
           ASHA stopping the worst trials at each rung of validations
        -> each trial: Trainer(config with its settings).run(test=False), reporting every validation
        -> TuningOutcome: every trial's settings and best validation, the best trial's config

A trial is one training run in one process (``train.threads`` CPUs, 1 if
unset); Ray Tune runs as many at once as the cluster (local, or
``runner.address``) has CPUs for. Trials never read the test split: the chosen
config is trained and tested by ``metarec-dist train`` or ``compare``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metarec_dist.errors import ConfigError, TrainingError
from metarec_dist.meta.config import ExperimentConfig, SearchDimension
from metarec_dist.meta.search_space import checked_space, with_settings
from metarec_dist.storage import location


@dataclass
class TuningOutcome:
    trials: list[dict[str, Any]]  # per trial: settings, best validation, validations run, stopped early, error
    best: dict[str, Any]  # the best trial's row
    best_config: ExperimentConfig


def check_tuning(config: ExperimentConfig, method: str) -> dict[str, SearchDimension]:
    """The dimensions ``method`` searches; raises if the config cannot be tuned (before anything is written)."""
    if config.runner.workers != 1:
        raise ConfigError("runner.workers: tuning runs each trial in one process and as many trials at once "
                          "as the cluster has CPUs for; set runner.workers: 1")
    return checked_space(config, method)


def tune_method(config: ExperimentConfig, method: str, trials: int, directory: Path) -> TuningOutcome:
    """Run ``trials`` trials of ``method`` over ``config.tune.space``; Ray Tune's files go to ``directory``."""
    threads = config.train.threads or 1
    config = with_settings(config, {"method": method, "train.threads": threads,
                                    "data.store": location(config.data.store, "data.store").uri}, where="tune")
    space = check_tuning(config, method)
    metric = config.train.selection_metric
    validations = math.ceil(config.train.steps / config.train.eval_every)

    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    from metarec_dist.distributed.runner import connect

    connect(config)
    scheduler = ASHAScheduler(time_attr="validation", max_t=validations,
                              grace_period=min(config.tune.grace_validations, validations),
                              reduction_factor=config.tune.reduction_factor)
    tuner = tune.Tuner(
        tune.with_resources(_trial_function(config.model_dump(mode="json"), metric), {"cpu": threads}),
        param_space={key: _sampler(dimension) for key, dimension in space.items()},
        tune_config=tune.TuneConfig(metric=metric, mode="max", num_samples=trials, scheduler=scheduler,
                                    search_alg=BasicVariantGenerator(random_state=config.tune.seed)),
        run_config=tune.RunConfig(storage_path=str(directory.resolve()), name="trials", verbose=1),
    )
    grid = tuner.fit()
    rows = []
    for result in grid:
        frame = result.metrics_dataframe
        reported = frame is not None and metric in frame
        rows.append({
            "settings": {key: result.config[key] for key in space},
            "best_valid": float(frame[metric].max()) if reported else None,
            "best_step": int(frame.loc[frame[metric].idxmax(), "step"]) if reported else None,
            "validations": int(len(frame)) if reported else 0,
            "stopped_by_asha": bool(reported and len(frame) < validations and not frame["early_stopped"].iloc[-1]),
            "error": None if result.error is None else str(result.error).strip().splitlines()[-1],
        })
    finished = [row for row in rows if row["best_valid"] is not None]
    if not finished:
        raise TrainingError(f"tune: every trial failed; the first: {rows[0]['error']}")
    best = max(finished, key=lambda row: row["best_valid"])
    return TuningOutcome(trials=rows, best=best, best_config=with_settings(config, best["settings"]))


def _sampler(dimension):
    from ray import tune

    if dimension.choice is not None:
        return tune.choice(dimension.choice)
    if dimension.uniform is not None:
        return tune.uniform(*dimension.uniform)
    if dimension.loguniform is not None:
        return tune.loguniform(*dimension.loguniform)
    return tune.randint(*dimension.randint)


def _trial_function(base: dict[str, Any], metric: str):
    """A Ray Tune function trainable: train ``base`` with the trial's settings, report each validation."""

    def trial(settings: dict[str, Any]) -> None:
        from ray import tune

        from metarec_dist.meta.trainer import Trainer
        from metarec_dist.meta.training_data import load_training_data

        config = with_settings(ExperimentConfig.model_validate(base), settings)
        trainer = Trainer(config, load_training_data(config), progress=False)
        count = 0

        def report(entry: dict[str, Any]) -> None:
            nonlocal count
            count += 1
            tune.report({"validation": count, "step": entry["step"], metric: entry["valid"][metric],
                         "early_stopped": trainer.loop.stopped})

        trainer.run(on_validation=report, test=False)

    return trial
