"""`metarec-dist train`: every method end to end on small synthetic domains, and bad configs."""

import json

import numpy as np
import pytest
import torch
import yaml
from conftest import SOURCES, assert_tensorboard_matches_results, write_config

from metarec_dist.cli import main
from metarec_dist.config import load_config
from metarec_dist.meta.config import ExperimentConfig
from metarec_dist.meta.records import LoopState
from metarec_dist.meta.trainer import Trainer
from metarec_dist.meta.training_data import load_training_data
from metarec_dist.report.run_directory import load_state


@pytest.mark.parametrize("method", ["metarec", "uniform", "joint", "target_only"])
def test_every_method_trains_and_writes_a_complete_run_directory(synthetic_store, tmp_path, capsys, method):
    extra = {"train.pretrain_steps": 3} if method == "joint" else {}
    config = write_config(tmp_path, synthetic_store, method=method, **extra)
    assert main(["train", str(config)]) == 0
    out = capsys.readouterr().out
    (run_dir,) = (tmp_path / "runs").iterdir()
    plots = ["loss.png"] + (["source_weights.png"] if method in ("metarec", "uniform") else [])
    expected = ["config.yaml", "model.pt", "results.json", "train.log", *plots]
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(expected)
    for plot in plots:
        assert (run_dir / plot).read_bytes().startswith(b"\x89PNG") and "plots: " in out
    results = json.loads((run_dir / "results.json").read_text())
    assert results["method"] == method and f"{method} on 'syn-target'" in out
    for split in ("validation", "test"):
        assert set(results[split]) >= {"HR@5", "HR@10", "HR@20", "NDCG@5", "NDCG@10", "NDCG@20", "MRR"}
        assert results[split]["users"] == 300
    assert results["training_users"] == 150
    assert [entry["step"] for entry in results["history"]] == [3, 6]
    state = load_state(run_dir / "model.pt")
    assert all(isinstance(value, torch.Tensor) for value in state.values())
    assert ("quantizer.codebooks" in state) == (method != "target_only")
    if method in ("metarec", "uniform"):
        weights = results["source_weights"]
        assert set(weights["final"]) <= set(SOURCES) and len(weights["history"]) == 6
        for entry in weights["history"]:
            assert sum(entry["weights"]) == pytest.approx(1.0)
        if method == "uniform":
            assert all(w == pytest.approx(0.5) for e in weights["history"] for w in e["weights"])
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["method"] == method and saved["train"]["steps"] == 6


def test_tensorboard_logs_loss_validation_and_source_weights_at_every_step(synthetic_store, tmp_path, capsys):
    config = write_config(tmp_path, synthetic_store, **{"train.tensorboard": True})
    assert main(["train", str(config)]) == 0
    assert "tensorboard: tensorboard --logdir" in capsys.readouterr().out
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert_tensorboard_matches_results(run_dir)


def test_a_second_run_gets_its_own_directory(synthetic_store, tmp_path, capsys):
    config = write_config(tmp_path, synthetic_store, method="target_only")
    assert main(["train", str(config)]) == 0
    assert main(["train", str(config)]) == 0
    capsys.readouterr()
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 2 and all((run / "results.json").is_file() for run in runs)


def test_same_seed_gives_the_same_results(synthetic_store, tmp_path):
    config = load_config(ExperimentConfig, write_config(tmp_path, synthetic_store))
    data = load_training_data(config)
    first = Trainer(config, data, progress=False).run().results
    second = Trainer(config, data, progress=False).run().results
    assert first["test"] == second["test"]
    assert first["source_weights"]["history"] == second["source_weights"]["history"]


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["meta.temperature=-1"], "meta.temperature"),
        (["meta.inner_steps=0"], "meta.inner_steps"),
        (["data.sources=[syn-target]"], "also listed as a source"),
        (["data.limited_target_fraction=0"], "data.limited_target_fraction"),
        (["train.stepz=3"], "unknown key 'train.stepz'"),
        (["method=maml"], "method"),
        (["train.selection_metric=NDCG@7"], "selection_metric"),
        (["data.sources=[]"], "needs at least one source"),
        (["method=joint"], "train.pretrain_steps: joint pre-trains on the sources"),
    ],
)
def test_impossible_configs_are_rejected_up_front_naming_the_field(
    synthetic_store, tmp_path, capsys, overrides, message
):
    config = write_config(tmp_path, synthetic_store)
    argv = ["train", str(config)] + [arg for o in overrides for arg in ("--set", o)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "runs").exists()


