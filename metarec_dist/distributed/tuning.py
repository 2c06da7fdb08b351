"""``metarec-dist tune``: Ray Tune trials over the config's search space, chosen on validation only.

    tune_method(config, method, trials, directory)
        -> Ray Tune: random search over tune.space (meta_search_space.method_space),
           ASHA stopping the worst trials at each rung of validations
        -> each trial: one training run of the config with its settings, test split unread,
           reporting every validation:
             runner.workers 1: Trainer(...).run(test=False) in the trial's own process
             runner.workers N: train_distributed(..., test=False) on N Ray Train workers,
                               whose controller forwards each validation to Ray Tune
        -> TuningOutcome: every trial's settings and best validation, the best trial's config

A one-process trial takes ``train.threads`` CPUs (1 if unset), and Ray Tune
runs as many at once as the cluster (local, or ``runner.address``) has CPUs
for. A trial on workers reserves nothing itself: its Ray Train workers hold
``runner.workers x runner.cpus_per_worker`` CPUs, and Ray Tune starts only as
many trials at once as the cluster has CPUs for. An ASHA stop ends a trial's
driver, and Ray ends its workers with it. Trials never read the test split:
the chosen config is trained and tested by ``metarec-dist train`` or ``compare``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metarec_dist.errors import TrainingError
from metarec_dist.meta.config import ExperimentConfig
from metarec_dist.meta.search_space import checked_space, with_settings
from metarec_dist.storage import location

TRIAL_DRIVER_MEMORY = 256 * 2**20  # bytes reserved for a trial that trains on Ray Train workers


@dataclass
class TuningOutcome:
    trials: list[dict[str, Any]]  # per trial: settings, best validation, validations run, stopped early, error
    best: dict[str, Any]  # the best trial's row
    best_config: ExperimentConfig


def tune_method(config: ExperimentConfig, method: str, trials: int, directory: Path) -> TuningOutcome:
    """Run ``trials`` trials of ``method`` over ``config.tune.space``; Ray Tune's files go to ``directory``."""
    threads = config.train.threads or 1
    config = with_settings(config, {"method": method, "train.threads": threads,
                                    "data.store": location(config.data.store, "data.store").uri}, where="tune")
    space = checked_space(config, method)
    metric = config.train.selection_metric
    validations = math.ceil(config.train.steps / config.train.eval_every)

    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    from metarec_dist.distributed.preflight import check_resources
    from metarec_dist.distributed.runner import connect

    # Ray Tune stops a trial by killing its driver: a Ray Train run's placement group is then freed
    # by Ray Train's cleaner, which needs the dashboard's state API.
    connect(config, dashboard=config.runner.workers > 1)
    if config.runner.workers == 1:
        resources, at_once = {"cpu": threads}, 0  # 0: as many as the trials' CPUs allow
    else:
        check_resources(config)
        cluster_cpus = ray.cluster_resources().get("CPU", 0)
        # The trial's driver only waits (its Ray Train workers hold the CPUs); Ray Tune needs some request.
        resources = {"cpu": 0, "memory": TRIAL_DRIVER_MEMORY}
        at_once = max(1, int(cluster_cpus // (config.runner.workers * config.runner.cpus_per_worker)))
    scheduler = ASHAScheduler(time_attr="validation", max_t=validations,
                              grace_period=min(config.tune.grace_validations, validations),
                              reduction_factor=config.tune.reduction_factor)
    tuner = tune.Tuner(
        tune.with_resources(_trial_function(config.model_dump(mode="json"), metric, directory.resolve()), resources),
        param_space={key: _sampler(dimension) for key, dimension in space.items()},
        tune_config=tune.TuneConfig(
            metric=metric, mode="max", num_samples=trials, scheduler=scheduler,
            search_alg=BasicVariantGenerator(random_state=config.tune.seed, max_concurrent=at_once)),
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
            "workers": int(frame["workers"].iloc[-1]) if reported else None,
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


def _trial_function(base: dict[str, Any], metric: str, directory: Path):
    """A Ray Tune function trainable: train ``base`` with the trial's settings, report each validation."""

    def trial(settings: dict[str, Any]) -> None:
        from ray import tune

        config = with_settings(ExperimentConfig.model_validate(base), settings)
        if config.runner.workers > 1:
            from metarec_dist.distributed.runner import train_distributed

            trial_id = tune.get_context().get_trial_id()
            train_distributed(config, directory / "workers" / trial_id, test=False,
                              callbacks=[_validations_to_tune(metric, config.train.eval_every)])
            return

        from metarec_dist.meta.trainer import Trainer
        from metarec_dist.meta.training_data import load_training_data

        trainer = Trainer(config, load_training_data(config), progress=False)

        def report(entry: dict[str, Any]) -> None:
            tune.report(_validation_report(entry["step"], config.train.eval_every, metric,
                                           entry["valid"][metric], trainer.loop.stopped, workers=1))

        trainer.run(on_validation=report, test=False)

    return trial


def _validation_report(step: int, eval_every: int, metric: str, value: float, early_stopped: bool,
                       workers: int) -> dict[str, Any]:
    """What a trial tells Ray Tune at a validation; ASHA's rungs count validations."""
    return {"validation": math.ceil(step / eval_every), "step": step, metric: value, "early_stopped": early_stopped,
            "workers": workers}


def _validations_to_tune(metric: str, eval_every: int):
    """A Ray Train callback (made in the trial, run in the controller) handing the validations to Ray Tune.

    The workers also report at checkpoints and at the end; only reports
    carrying ``metric`` are validations.
    """
    from ray.tune.integration.ray_train import TuneReportCallback

    class ValidationsToTune(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint) -> None:  # metrics: one dict per worker
            leader = metrics[0]
            if metric in leader:
                self._training_actor_item_queue.put(_validation_report(
                    leader["step"], eval_every, metric, leader[metric], leader["early_stopped"], len(metrics)))

    return ValidationsToTune()
