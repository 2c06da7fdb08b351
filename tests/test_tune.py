"""`metarec-dist tune`: the search space in the config, trials on Ray Tune, a best config that `train` accepts."""

import json

import pytest
import yaml
from conftest import write_config

from metarec_dist.cli import main
from metarec_dist.config import load_config
from metarec_dist.errors import ConfigError
from metarec_dist.meta.config import ExperimentConfig
from metarec_dist.meta.search_space import checked_space, with_settings

SPACE = {"train.learning_rate": {"loguniform": [0.001, 0.01]}, "meta.temperature": {"choice": [0.1, 1.0]}}


def config_with(tmp_path, store, space):
    return load_config(ExperimentConfig, write_config(tmp_path, store, tune={"space": space}))


def test_each_method_searches_the_settings_it_reads_and_a_trial_gets_its_values(synthetic_store, tmp_path):
    config = config_with(tmp_path, synthetic_store, SPACE)
    assert set(checked_space(config, "metarec")) == {"train.learning_rate", "meta.temperature"}
    assert list(checked_space(config, "target_only")) == ["train.learning_rate"]
    assert list(checked_space(config, "uniform")) == ["train.learning_rate"]  # its weights have no temperature
    trial = with_settings(config, {"train.learning_rate": 0.004, "meta.temperature": 1.0})
    assert trial.train.learning_rate == 0.004 and trial.meta.temperature == 1.0
    assert trial.train.steps == config.train.steps  # everything else as configured


@pytest.mark.parametrize(("space", "message"), [
    ({"train.learning_rte": {"uniform": [0.1, 0.2]}}, "tune.space.train.learning_rte: 'train.learning_rte' is not"),
    ({"train.batch_size": {"randint": [0, 8]}}, "tune.space.train.batch_size"),  # batch size 0 is invalid
    ({"train.seed": {"choice": [0, 1]}}, "tune.space.train.seed: not searched"),
    ({"data.target": {"choice": ["syn-a"]}}, "only model.*, meta.* and train.* settings"),
])
def test_a_space_with_a_setting_that_does_not_exist_or_an_invalid_value_is_refused_naming_it(
        synthetic_store, tmp_path, space, message):
    config = config_with(tmp_path, synthetic_store, space)
    with pytest.raises(ConfigError, match=message.replace("*", r"\*")):
        checked_space(config, "metarec")


def test_a_dimension_must_say_one_kind_of_values(synthetic_store, tmp_path):
    path = write_config(tmp_path, synthetic_store, tune={"space": {"train.learning_rate": {
        "uniform": [0.1, 0.2], "choice": [0.1]}}})
    with pytest.raises(ConfigError, match="tune.space.train.learning_rate"):
        load_config(ExperimentConfig, path)
    path = write_config(tmp_path, synthetic_store, tune={"space": {"train.learning_rate": {"loguniform": [0, 1]}}})
    with pytest.raises(ConfigError, match="low must be positive"):
        load_config(ExperimentConfig, path)


@pytest.fixture
def fresh_ray():
    """``tune`` starts a local Ray cluster in this process; later tests start their own."""
    import ray

    yield
    ray.shutdown()


@pytest.mark.slow
def test_tune_runs_trials_on_ray_tune_and_writes_the_best_config_which_train_accepts(
        synthetic_store, tmp_path, capsys, fresh_ray):
    config = write_config(tmp_path, synthetic_store, train={"steps": 6, "batch_size": 16, "eval_every": 2},
                          tune={"space": SPACE, "trials": 3, "reduction_factor": 2})
    assert main(["tune", str(config), "--method", "metarec", "--trials", "4"]) == 0
    out = capsys.readouterr().out
    (directory,) = (tmp_path / "runs").iterdir()
    tuned = json.loads((directory / "tune.json").read_text())
    trials = tuned["trials"]
    assert len(trials) == 4 and all(trial["error"] is None for trial in trials)
    assert all(0.001 <= trial["settings"]["train.learning_rate"] <= 0.01 for trial in trials)
    assert all(trial["settings"]["meta.temperature"] in (0.1, 1.0) for trial in trials)
    assert all(1 <= trial["validations"] <= 3 for trial in trials)
    assert tuned["best"]["best_valid"] == max(trial["best_valid"] for trial in trials)
    best = yaml.safe_load((directory / "best.yaml").read_text())
    assert best["method"] == "metarec" and best["train"]["learning_rate"] == tuned["best"]["settings"][
        "train.learning_rate"] and best["meta"]["temperature"] == tuned["best"]["settings"]["meta.temperature"]
    assert "the test split was not read" in out and str(directory / "best.yaml") in out

    assert main(["train", str(directory / "best.yaml"), "--set", f"output_dir={tmp_path / 'trained'}"]) == 0
    (run,) = (tmp_path / "trained").iterdir()
    assert json.loads((run / "results.json").read_text())["test"]["users"] > 0


@pytest.mark.slow
def test_tune_trials_can_each_train_on_ray_train_workers_and_a_stopped_trial_frees_them(
        synthetic_store, tmp_path, fresh_ray):
    # Two workers take both CPUs: the second trial can start only once Ray Tune's stop of the first
    # (at its last rung) has freed its Ray Train workers.
    config = write_config(tmp_path, synthetic_store, train={"steps": 4, "batch_size": 16, "eval_every": 2},
                          tune={"space": SPACE, "grace_validations": 2}, runner={"workers": 2, "cpus_per_worker": 1})
    assert main(["tune", str(config), "--method", "metarec", "--trials", "2"]) == 0
    (directory,) = (tmp_path / "runs").iterdir()
    trials = json.loads((directory / "tune.json").read_text())["trials"]
    assert len(trials) == 2 and all(trial["error"] is None and trial["validations"] == 2 for trial in trials)
    assert all(trial["workers"] == 2 for trial in trials)  # as each trial's Ray Train leader reported
    assert len(list((directory / "workers").iterdir())) == 2  # each trial's Ray Train run has its own storage