def test_a_domain_missing_from_the_store_is_named_before_anything_is_written(synthetic_store, tmp_path, capsys):
    config = write_config(tmp_path, synthetic_store)
    assert main(["train", str(config), "--set", "data.sources=[syn-related-00, Beauty]"]) == 2
    err = capsys.readouterr().err
    assert "data.sources: domain 'Beauty' is not in the store" in err
    assert not (tmp_path / "runs").exists()


def test_training_reduces_loss_and_beats_popularity_on_real_data(shared_data, tmp_path):
    from metarec_dist.data.importer import import_file
    from metarec_dist.data.store import DomainStore
    from metarec_dist.eval.full_ranking import evaluate_full_ranking

    store = DomainStore(tmp_path / "store")
    import_file(shared_data / "LastFM.txt", store)
    config = load_config(ExperimentConfig, None, [
        "method=target_only", f"data.store={store.root}", "data.target=LastFM", "model.width=32",
        "model.encoder.max_length=50", "train.steps=300", "train.batch_size=64", "train.eval_every=100",
        "train.learning_rate=0.002", f"output_dir={tmp_path / 'runs'}",
    ])
    data = load_training_data(config)
    outcome = Trainer(config, data, progress=False).run()
    history = outcome.results["history"]
    assert history[-1]["train_loss"] < 0.8 * history[0]["train_loss"]

    split = data.split
    counts = np.bincount(split.train.values[np.concatenate(
        [np.arange(s, e) for s, e in zip(split.train.starts, split.train.ends)])], minlength=3647).astype(np.float32)
    popularity = torch.from_numpy(counts)
    popular = evaluate_full_ranking(
        lambda inputs: popularity.expand(len(inputs), -1).clone(), split.test_history, split.test_item, 3646,
        config.eval, 50,
    )
    assert outcome.results["test"]["NDCG@10"] > popular["NDCG@10"]
    assert outcome.results["test"]["HR@10"] > popular["HR@10"]


def test_the_driver_checks_that_domains_exist_from_their_metadata_only(synthetic_store, tmp_path):
    import shutil

    from metarec_dist.config import load_config
    from metarec_dist.meta.config import ExperimentConfig
    from metarec_dist.meta.training_data import check_domains_present, load_training_data

    store = tmp_path / "store"
    shutil.copytree(synthetic_store.root, store)
    (store / "syn-noise-00" / "sequences.parquet").write_bytes(b"not parquet")  # its meta.json is intact
    config = load_config(ExperimentConfig, write_config(tmp_path, synthetic_store), [f"data.store={store}"])
    check_domains_present(config)  # never reads a table
    with pytest.raises(Exception, match="syn-noise-00|parquet|Parquet"):
        load_training_data(config)  # what the driver used to do for every source


def test_early_stopping_keeps_the_best_validation_and_stops_after_patience_worse_ones():
    loop = LoopState()
    metrics = [float("nan"), 0.2, 0.3, 0.25, 0.3, 0.29]
    improved = [loop.record_validation({"step": i, "valid": {"m": m}}, m, patience=3, first=i == 0)
                for i, m in enumerate(metrics[:5])]
    assert improved == [True, True, True, False, False]  # a NaN first validation still selects a model
    assert (loop.best_step, loop.best_metric, loop.stale, loop.stopped) == (2, 0.3, 2, False)  # ties do not improve
    assert not loop.record_validation({"step": 5, "valid": {"m": 0.29}}, 0.29, patience=3, first=False)
    assert loop.stopped and loop.best_valid == {"m": 0.3} and len(loop.history) == 6


def test_validation_on_a_user_sample_ranks_those_users_and_the_test_ranks_everyone(synthetic_store, tmp_path):
    config = load_config(ExperimentConfig, write_config(tmp_path, synthetic_store, method="target_only"),
                         ["eval.valid_users=50", "train.steps=4", "train.eval_every=2"])
    outcome = Trainer(config, load_training_data(config), progress=False).run()
    results = outcome.results
    assert [entry["valid"]["users"] for entry in results["history"]] == [50, 50]
    assert results["test"]["users"] == load_training_data(config).split.num_users > 50
