"""Meta-training on real Ray Train workers (a local Ray cluster, gloo): same numbers as one process."""

import contextlib
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_tensorboard_matches_results, random_batch, write_config

from metarec_dist.meta.config import ExperimentConfig
from metarec_dist.meta.row_sparse_adam import RowSparseAdam
from metarec_dist.meta.step import WHOLE_TARGET_TABLE, MetaConfig, RunningDirection, TaskBatch, meta_step
from metarec_dist.meta.step_codes import step_codebook_for
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
    # Tearing down a group with a frozen worker waits this long for its process group (30 s by default).
    os.environ.setdefault("TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S", "5")
    import ray
    import ray.cloudpickle

    # Workers cannot import this test module: ship its functions by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.cloudpickle.register_pickle_by_value(sys.modules["conftest"])
    ray.init(num_cpus=2, log_to_driver=False, include_dashboard=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


# How item tables train: "dense" (the full softmax); "row_sparse" (the sampled softmax with every
# item as a candidate, deterministic: gradients travel between workers as (row ids, rows));
# "split" (also the target's table split by rows over the workers; its 40 items are more than
# the 15 negatives, which the tasks fix, so a step reads some rows only).
SAMPLED = {"dense": {}, "row_sparse": {"loss": "sampled", "sampled_negatives": 100},
           "split": {"loss": "sampled", "sampled_negatives": 15}}
TARGET_ITEMS = {"dense": 12, "row_sparse": 12, "split": 40}
QUERY_NEGATIVES = {"dense": None, "row_sparse": torch.arange(1, 13), "split": torch.tensor([3, 17, 29, 38, 39])}


def tiny_model(catalogs, tables="dense", codes="live"):
    torch.manual_seed(0)
    config = ModelConfig(
        width=8, item_width=6, item_widths={"b": 5},
        encoder=EncoderConfig(layers=1, heads=2, max_length=5, dropout=0.0),
        vq={"num_codebooks": 2, "codewords": 6, "codes": codes}, **SAMPLED[tables],
    )
    return SequenceRecommender(config, catalogs)


def fixed_batch(num_items, seed):
    return random_batch(num_items, seed, rows=4, leading_padding=3)


def task(source, tables="dense"):
    index = SOURCES.index(source)
    return TaskBatch(source, support=fixed_batch(CATALOGS[source], 10 + index), query=fixed_batch(12, 20 + index),
                     query_negatives=QUERY_NEGATIVES[tables])


def run_config(zero_stage, **runner):
    return ExperimentConfig(data={"target": "t", "sources": SOURCES}, train={"learning_rate": LEARNING_RATE},
                     runner={"zero_stage": zero_stage, **runner})


def worker_with_own_sources(tables="dense", codes="live"):
    """In a Ray Train worker: its collective, its own sources and a model holding only those."""
    from metarec_dist.distributed.collective import TorchCollective

    collective = TorchCollective()
    own = [s for s in SOURCES if OWNER[s] == collective.rank]
    return collective, own, tiny_model({"t": TARGET_ITEMS[tables], **{s: CATALOGS[s] for s in own}}, tables, codes)


def step_codebook_of(model, optimizer):
    """Where a step's codes come from, as the trainer chooses: the optimizer's, else this process's."""
    return getattr(optimizer, "step_codebook", None) or step_codebook_for(model)


def run_meta_steps(model, tasks, collective, optimizer, meta, steps=3):
    """``steps`` meta-steps, each loading the target's rows its queries read and its codes (where
    found per step) first, as the trainer does."""
    target_rows = getattr(optimizer, "target_rows", WHOLE_TARGET_TABLE)
    codebook = step_codebook_of(model, optimizer)
    direction = RunningDirection(meta.direction_decay)
    logs = []
    for _ in range(steps):
        reads = [model.rows_read("t", torch.as_tensor(t.query.inputs), torch.as_tensor(t.query.targets),
                                 t.query_negatives) for t in tasks]
        if all(rows is not None for rows in reads):
            target_rows.load(torch.unique(torch.cat(reads)))
        codebook.load(model, [(domain, torch.as_tensor(batch.inputs)) for t in tasks
                              for domain, batch in ((t.source, t.support), ("t", t.query))])
        logs.append(meta_step(model, optimizer, "t", tasks, meta, collective=collective, direction=direction))
        model.quantizer.step_codes = None
    return logs


def parameters_of(model, optimizer):
    """Every parameter's value (a table split over workers, a sharded codebook assembled: a collective)."""
    with getattr(optimizer, "target_rows", WHOLE_TARGET_TABLE).whole(), step_codebook_of(model, optimizer).whole():
        return {name: p.detach().clone() for name, p in model.named_parameters()}


@contextlib.contextmanager
def counted_all_reduces():
    """Every torch.distributed.all_reduce in the block (DeepSpeed's included), as a growing list."""
    import torch.distributed as dist

    calls, real = [], dist.all_reduce

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    dist.all_reduce = counted
    try:
        yield calls
    finally:
        dist.all_reduce = real


def meta_step_worker(loop_config):
    """A Ray Train worker: its own sources only, the torch.distributed collective, the worker optimizer."""
    from metarec_dist.distributed.optimizer import WorkerOptimizer

    tables, sharded = loop_config["tables"], loop_config["codebook"] == "sharded"
    collective, own, model = worker_with_own_sources(tables, "per_step" if sharded else "live")
    split = {"shard_target_rows_from": 1 if tables == "split" else None, "shard_codebook_from": 2 if sharded else None}
    optimizer = WorkerOptimizer(model, [], run_config(loop_config["zero_stage"], **split), "t", collective)
    meta = META.model_copy(update=loop_config["meta"])
    with counted_all_reduces() as all_reduces:
        logs = run_meta_steps(model, [task(s, tables) for s in own], collective, optimizer, meta)
    codewords_held = model.quantizer.codebooks.numel()  # between steps
    parameters = parameters_of(model, optimizer)
    torch.save(
        {
            "parameters": parameters,
            "weights": [dict(zip(log.sources, log.weights)) for log in logs],
            "codebook_state": optimizer.optimizer_state_numel()["codebook"],
            "codewords_held": codewords_held,
            "target_table_block": optimizer.optimizer_state_numel()["target_table_block"],
            "deepspeed": optimizer.engine is not None,
            "all_reduces_per_step": len(all_reduces) / len(logs),
        },
        os.path.join(loop_config["out"], f"rank{collective.rank}.pt"),
    )


def _without_key_part(qkv_bias: torch.Tensor) -> torch.Tensor:
    query, _, value = qkv_bias.chunk(3)
    return torch.cat([query, value])


# Centering and the running-mean direction: task means summed over workers.
AVERAGED_OVER_TASKS = {"center": True, "direction": "running_mean"}


# "sharded": the codebook searched where it lives, against one process finding the same per-step codes.
@pytest.mark.parametrize(("zero_stage", "meta", "tables", "codebook"),
                         [(None, {}, "dense", "replica"), (0, {}, "dense", "replica"),
                          (2, AVERAGED_OVER_TASKS, "dense", "replica"), (0, {}, "row_sparse", "replica"),
                          (0, {}, "split", "replica"), (0, {}, "row_sparse", "sharded")])
def test_two_ray_workers_take_the_same_meta_steps_as_one_process(ray_cluster, tmp_path, zero_stage, meta, tables,
                                                                 codebook):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    # One process, every task (in the workers' global order: rank 0's tasks, then rank 1's).
    from metarec_dist.meta.step import LOCAL

    order = [s for rank in (0, 1) for s in SOURCES if OWNER[s] == rank]
    model = tiny_model({**CATALOGS, "t": TARGET_ITEMS[tables]}, tables, "per_step" if codebook == "sharded" else "live")
    assert bool(model.row_sparse_names()) == (tables != "dense")
    optimizer = RowSparseAdam(model.parameters(), lr=LEARNING_RATE)
    logs = run_meta_steps(model, [task(s, tables) for s in order], LOCAL, optimizer, META.model_copy(update=meta))
    expected = parameters_of(model, optimizer)
    expected_weights = [dict(zip(log.sources, log.weights)) for log in logs]

    TorchTrainer(
        meta_step_worker,
        train_loop_config={"out": str(tmp_path), "zero_stage": zero_stage, "meta": meta, "tables": tables,
                           "codebook": codebook},
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
            want = expected[name]
            if name.endswith("attention.qkv.bias"):
                # Not the key bias: softmax is shift-invariant, so its gradient is zero but for
                # rounding, and Adam scales that noise up to steps of the learning rate's order.
                value, want = _without_key_part(value), _without_key_part(want)
            assert torch.allclose(value, want, atol=1e-5, rtol=0), name
        # A worker holds theta, the target's parameters and its own sources' only, and the
        # optimizer state of one of the two codebooks.
        held = {name.split(".")[1] for name in got["parameters"] if name.startswith("domains.")}
        assert held == {"t", *own}
        assert got["codebook_state"] == 2 * 6 * 4  # Adam's two moments of 1 codebook x 6 codewords x width 4
        # Searched where it lives, the codebook's values are held by its owner alone between steps.
        assert got["codewords_held"] == (0 if codebook == "sharded" else 2 * 6 * 4)
        # Split: the target's 41 rows (padding included) in blocks of 20 and 21, each with its two moments.
        assert got["target_table_block"] == (3 * 6 * (20 if rank == 0 else 21) if tables == "split" else 0)
        assert got["deepspeed"] == (zero_stage is not None)
        if zero_stage in (None, 0):
            # The summed gradients and the codebook's owners, nothing more: a stage-0 engine applies
            # the encoder's sum without reducing it again. A sharded codebook's gradients go to
            # their owners in a gather.
            assert got["all_reduces_per_step"] == (1 if codebook == "sharded" else 2)
    # The weights are not trivially uniform: the test can see a wrong global softmax.
    assert max(expected_weights[0].values()) - min(expected_weights[0].values()) > 1e-3


def deepspeed_group_worker(loop_config):
    """Rank 0 all-reduces on DeepSpeed's data-parallel group; rank 1 never joins."""
    import time

    import torch.distributed as dist
    from deepspeed.utils import groups

    from metarec_dist.distributed.optimizer import WorkerOptimizer

    collective, _, model = worker_with_own_sources()
    WorkerOptimizer(model, [], run_config(2, collective_timeout_s=10), "t", collective)  # builds the engine
    if collective.rank == 1:
        time.sleep(25)  # past rank 0's 10 s timeout, well short of torch's 30 minutes
        return
    start = time.monotonic()
    try:
        dist.all_reduce(torch.ones(1), group=groups._get_data_parallel_group())
        outcome = "completed"
    except RuntimeError:
        outcome = "timed out"
    Path(loop_config["out"], "outcome.json").write_text(
        json.dumps({"outcome": outcome, "seconds": time.monotonic() - start}))


def test_deepspeed_collectives_time_out_after_the_runs_collective_timeout(ray_cluster, tmp_path):
    """DeepSpeed's own copy of the world group would wait torch's default 30 minutes."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    TorchTrainer(
        deepspeed_group_worker,
        train_loop_config={"out": str(tmp_path)},
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
        torch_config=TorchConfig(backend="gloo", timeout_s=120),
        run_config=RunConfig(storage_path=str(tmp_path / "ray")),
    ).fit()
    result = json.loads((tmp_path / "outcome.json").read_text())
    assert result["outcome"] == "timed out"
    assert 9 < result["seconds"] < 25, result


# "split": the large-catalog layout, the target's table split by rows and the codebook searched where it lives.
@pytest.mark.parametrize("target_table", ["whole", "split"])
def test_train_command_runs_on_two_workers_and_writes_results(ray_cluster, synthetic_store, tmp_path, capsys,
                                                              target_table):
    from metarec_dist.cli import main
    split = {"model.loss": "sampled", "model.sampled_negatives": 50} if target_table == "split" else {}
    config = write_config(tmp_path, synthetic_store, **{"train.tensorboard": True}, **split,
                          runner={"workers": 2, "shard_target_rows_from": 1 if split else None,
                                  "shard_codebook_from": 2 if split else None})
    assert main(["train", str(config)]) == 0
    results_path = capsys.readouterr().out.strip().splitlines()[-1].removeprefix("results: ")
    results = json.loads(open(results_path).read())
    # The driver logs the leader's progress records, as the single-process run does.
    assert_tensorboard_matches_results(Path(results_path).parent)
    assert results["workers"] == 2
    owners = results["plan"]["owner"]
    assert sorted(owners) == sorted(results["sources"]) and set(owners.values()) == {0, 1}
    # The similarity softmax ran over every worker's tasks.
    assert set(results["source_weights"]["final"]) == set(results["sources"])
    assert 0 <= results["test"]["NDCG@10"] <= 1 and results["steps_run"] == 6
    # Each worker holds the shared parameters and the target's, and only its own sources' tables.
    per_worker = results["per_worker"]
    assert [w["sources"] for w in per_worker] == [len([s for s in owners.values() if s == r]) for r in (0, 1)]
    assert per_worker[0]["parameters"]["shared"] == per_worker[1]["parameters"]["shared"]
    total_sources = sum(w["parameters"]["sources"] for w in per_worker)
    assert all(0 < w["parameters"]["sources"] < total_sources for w in per_worker)
    # Split: each worker owns one block of the target's rows, the blocks the whole table.
    rows = synthetic_store.open("syn-target").num_items + 1
    blocks = [w["target_table_block"] for w in per_worker]
    assert blocks == ([[0, rows // 2], [rows // 2, rows]] if split else [None, None])
    # The codebook plan: worker r owns codebooks r, r + 2, ... (the config's 2 codebooks: one each).
    assert [w["codebooks_owned"] for w in per_worker] == [[0], [1]]
    # Searched where it lives, no codeword is held outside its owner's shard between steps.
    codebook_values = 2 * 8 * 8  # 2 codebooks x 8 codewords x width 8
    assert [w["codewords_held"] for w in per_worker] == ([0, 0] if split else [codebook_values] * 2)
    # Where each worker's meta-step time went: parts of the whole, the DeepSpeed engine timed.
    for times in (w["main_step_ms"] for w in per_worker):
        assert 0 < times["in_collectives"] < times["total"] and 0 < times["in_encoder_engine"] < times["total"]


def test_more_workers_than_source_domains_fails_before_starting(ray_cluster, synthetic_store, tmp_path, capsys):
    from metarec_dist.cli import main
    config = write_config(tmp_path, synthetic_store, runner={"workers": 5})
    assert main(["train", str(config)]) == 2
    assert "runner.workers" in capsys.readouterr().err


# --- faults: a killed worker, a stopped run ------------------------------------------------


def kill_one_worker_after_a_checkpoint(storage, deadline_s=240, sig=None):
    """In the background: once a complete checkpoint exists under ``storage``, send one Ray Train
    worker ``sig`` (default SIGKILL; SIGSTOP freezes it)."""
    import signal
    import threading
    import time

    import psutil

    from metarec_dist.distributed.checkpoint import latest_complete

    killed = []

    def watch():
        end = time.monotonic() + deadline_s
        while time.monotonic() < end and not killed:
            if storage.is_dir() and latest_complete(storage) is not None:
                for process in psutil.process_iter(["pid", "cmdline"]):
                    if "RayTrainWorker" in " ".join(process.info["cmdline"] or []):
                        os.kill(process.info["pid"], sig or signal.SIGKILL)
                        killed.append(process.info["pid"])
                        return
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread, killed


LONG_RUN = {"steps": 120, "batch_size": 16, "eval_every": 40, "learning_rate": 0.003, "patience": 10}


def test_a_killed_worker_is_replaced_and_the_run_ends_as_an_unbroken_one(
    ray_cluster, synthetic_store, tmp_path, capsys
):
    from metarec_dist.cli import main

    def run(name, kill):
        base = tmp_path / name
        base.mkdir()
        config = write_config(base, synthetic_store, train=LONG_RUN,
                              runner={"workers": 2, "checkpoint_every": 30, "max_failures": 2, "zero_stage": 2})
        watcher, killed = (kill_one_worker_after_a_checkpoint(base / "runs") if kill else (None, []))
        assert main(["train", str(config)]) == 0
        if watcher:
            watcher.join(timeout=1)
        (run_dir,) = (base / "runs").iterdir()
        return json.loads((run_dir / "results.json").read_text()), killed

    unbroken, _ = run("unbroken", kill=False)
    recovered, killed = run("killed", kill=True)
    assert killed, "no worker was killed: the test did not exercise recovery"
    assert recovered["steps_run"] == unbroken["steps_run"] == LONG_RUN["steps"]
    # Restored parameters, optimizer moments and random streams: the same numbers, up to summation order.
    assert recovered["test"]["NDCG@10"] == pytest.approx(unbroken["test"]["NDCG@10"], abs=1e-3)


def test_a_frozen_worker_stops_the_run_naming_a_worker(ray_cluster, synthetic_store, tmp_path, capsys):
    """SIGSTOP one worker: the run stops, and the error names a worker and what Ray saw.

    Two detectors race: the other worker's collective times out (the error then
    names the meta-step), or Ray's keepalive loses the frozen actor first.
    """
    import re
    import signal

    from metarec_dist.cli import main

    config = write_config(tmp_path, synthetic_store, train=LONG_RUN, runner={
        "workers": 2, "checkpoint_every": 30, "max_failures": 0, "collective_timeout_s": 15})
    watcher, frozen = kill_one_worker_after_a_checkpoint(tmp_path / "runs", sig=signal.SIGSTOP)
    try:
        code = main(["train", str(config)])
    finally:
        watcher.join(timeout=1)
        for pid in frozen:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
    assert frozen, "no worker was frozen: the test did not exercise a stall"
    err = capsys.readouterr().err
    assert code == 2
    assert re.search(r"error: worker [01] (stalled at meta-step \d+: a collective waited 15 s"
                     r"|stopped responding \(its process froze, died or ran out of memory\))", err), err


class _RunFailed(Exception):
    """The shape of Ray Train's TrainingFailedError that the runner reads: failures by rank."""

    def __init__(self, worker_failures):
        super().__init__("Training failed")
        self.worker_failures = worker_failures


def test_a_stalled_collective_is_reported_before_a_worker_ray_lost():
    from metarec_dist.distributed.runner import _user_error

    storage = Path("/storage")
    lost = RuntimeError("The actor 91f5 is unavailable: RpcError: keepalive watchdog timeout")
    stalled = RuntimeError("Traceback ...\nRuntimeError: worker 1 stalled at meta-step 37: a collective waited 15 s")
    assert str(_user_error(_RunFailed({0: lost, 1: stalled}), storage)).startswith("worker 1 stalled at meta-step 37")
    only_lost = str(_user_error(_RunFailed({0: lost}), storage))
    assert only_lost.startswith("worker 0 stopped responding") and "keepalive watchdog timeout" in only_lost
    assert str(_user_error(_RunFailed({1: ValueError("boom")}), storage)) == "worker 1 failed: boom"


def test_a_stopped_run_resumes_on_another_number_of_workers(ray_cluster, synthetic_store, tmp_path, capsys):
    from metarec_dist.cli import main

    # The target's table split by rows over the two workers, the codebook searched where it lives;
    # both whole in the one that resumes.
    config = write_config(tmp_path, synthetic_store, train=LONG_RUN, **{"model.loss": "sampled",
                                                                        "model.sampled_negatives": 50},
                          runner={"workers": 2, "checkpoint_every": 30, "max_failures": 0, "zero_stage": 2,
                                  "shard_target_rows_from": 1, "shard_codebook_from": 2})
    watcher, killed = kill_one_worker_after_a_checkpoint(tmp_path / "runs")
    assert main(["train", str(config)]) == 2  # no retries allowed: the run stops
    watcher.join(timeout=1)
    assert killed
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert not (run_dir / "results.json").exists()
    checkpoint = sorted(run_dir.rglob("shared.pt"))[-1]
    table = "domains.syn-target.embedding.weight"
    saved = torch.load(checkpoint, weights_only=True)
    moments = torch.load(checkpoint.parent / "shared_optimizer.pt", weights_only=True)
    rows = synthetic_store.open("syn-target").num_items + 1
    assert saved[table].shape == moments[f"{table}/exp_avg"].shape == (rows, 8)  # whole, from both blocks
    codebook = "quantizer.codebooks"
    assert saved[codebook].shape == moments[f"{codebook}/exp_avg"].shape == (2, 8, 8)  # from both owners
    capsys.readouterr()

    assert main(["train", "--resume", str(run_dir), "--set", "runner.workers=1"]) == 0
    results = json.loads((run_dir / "results.json").read_text())
    assert results["workers"] == 1 and results["steps_run"] == LONG_RUN["steps"]
    assert set(results["source_weights"]["final"]) == set(results["sources"])
    state = torch.load(run_dir / "model.pt", weights_only=True)  # consolidated: no DeepSpeed, no Ray
    assert "quantizer.codebooks" in state and any(name.startswith("domains.syn-target.") for name in state)

    assert main(["train", "--resume", str(run_dir)]) == 2  # finished runs are never resumed over


def test_more_workers_than_the_cluster_has_cpus_fails_with_the_numbers(ray_cluster, synthetic_store, tmp_path, capsys):
    from metarec_dist.cli import main

    config = write_config(tmp_path, synthetic_store, runner={"workers": 3})
    assert main(["train", str(config)]) == 2
    error = capsys.readouterr().err
    assert "runner.workers" in error and "the Ray cluster has 2" in error


def test_a_non_finite_loss_stops_every_worker_with_the_step_and_domain(ray_cluster, synthetic_store, tmp_path, capsys):
    from metarec_dist.cli import main

    config = write_config(tmp_path, synthetic_store, runner={"workers": 2, "max_failures": 2},
                          meta={"tasks_per_step": 2, "inner_lr": 1e30})  # fast weights overflow at once
    assert main(["train", str(config)]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: step 1:") and "syn-target" in error and "Traceback" not in error


def test_two_hundred_fifty_six_source_domains_train_on_two_workers(ray_cluster, tmp_path, capsys):
    from metarec_dist.cli import main
    from metarec_dist.data.store import DomainStore
    from metarec_dist.data.synthetic import SyntheticConfig, generate_store

    store = DomainStore(tmp_path / "store")
    generated = generate_store(SyntheticConfig(related_sources=256, unrelated_sources=0, noise_sources=0,
                                               target_users=300, target_items=200, source_users=(30, 60),
                                               source_items=(30, 60)), store)
    sources = [g.name for g in generated if g.kind != "target"]
    config = write_config(tmp_path, store, runner={"workers": 2}, data={
        "store": str(store.root), "target": "syn-target", "sources": sources, "limited_target_fraction": 0.5})
    assert main(["train", str(config)]) == 0
    results_path = capsys.readouterr().out.strip().splitlines()[-1].removeprefix("results: ")
    results = json.loads(open(results_path).read())
    assert [w["sources"] for w in results["per_worker"]] == [128, 128]
    assert results["steps_run"] == 6


def sharded_ranks_worker(loop_config):
    """A Ray Train worker: ranks users rank::world of the store's target, gathers every worker's ranks."""
    import numpy as np

    from metarec_dist.data.splits import leave_one_out
    from metarec_dist.data.store import DomainStore
    from metarec_dist.distributed.collective import TorchCollective
    from metarec_dist.eval.full_ranking import EvalConfig
    from metarec_dist.meta.evaluation import rank_users

    collective = TorchCollective()
    domain = DomainStore(loop_config["store"]).open("syn-target")
    model = tiny_model({"syn-target": domain.num_items}).eval()
    split = leave_one_out(domain.sequences)
    users = list(range(split.num_users))[collective.rank :: collective.world_size]
    ranks = rank_users(model, "syn-target", split, "test", EvalConfig(), 5, np.array(users))
    gathered = collective.all_gather_object((users, ranks.tolist()))
    if collective.rank == 0:
        merged = dict(pair for shard_users, shard_ranks in gathered for pair in zip(shard_users, shard_ranks))
        with open(os.path.join(loop_config["out"], "ranks.json"), "w") as handle:
            json.dump([merged[user] for user in range(split.num_users)], handle)


def test_evaluation_sharded_over_two_ray_workers_equals_one_process(ray_cluster, synthetic_store, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from metarec_dist.data.splits import leave_one_out
    from metarec_dist.eval.full_ranking import EvalConfig
    from metarec_dist.meta.evaluation import rank_users

    domain = synthetic_store.open("syn-target")
    model = tiny_model({"syn-target": domain.num_items}).eval()
    whole = rank_users(model, "syn-target", leave_one_out(domain.sequences), "test", EvalConfig(), 5)
    TorchTrainer(
        sharded_ranks_worker,
        train_loop_config={"out": str(tmp_path), "store": str(synthetic_store.root)},
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
        torch_config=TorchConfig(backend="gloo", timeout_s=120),
        run_config=RunConfig(storage_path=str(tmp_path / "ray")),
    ).fit()
    merged = json.loads((tmp_path / "ranks.json").read_text())
    assert merged == whole.tolist()
    assert len(set(merged)) > 5  # the model ranks users differently: a mix-up would show
