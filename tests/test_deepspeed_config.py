"""The DeepSpeed engine's config: exact updates forced, mismatches with the run config refused."""

import json
from pathlib import Path

import pytest

from metarec_dist.distributed.optimizer import deepspeed_config
from metarec_dist.errors import ConfigError
from metarec_dist.meta.config import ExperimentConfig

SHIPPED = Path(__file__).resolve().parents[1] / "configs" / "deepspeed"


def run_config(**runner):
    return ExperimentConfig(data={"target": "t", "sources": ["a"]}, train={"learning_rate": 0.01, "weight_decay": 0.1},
                     runner=runner)


@pytest.mark.parametrize("name", ["zero0.json", "zero1.json", "zero2.json", "zero2_bf16.json"])
def test_shipped_configs_load_with_clipping_off_and_the_runs_optimizer(name):
    stage = json.loads((SHIPPED / name).read_text())["zero_optimization"]["stage"]
    values = deepspeed_config(run_config(zero_stage=stage, deepspeed_config=SHIPPED / name))
    assert values["zero_optimization"]["stage"] == stage
    assert values["gradient_clipping"] == 0.0  # DeepSpeed would clip at 1.0 and bend the meta-update
    assert values["optimizer"]["params"]["lr"] == 0.01 and values["optimizer"]["params"]["weight_decay"] == 0.1


def test_a_file_asking_for_another_zero_stage_is_refused_naming_both(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    with pytest.raises(ConfigError, match="stage 1.*runner.zero_stage is 2"):
        deepspeed_config(run_config(zero_stage=2, deepspeed_config=path))


@pytest.mark.parametrize("content, message", [("{not json", "not valid JSON"), ("[1, 2]", "JSON object")])
def test_an_unreadable_deepspeed_file_is_a_config_error(tmp_path, content, message):
    path = tmp_path / "ds.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        deepspeed_config(run_config(deepspeed_config=path))


def test_a_deepspeed_file_without_an_engine_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="runner.zero_stage"):
        deepspeed_config(run_config(zero_stage=None, deepspeed_config=SHIPPED / "zero2.json"))


def test_options_that_would_bend_the_update_are_refused_before_any_worker_starts(synthetic_store, tmp_path, capsys):
    from conftest import write_config

    from metarec_dist.cli import main

    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": 2}, "gradient_accumulation_steps": 4}))
    config = write_config(tmp_path, synthetic_store,
                          runner={"workers": 2, "zero_stage": 2, "deepspeed_config": str(bad)})
    assert main(["train", str(config)]) == 2  # no Ray cluster is started for this
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: runner.deepspeed_config:") and "gradient_accumulation_steps" in error
