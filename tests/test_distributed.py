"""Meta-training on real Ray Train workers (a local Ray cluster, gloo): same numbers as one process."""

import json
import os
import sys

import numpy as np
import pytest
import torch

from conftest import write_config
from metarec_dist.data.batches import NextItemBatch
from metarec_dist.meta.config import RunConfig
from metarec_dist.meta.step import MetaConfig, TaskBatch, meta_step
from metarec_dist.model.encoder import EncoderConfig
from metarec_dist.model.recommender import ModelConfig, SequenceRecommender

pytestmark = pytest.mark.slow

CATALOGS = {"t": 12, "a": 15, "b": 9, "c": 11, "d": 10}
SOURCES = ["a", "b", "c", "d"]
META = MetaConfig(tasks_per_step=2, inner_steps=2, inner_lr=0.1, temperature=0.05)
OWNER = {"a": 0, "c": 0, "b": 1, "d": 1}
LEARNING_RATE = 0.01


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray cluster for the module (starting one costs seconds)."""
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    import ray
    import ray.cloudpickle

    # Workers cannot import this test module: ship its functions by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, log_to_driver=False, include_dashboard=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


def tiny_model(catalogs):
    torch.manual_seed(0)
    config = ModelConfig(
        width=8, item_width=6, item_widths={"b": 5},
        encoder=EncoderConfig(layers=1, heads=2, max_length=5, dropout=0.0),
        vq={"num_codebooks": 2, "codewords": 6},
    )
    return SequenceRecommender(config, catalogs)


def fixed_batch(num_items, seed):
    rng = np.random.default_rng(seed)
    window = rng.integers(1, num_items + 1, (4, 6))
    window[0, :3] = 0
    inputs, targets = window[:, :-1], window[:, 1:].copy()
    targets[inputs == 0] = 0
    return NextItemBatch(inputs, targets)


def task(source):
    index = SOURCES.index(source)
    return TaskBatch(source, support=fixed_batch(CATALOGS[source], 10 + index), query=fixed_batch(12, 20 + index))


def run_config(zero_stage):
    return RunConfig(data={"target": "t", "sources": SOURCES}, train={"learning_rate": LEARNING_RATE},
                     runner={"zero_stage": zero_stage})


def run_meta_steps(model, tasks, collective, optimizer, steps=3):
    logs = [meta_step(model, optimizer, "t", tasks, META, collective=collective) for _ in range(steps)]
    return logs, {name: p.detach().clone() for name, p in model.named_parameters()}


def meta_step_worker(loop_config):
    """A Ray Train worker: its own sources only, the torch.distributed collective, the worker optimizer."""
    from metarec_dist.dist.collective import TorchCollective
    from metarec_dist.dist.optimizer import WorkerOptimizer

    collective = TorchCollective()
    own = [s for s in SOURCES if OWNER[s] == collective.rank]
    model = tiny_model({"t": CATALOGS["t"], **{s: CATALOGS[s] for s in own}})
    optimizer = WorkerOptimizer(model, [], run_config(loop_config["zero_stage"]), "t", collective)
    logs, parameters = run_meta_steps(model, [task(s) for s in own], collective, optimizer)
    torch.save(
        {
            "parameters": parameters,
            "weights": [dict(zip(log.sources, log.weights)) for log in logs],
            "codebook_state": optimizer.optimizer_state_numel()["codebook"],
            "deepspeed": optimizer.engine is not None,
        },
        os.path.join(loop_config["out"], f"rank{collective.rank}.pt"),
    )


@pytest.mark.parametrize("zero_stage", [None, 0, 2])
def test_two_ray_workers_take_the_same_meta_steps_as_one_process(ray_cluster, tmp_path, zero_stage):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    # One process, every task (in the workers' global order: rank 0's tasks, then rank 1's).
    from metarec_dist.meta.step import LOCAL

    order = [s for rank in (0, 1) for s in SOURCES if OWNER[s] == rank]
    model = tiny_model(CATALOGS)
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    logs, expected = run_meta_steps(model, [task(s) for s in order], LOCAL, optimizer)
    expected_weights = [dict(zip(log.sources, log.weights)) for log in logs]

    TorchTrainer(
        meta_step_worker,
        train_loop_config={"out": str(tmp_path), "zero_stage": zero_stage},
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
        torch_config=TorchConfig(backend="gloo", timeout_s=120),
        run_config=RunConfig(storage_path=str(tmp_path / "ray")),
    ).fit()

    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for step_weights, want in zip(got["weights"], expected_weights):
            assert step_weights.keys() == want.keys()
            assert all(abs(step_weights[s] - want[s]) < 1e-5 for s in want)
        own = [s for s in SOURCES if OWNER[s] == rank]
        for name, value in got["parameters"].items():
            assert torch.allclose(value, expected[name], atol=1e-5, rtol=0), name
        # A worker holds theta, the target's parameters and its own sources' only, and the
        # optimizer state of one of the two codebooks.
        held = {name.split(".")[1] for name in got["parameters"] if name.startswith("domains.")}
        assert held == {"t", *own}
        assert got["codebook_state"] == 2 * 6 * 4  # Adam's two moments of 1 codebook x 6 codewords x width 4
        assert got["deepspeed"] == (zero_stage is not None)
    # The weights are not trivially uniform: the test can see a wrong global softmax.
    assert max(expected_weights[0].values()) - min(expected_weights[0].values()) > 1e-3


def test_train_command_runs_on_two_workers_and_writes_results(ray_cluster, synthetic_store, tmp_path, capsys):
    from metarec_dist.cli import main
    config = write_config(tmp_path, synthetic_store, runner={"workers": 2})
    assert main(["train", str(config)]) == 0
    results_path = capsys.readouterr().out.strip().splitlines()[-1].removeprefix("results: ")
    results = json.loads(open(results_path).read())
    assert results["workers"] == 2
    owners = results["plan"]["owner"]
    assert sorted(owners) == sorted(results["sources"]) and set(owners.values()) == {0, 1}
    # The similarity softmax ran over every worker's tasks.
    assert set(results["source_weights"]["final"]) == set(results["sources"])
    assert 0 <= results["test"]["NDCG@10"] <= 1 and results["steps_run"] == 6


def test_more_workers_than_source_domains_fails_before_starting(ray_cluster, synthetic_store, tmp_path, capsys):
    from metarec_dist.cli import main
    config = write_config(tmp_path, synthetic_store, runner={"workers": 5})
    assert main(["train", str(config)]) == 2
    assert "runner.workers" in capsys.readouterr().err
