"""Checkpoints: a run stopped and resumed from one takes exactly the steps an unbroken run takes."""

import os

import pytest
import torch
import torch.distributed as dist
from conftest import free_port, write_config

from metarec_dist.config import load_config
from metarec_dist.distributed.checkpoint import is_complete, latest_complete, read_checkpoint, write_checkpoint
from metarec_dist.distributed.collective import TorchCollective
from metarec_dist.distributed.optimizer import WorkerOptimizer
from metarec_dist.distributed.runner import source_plan
from metarec_dist.meta.config import ExperimentConfig
from metarec_dist.meta.trainer import Trainer
from metarec_dist.meta.training_data import load_training_data


@pytest.fixture(scope="module")
def one_process_group():
    """torch.distributed with one process (gloo), as Ray Train sets it up, for DeepSpeed."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield TorchCollective()
    dist.destroy_process_group()


def build(config, collective):
    plan = source_plan(config)  # runner.workers is 1 in these configs
    data = load_training_data(config, plan.shard(0))
    trainer = Trainer(
        config, data, progress=False, collective=collective,
        make_optimizer=lambda model, lrs, cfg: WorkerOptimizer(model, lrs, cfg, data.target, collective),
    )
    return trainer, plan


@pytest.mark.parametrize("zero_stage", [None, 0, 2])
def test_resuming_from_a_checkpoint_continues_exactly_where_the_run_stopped(
    one_process_group, synthetic_store, tmp_path, zero_stage
):
    path = write_config(tmp_path, synthetic_store, train={"steps": 8, "batch_size": 16, "eval_every": 2,
                                                          "learning_rate": 0.003, "patience": 10},
                        meta={"tasks_per_step": 2, "inner_lr": 0.1, "learned_inner_lr": True,
                              "direction": "running_mean"})  # its running average is checkpointed
    config = load_config(ExperimentConfig, path, [f"runner.zero_stage={'null' if zero_stage is None else zero_stage}"])
    checkpoint = tmp_path / "checkpoint-5"

    unbroken, plan = build(config, one_process_group)

    def save_at_five(step):
        if step == 5:
            checkpoint.mkdir()
            write_checkpoint(checkpoint, unbroken, unbroken.optimizer, plan)

    expected = unbroken.run(after_step=save_at_five)
    assert is_complete(checkpoint) and latest_complete(tmp_path).path == str(checkpoint)

    resumed, plan = build(config, one_process_group)
    assert read_checkpoint(checkpoint, resumed, resumed.optimizer, plan) == 5
    got = resumed.run()

    assert got.results["test"] == expected.results["test"]
    def without_times(history):
        return [{k: v for k, v in entry.items() if k != "seconds"} for entry in history]

    assert without_times(got.results["history"]) == without_times(expected.results["history"])
    final = dict(unbroken.model.named_parameters())
    for name, value in resumed.model.named_parameters():
        assert torch.equal(value, final[name]), name
    for mine, theirs in zip(resumed.inner_lrs, unbroken.inner_lrs):
        assert torch.equal(mine, theirs)


def test_a_checkpoint_missing_a_workers_files_is_incomplete(one_process_group, synthetic_store, tmp_path):
    config = load_config(ExperimentConfig, write_config(tmp_path, synthetic_store), ["runner.zero_stage=null"])
    trainer, plan = build(config, one_process_group)
    trainer.run()
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    write_checkpoint(checkpoint, trainer, trainer.optimizer, plan)
    assert is_complete(checkpoint)
    (checkpoint / "sources" / f"{plan.shard(0)[0]}.pt").unlink()
    assert not is_complete(checkpoint) and latest_complete(tmp_path) is None
