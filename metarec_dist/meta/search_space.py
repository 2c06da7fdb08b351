"""Tuning's pure part: which settings a method's trials search, and the config of one trial.

The search space lives in the run config (``tune.space``: dotted setting ->
values); ``metarec-dist tune`` (``metarec_dist.distributed.tuning``) samples
it with Ray Tune. Settings a method does not read are left out of its search,
so every method spends its trials on what changes it.
"""

from __future__ import annotations

from typing import Any

from metarec_dist.config import build_config
from metarec_dist.errors import ConfigError
from metarec_dist.meta.config import ExperimentConfig, SearchDimension

SEARCHABLE = ("model.", "meta.", "train.")
NOT_SEARCHED = {"train.seed": "seeds repeat a setting; compare them with metarec-dist compare --seeds",
                "train.selection_metric": "trials are chosen on one metric; set it outside the space",
                "train.tensorboard": "it changes no result"}


def with_settings(config: ExperimentConfig, settings: dict[str, Any], where: str = "tune.space") -> ExperimentConfig:
    """``config`` with each dotted setting in ``settings`` replaced (validated; errors name ``where``)."""
    values = config.model_dump(mode="json")
    for key, value in settings.items():
        *sections, name = key.split(".")
        node = values
        for section in sections:
            node = node.get(section) if isinstance(node, dict) else None
        if not isinstance(node, dict) or name not in node:
            raise ConfigError(f"{where}: '{key}' is not a setting; use a dotted key of the run config "
                              "such as train.learning_rate")
        node[name] = value
    return build_config(ExperimentConfig, values, where)


def method_space(config: ExperimentConfig, method: str) -> dict[str, SearchDimension]:
    """The dimensions of ``config.tune.space`` that change ``method``'s training."""
    meta_steps = method in ("metarec", "uniform")
    return {key: dimension for key, dimension in config.tune.space.items()
            if (meta_steps or not key.startswith("meta."))
            and not (method == "target_only" and (key.startswith("model.vq.") or key == "train.pretrain_steps"))
            and not (method == "uniform" and key == "meta.temperature")}  # uniform weights have no softmax


def checked_space(config: ExperimentConfig, method: str) -> dict[str, SearchDimension]:
    """``method``'s dimensions, after checking that every key of the space is a searchable setting and
    that each dimension's values (choices, or both ends) make a valid config."""
    for key, dimension in config.tune.space.items():
        where = f"tune.space.{key}"
        if key in NOT_SEARCHED:
            raise ConfigError(f"{where}: not searched ({NOT_SEARCHED[key]}); remove it")
        if not key.startswith(SEARCHABLE):
            raise ConfigError(f"{where}: only model.*, meta.* and train.* settings are searched; remove it")
        for value in dimension.examples():
            with_settings(config, {key: value}, where)
    space = method_space(config, method)
    if not space:
        raise ConfigError(f"tune.space: nothing in it changes method '{method}'; add model.* or train.* "
                          "settings (meta.* change metarec and uniform only)")
    return space
