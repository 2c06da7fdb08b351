"""Training on a real two-node Ray cluster: a head and a second node (`ray start`) on this machine.

Each node offers one CPU, so the two workers land one per node. The run must
equal the same run on one node, and losing the second node's raylet mid-run
must not lose the run: the checkpoint in storage survives, and once a
replacement node joins (as an autoscaler would provide) the workers restart from it.
"""

import json
import secrets
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
from conftest import write_config
from ray_nodes import VENV_BIN, free_port, start_node, stop_node, token_env

from metarec_dist.distributed.checkpoint import latest_complete

pytestmark = pytest.mark.slow

RUN_TIMEOUT_S = 400


@dataclass
class TwoNodes:
    address: str
    dashboard: str
    env: dict[str, str]
    token_path: Path
    nodes: list[subprocess.Popen] = field(default_factory=list)
    temp_dirs: list[str] = field(default_factory=list)

    def add_node(self, log: Path) -> subprocess.Popen:
        """A node of one CPU joining the head; waits until the cluster counts it."""
        temp_dir = tempfile.mkdtemp(prefix="ray-n-")  # short: Ray's socket paths must fit in 107 bytes
        known = set(self.alive_nodes())
        node = start_node([f"--address={self.address}", "--num-cpus=1"], self.env, temp_dir, log)
        self.nodes.append(node)
        self.temp_dirs.append(temp_dir)
        self.wait_until(lambda: set(self.alive_nodes()) - known, node, log)
        return node

    def alive_nodes(self) -> list[str]:
        return self._ask("ray.init(address='auto', logging_level='ERROR'); "
                         "answer = [n['NodeID'] for n in ray.nodes() if n['Alive']]") or []

    @staticmethod
    def wait_until(joined, node: subprocess.Popen, log: Path) -> None:
        deadline = time.monotonic() + 60
        while not joined():
            assert node.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"the node did not join in 60 s:\n{log.read_text()}"
            time.sleep(1)

    def worker_nodes(self) -> list[str]:
        """The node of every Ray Train worker actor this cluster ran, living or dead."""
        return self._ask(
            "from ray.util.state import list_actors; "
            f"answer = [a.node_id for a in list_actors(address='{self.dashboard}', "
            "filters=[('class_name', '=', 'RayTrainWorker')], detail=True, limit=1000)]"
        )

    def _ask(self, script: str):
        """``answer`` of ``script``, run in a fresh Python with the cluster's address and token."""
        program = f"import json, ray; {script}; print(json.dumps(answer))"
        done = subprocess.run([str(VENV_BIN / "python"), "-c", program],
                              env={**self.env, "RAY_ADDRESS": self.address}, capture_output=True, text=True,
                              timeout=60, check=False)
        return json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else None


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """One cluster for the module (starting nodes is slow); the test that loses a node comes last."""
    tmp_path = tmp_path_factory.mktemp("cluster")
    token_path = tmp_path / "auth_token"
    token_path.write_text(secrets.token_hex(32))
    token_path.chmod(0o600)
    env = token_env(token_path)
    head_temp = tempfile.mkdtemp(prefix="ray-h-")
    port, dashboard_port = free_port(), free_port()
    head = start_node(["--head", f"--port={port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
                       f"--ray-client-server-port={free_port()}", "--num-cpus=1"], env, head_temp,
                      tmp_path / "head.log")
    cluster = TwoNodes(f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard_port}", env, token_path, [head],
                       [head_temp])
    try:
        cluster.wait_until(cluster.alive_nodes, head, tmp_path / "head.log")
        cluster.add_node(tmp_path / "second.log")
        yield cluster
    finally:
        for node in reversed(cluster.nodes):
            stop_node(node, str(token_path))
        for directory in cluster.temp_dirs:
            shutil.rmtree(directory, ignore_errors=True)


def train(config: Path, env: dict[str, str], *overrides: str) -> subprocess.Popen:
    return subprocess.Popen([str(VENV_BIN / "metarec-dist"), "train", str(config), "--set", "runner.workers=2",
                             *[part for override in overrides for part in ("--set", override)]],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finished(process: subprocess.Popen) -> str:
    output, _ = process.communicate(timeout=RUN_TIMEOUT_S)
    assert process.returncode == 0, output
    return output


def results_of(output_dir: Path) -> dict:
    (run_dir,) = output_dir.iterdir()
    return json.loads((run_dir / "results.json").read_text())


def test_two_workers_on_two_nodes_train_like_one_node(two_nodes, synthetic_store, tmp_path):
    config = write_config(tmp_path, synthetic_store)
    finished(train(config, two_nodes.env, f"runner.address={two_nodes.address}",
                   f"output_dir={tmp_path / 'two-nodes'}"))
    assert len(set(two_nodes.worker_nodes())) == 2  # one worker on each node

    # No runner.address: a new local cluster (the two nodes' address file is in their own temp dir).
    finished(train(config, two_nodes.env, f"output_dir={tmp_path / 'one-node'}"))
    spread, single = results_of(tmp_path / "two-nodes"), results_of(tmp_path / "one-node")
    assert spread["best_step"] == single["best_step"]
    for metric, value in single["test"].items():
        assert spread["test"][metric] == pytest.approx(value, abs=1e-6), metric


def test_losing_a_node_mid_run_keeps_the_checkpoint_and_a_replacement_node_finishes_the_run(
        two_nodes, synthetic_store, tmp_path):
    config = write_config(tmp_path, synthetic_store)
    storage = tmp_path / "storage"
    run = train(config, two_nodes.env, f"runner.address={two_nodes.address}", f"output_dir={tmp_path / 'runs'}",
                "train.steps=40", "train.eval_every=10", "runner.checkpoint_every=5",
                f"runner.storage_path={storage}", "runner.startup_timeout_s=120")
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while latest_complete(storage) is None:
        assert run.poll() is None, run.communicate()[0]
        assert time.monotonic() < deadline, "no checkpoint was written"
        time.sleep(0.2)
    second = two_nodes.nodes[1]
    raylets = [process for process in psutil.Process(second.pid).children(recursive=True)
               if process.name() == "raylet"]
    assert raylets, "the second node's raylet was not found"
    for raylet in raylets:
        raylet.kill()
    checkpoint = latest_complete(storage)
    step = json.loads(checkpoint.child("state.json").read_text())["step"]

    two_nodes.add_node(tmp_path / "replacement.log")  # what an autoscaler does for a lost node
    output = finished(run)
    results = results_of(tmp_path / "runs")
    assert results["steps_run"] == 40
    assert latest_complete(storage) is not None and step >= 5
    assert len(set(two_nodes.worker_nodes())) == 3, output  # the head, the lost node and its replacement
