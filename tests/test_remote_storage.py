"""The store and the checkpoints in S3: a real S3-compatible server (moto's) on 127.0.0.1.

pyarrow and Ray Train reach it as they reach S3, through the standard AWS
environment (AWS_ENDPOINT_URL and keys), with nothing patched in any process.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest
from conftest import write_config
from ray_nodes import free_port

from metarec_dist.data.store import DomainStore
from metarec_dist.distributed.checkpoint import latest_complete
from metarec_dist.distributed.preflight import check_access
from metarec_dist.errors import ConfigError, StoreError
from metarec_dist.storage import location

VENV_BIN = Path(sys.executable).parent
BUCKET = "metarec"


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    """moto's S3 server on a free port; yields the environment that points AWS clients at it."""
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with log.open("w") as out:
        server = subprocess.Popen([str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                                  stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    try:
        admin = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", access_key="testing",
                                  secret_key="testing", region="us-east-1", allow_bucket_creation=True)
        deadline = time.monotonic() + 30
        while True:
            try:
                admin.create_dir(BUCKET)
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.3)
        yield env
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture
def aws(s3_server, monkeypatch):
    """This process talks to the server too (the AWS environment, as a user's shell would have it)."""
    for name, value in s3_server.items():
        monkeypatch.setenv(name, value)
    return s3_server


def uploaded(store: DomainStore, prefix: str) -> str:
    """``store`` copied to s3://BUCKET/prefix, as `aws s3 sync` would; returns the URI."""
    uri = f"s3://{BUCKET}/{prefix}"
    remote = location(uri, "test")
    pafs.copy_files(str(store.root), remote.path, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=remote.filesystem)
    return uri


def test_a_store_in_s3_reads_like_the_local_one(aws, synthetic_store):
    remote = DomainStore(uploaded(synthetic_store, "read-store"))
    assert remote.names() == synthetic_store.names()
    local, there = synthetic_store.open("syn-target"), remote.open("syn-target")
    assert there.meta == local.meta
    np.testing.assert_array_equal(there.sequences.values, local.sequences.values)
    with pytest.raises(StoreError, match="no domain 'missing'"):
        remote.open("missing")
    with pytest.raises(StoreError, match="read-only"):
        remote.path("new-domain")


def test_a_uri_pyarrow_cannot_open_is_refused_naming_the_field(tmp_path, synthetic_store):
    with pytest.raises(ConfigError, match=r"^data.store: cannot open s4://bucket/store \("):
        location("s4://bucket/store", "data.store")
    from metarec_dist.cli import main

    config = write_config(tmp_path, synthetic_store)
    assert main(["train", str(config), "--set", "data.store=s4://bucket/store"]) == 2
    assert not (tmp_path / "runs").exists()


def test_the_node_check_names_a_store_or_storage_path_it_cannot_use(aws, synthetic_store, tmp_path):
    store = uploaded(synthetic_store, "checked-store")
    assert check_access(store, ["syn-target"], f"s3://{BUCKET}/checked-runs") is None
    assert "no domain 'syn-nothing'" in check_access(store, ["syn-nothing"], str(tmp_path))
    assert "is not writable" in check_access(store, ["syn-target"], f"s3://no-such-bucket-{os.getpid()}/runs")


@pytest.mark.slow
def test_a_run_reads_its_store_from_s3_checkpoints_there_and_resumes_from_there(s3_server, aws, synthetic_store,
                                                                                 tmp_path):
    """Two Ray Train workers read the store from S3 and Ray Train writes the checkpoints to S3; a run
    stopped with Ctrl-C continues from its S3 checkpoint with --resume."""
    store = uploaded(synthetic_store, "train-store")
    storage = f"s3://{BUCKET}/train-runs"
    config = write_config(tmp_path, synthetic_store)
    env = {**os.environ, **s3_server}
    command = [str(VENV_BIN / "metarec-dist"), "train", str(config), "--set", f"data.store={store}",
               "--set", "runner.workers=2", "--set", f"runner.storage_path={storage}", "--set", "train.steps=16",
               "--set", "train.eval_every=8", "--set", "runner.checkpoint_every=4"]
    run = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while latest_complete(location(storage, "test")) is None:
        assert run.poll() is None, run.communicate()[0]
        assert time.monotonic() < deadline, "no checkpoint reached S3"
        time.sleep(0.3)
    run.send_signal(signal.SIGINT)  # the workers stop at the next step boundary, with a checkpoint
    output, _ = run.communicate(timeout=120)
    assert run.returncode != 0 and "continue with" in output, output
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert not (run_dir / "results.json").exists()
    stopped_at = json.loads(latest_complete(location(storage, "test")).child("state.json").read_text())["step"]

    resumed = subprocess.run([str(VENV_BIN / "metarec-dist"), "train", "--resume", str(run_dir)], env=env,
                             capture_output=True, text=True, timeout=300, check=False)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resuming from {storage}" in resumed.stderr
    results = json.loads((run_dir / "results.json").read_text())
    assert results["steps_run"] == 16 and stopped_at < 16
    assert results["test"]["NDCG@10"] >= 0


@pytest.mark.slow
def test_a_store_the_driver_sees_but_a_node_cannot_is_refused_naming_the_node(s3_server, aws, synthetic_store,
                                                                              tmp_path):
    """The cluster's node has no route to the S3 server the driver uses: the run stops before any worker
    starts, with one line naming the node, and writes no results."""
    import secrets
    import shutil
    import tempfile

    from ray_nodes import start_node, stop_node, token_env, wait_for_port

    store = uploaded(synthetic_store, "driver-only-store")
    token_path = tmp_path / "auth_token"
    token_path.write_text(secrets.token_hex(32))
    node_env = {**token_env(token_path), "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}  # nothing there
    temp_dir, port = tempfile.mkdtemp(prefix="ray-s3-"), free_port()
    head = start_node(["--head", f"--port={port}", "--include-dashboard=false", "--num-cpus=2"], node_env, temp_dir,
                      tmp_path / "head.log")
    try:
        wait_for_port(port, head, tmp_path / "head.log")
        driver_env = {**token_env(token_path), **s3_server}
        config = write_config(tmp_path, synthetic_store)
        run = subprocess.run([str(VENV_BIN / "metarec-dist"), "train", str(config), "--set", f"data.store={store}",
                              "--set", "runner.workers=2", "--set", f"runner.address=127.0.0.1:{port}",
                              "--set", f"output_dir={tmp_path / 'runs'}"],
                             env=driver_env, capture_output=True, text=True, timeout=300, check=False)
    finally:
        stop_node(head, str(token_path))
        shutil.rmtree(temp_dir, ignore_errors=True)
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert run.returncode == 2 and len(errors) == 1, run.stdout + run.stderr
    assert re.match(rf"error: node \S+ \([0-9a-f]{{8}}\): data\.store: cannot read {store} \(", errors[0]), errors
    assert not list(tmp_path.rglob("results.json")) and not list(tmp_path.rglob("model.pt"))
