"""The training job submitted with `ray job submit` to a real Ray head with token authentication on.

What README.md ("Where to run", 2.) promises: a head started from the
virtual environment, `ray job submit --runtime-env cluster/runtime_env.yaml --
metarec-dist train ...` from the repository root, and the trainer joins the job's
cluster. The head is `ray start --head --block` in a session of its own, with its
own temp dir, ports and token, so it neither sees nor disturbs the local clusters
other tests start with `ray.init()` in this process, nor ~/.ray/auth_token.
"""

import json
import re
import secrets
import shlex
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass

import pytest
import yaml
from conftest import REPO_ROOT, write_config
from ray_nodes import VENV_BIN, free_port, start_node, stop_node, token_env

pytestmark = pytest.mark.slow

# The entrypoint runs in the head's environment, which is this test's: its PATH need not
# hold the venv (CI runs `.venv/bin/python -m pytest`), so name the venv's script.
METAREC = str(VENV_BIN / "metarec-dist")
JOB_TIMEOUT_S = 300  # a cold DeepSpeed op build (~1 minute on 2 cores) included


@dataclass
class RayHead:
    dashboard: str  # http://127.0.0.1:PORT: where jobs are submitted
    token: str
    env: dict[str, str]  # a shell on the head: RAY_AUTH_MODE=token and this head's token file

    def client(self, token: str | None = None):
        """A job client that sends ``token`` (default: the head's) whatever this process's auth state is."""
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.dashboard, headers={"Authorization": f"Bearer {token or self.token}"})


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A token-authenticated head on 127.0.0.1, stopped at the end: this head only, never `ray stop`."""
    token = secrets.token_hex(32)
    token_path = tmp_path_factory.mktemp("auth") / "auth_token"
    token_path.write_text(token)
    token_path.chmod(0o600)
    env = token_env(token_path)
    temp_dir = tempfile.mkdtemp(prefix="ray-job-")  # short: Ray's socket paths must fit in 107 bytes
    dashboard_port = free_port()
    head_log = token_path.with_name("ray-start.log")
    head = start_node(["--head", f"--port={free_port()}", "--dashboard-host=127.0.0.1",
                       f"--dashboard-port={dashboard_port}", f"--ray-client-server-port={free_port()}",
                       "--num-cpus=2"], env, temp_dir, head_log)
    try:
        ray_head = RayHead(f"http://127.0.0.1:{dashboard_port}", token, env)
        deadline = time.monotonic() + 60
        while True:
            assert head.poll() is None, f"ray start exited {head.returncode}:\n{head_log.read_text()}"
            try:
                ray_head.client().list_jobs()
                break
            except (ConnectionError, RuntimeError):  # not up yet (a wrong token fails at once)
                assert time.monotonic() < deadline, "the head's job server did not come up in 60 s"
                time.sleep(0.5)
        yield ray_head
    finally:
        stop_node(head, str(token_path))
        shutil.rmtree(temp_dir, ignore_errors=True)


def runtime_env() -> dict:
    """cluster/runtime_env.yaml as the Python client takes it: `working_dir: .` is the submitter's directory."""
    env = yaml.safe_load((REPO_ROOT / "cluster" / "runtime_env.yaml").read_text())
    return {**env, "working_dir": str(REPO_ROOT)}


def wait_until_done(client, job_id: str, timeout_s: float = JOB_TIMEOUT_S):
    """The job's final info; fails if it is still running after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not (info := client.get_job_info(job_id)).status.is_terminal():
        assert time.monotonic() < deadline, f"job {job_id} still {info.status} after {timeout_s} s"
        time.sleep(0.5)
    return info


def test_train_job_submitted_with_ray_job_submit_succeeds_and_writes_the_run(ray_head, synthetic_store, tmp_path):
    """The README's command, token in the environment: the job joins the cluster, trains on 2 workers
    and leaves results.json, model.pt and the results table in its logs."""
    config = write_config(tmp_path, synthetic_store)
    submit = subprocess.run(
        [str(VENV_BIN / "ray"), "job", "submit", "--address", ray_head.dashboard,
         "--runtime-env", "cluster/runtime_env.yaml", "--submission-id", "train-ok", "--",
         METAREC, "train", str(config), "--set", "runner.workers=2"],
        cwd=REPO_ROOT, env=ray_head.env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S, check=False,
    )
    client = ray_head.client()
    info, logs = client.get_job_info("train-ok"), client.get_job_logs("train-ok")
    assert submit.returncode == 0 and info.status == "SUCCEEDED", f"{info.status}: {info.message}\n{logs}"
    assert info.driver_exit_code == 0

    (run_dir,) = (tmp_path / "runs").iterdir()
    results = json.loads((run_dir / "results.json").read_text())
    assert results["workers"] == 2 and set(results["plan"]["owner"].values()) == {0, 1}
    assert 0 <= results["test"]["NDCG@10"] <= 1 and results["steps_run"] == 6
    assert (run_dir / "model.pt").stat().st_size > 0
    # What the user reads in `ray job logs`: the results table and where the results are.
    assert re.search(r"^split +HR@5 .*NDCG@10", logs, re.MULTILINE) and re.search(r"^test +0\.\d", logs, re.MULTILINE)
    assert f"results: {run_dir / 'results.json'}" in logs


def test_a_job_with_a_bad_config_fails_with_the_one_line_error(ray_head, synthetic_store, tmp_path):
    """A config the trainer rejects: the job ends FAILED, exit code 2, one `error:` line, no traceback."""
    config = write_config(tmp_path, synthetic_store)
    client = ray_head.client()
    job_id = client.submit_job(entrypoint=shlex.join([METAREC, "train", str(config), "--set", "runner.workers=0"]),
                               runtime_env=runtime_env())
    info = wait_until_done(client, job_id)
    logs = client.get_job_logs(job_id)
    assert info.status == "FAILED" and info.driver_exit_code == 2, f"{info.status}: {info.message}\n{logs}"
    errors = [line for line in logs.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "runner.workers" in errors[0], logs
    assert "Traceback" not in logs and not (tmp_path / "runs").exists()


def test_a_submission_without_the_token_or_with_a_wrong_one_is_refused(ray_head, tmp_path):
    """Token auth is on: no token is a 401 the CLI explains, a wrong one a 403."""
    from ray.exceptions import AuthenticationError

    no_token = {k: v for k, v in ray_head.env.items() if not k.startswith("RAY_AUTH_")}
    no_token["HOME"] = str(tmp_path)  # no ~/.ray/auth_token either
    submit = subprocess.run([str(VENV_BIN / "ray"), "job", "submit", "--address", ray_head.dashboard, "--", "true"],
                            env=no_token, capture_output=True, text=True, timeout=60, check=False)
    assert submit.returncode != 0 and "Missing authentication token" in submit.stdout + submit.stderr
    with pytest.raises(AuthenticationError, match="Invalid authentication token"):
        ray_head.client(token="0" * 64).submit_job(entrypoint="true")
    assert ray_head.client().list_jobs() is not None  # the right token still gets in
