import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml

from metarec_dist.data.batches import NextItemBatch
from metarec_dist.data.store import DomainStore
from metarec_dist.data.synthetic import SyntheticConfig, generate_store

REPO_ROOT = Path(__file__).resolve().parents[1]
# The real data sets live beside the repository (../shared/data), never inside it.
SHARED_DATA = Path(os.environ.get("METAREC_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
# KubeRay's CRDs (ray.io_rayjobs.yaml, ray.io_rayclusters.yaml), test data beside the repository too.
KUBERAY_CRDS = Path(os.environ.get("METAREC_KUBERAY_CRDS", REPO_ROOT.parent / "shared" / "schemas" / "kuberay"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "Beauty.txt").is_file():
        pytest.fail(f"real data not found at {SHARED_DATA}; set METAREC_SHARED_DATA to the shared/data folder")
    return SHARED_DATA


@pytest.fixture(scope="session")
def kuberay_crds() -> Path:
    if not (KUBERAY_CRDS / "ray.io_rayjobs.yaml").is_file():
        pytest.fail(f"KubeRay CRDs not found at {KUBERAY_CRDS}; set METAREC_KUBERAY_CRDS to the schemas/kuberay folder")
    return KUBERAY_CRDS


@pytest.fixture
def store(tmp_path) -> DomainStore:
    return DomainStore(tmp_path / "store")


# Small synthetic domains and a tiny run config for end-to-end training tests.
SOURCES = ["syn-related-00", "syn-unrelated-00", "syn-noise-00"]


@pytest.fixture(scope="session")
def synthetic_store(tmp_path_factory):
    from metarec_dist.data.store import DomainStore

    store = DomainStore(tmp_path_factory.mktemp("synthetic") / "store")
    generate_store(
        SyntheticConfig(related_sources=1, unrelated_sources=1, noise_sources=1, target_users=300,
                        target_items=200, source_users=(200, 300), source_items=(100, 200)),
        store,
    )
    return store


def write_config(tmp_path, store, **overrides):
    config = {
        "method": "metarec",
        "data": {"store": str(store.root), "target": "syn-target", "sources": SOURCES,
                 "limited_target_fraction": 0.5},
        "model": {"width": 16, "item_width": 8, "vq": {"num_codebooks": 2, "codewords": 8},
                  "encoder": {"layers": 1, "heads": 2, "max_length": 10, "dropout": 0.0}},
        "meta": {"tasks_per_step": 2, "inner_lr": 0.1},
        "train": {"steps": 6, "batch_size": 16, "eval_every": 3, "learning_rate": 0.003},
        "runner": {"workers": 1},  # in this process; tests/test_distributed.py runs Ray workers
        "output_dir": str(tmp_path / "runs"),
    }
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        if name:
            config[section][name] = value
        else:
            config[section] = value
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def random_batch(num_items: int, seed: int, rows: int = 3, leading_padding: int = 2) -> NextItemBatch:
    """A seeded next-item batch of 5 positions; the first row starts with padding."""
    rng = np.random.default_rng(seed)
    window = rng.integers(1, num_items + 1, (rows, 6))
    window[0, :leading_padding] = 0
    inputs, targets = window[:, :-1], window[:, 1:].copy()
    targets[inputs == 0] = 0
    return NextItemBatch(inputs, targets)


def tensorboard_scalars(directory) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the TensorBoard event files under ``directory``: tag -> [(step, value)].

    Reads the TFRecord framing (length, its CRC, the Event, its CRC) directly,
    so the test does not depend on TensorBoard itself.
    """
    import struct
    from collections import defaultdict
    from pathlib import Path

    from tensorboardX.proto.event_pb2 import Event

    scalars: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for path in sorted(Path(directory).glob("events.out.tfevents.*")):
        data, offset = path.read_bytes(), 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            event = Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                scalars[value.tag].append((event.step, value.simple_value))
    return dict(scalars)


def assert_tensorboard_matches_results(run_dir):
    """The event files hold what results.json holds: losses, validation metrics, source weights."""
    results = json.loads((run_dir / "results.json").read_text())
    scalars = tensorboard_scalars(run_dir / "tensorboard")
    assert [step for step, _ in scalars["train/loss"]] == list(range(1, results["steps_run"] + 1))
    for entry in results["history"]:  # at a validation the loss is the mean since the previous one
        assert (entry["step"], pytest.approx(entry["train_loss"])) in scalars["train/loss"]
    validations = [(entry["step"], pytest.approx(entry["valid"]["NDCG@10"])) for entry in results["history"]]
    assert scalars["valid/NDCG_10"] == validations
    logged = {tag.removeprefix("source_weight/") for tag in scalars if tag.startswith("source_weight/")}
    assert logged == set(results["source_weights"]["final"])
    for entry in results["source_weights"]["history"]:
        for source, weight in zip(entry["sources"], entry["weights"]):
            assert (entry["step"], pytest.approx(weight * len(entry["sources"]))) in scalars[f"source_weight/{source}"]
    assert all(rate > 0 for _, rate in scalars["speed/steps_per_s"])


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _in_process_group(rank: int, work, port: int, out: str, backend: str) -> None:
    import torch
    import torch.distributed as dist

    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        work(rank, out)
    finally:
        dist.destroy_process_group()


def in_two_processes(work, out, backend: str = "gloo") -> None:
    """``work(rank, out)`` in two real processes joined by a process group (no Ray); ``backend``
    "nccl" puts rank r on GPU r."""
    import torch.multiprocessing as mp

    mp.spawn(_in_process_group, args=(work, free_port(), str(out), backend), nprocs=2)
