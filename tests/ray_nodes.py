"""Real Ray nodes for tests: `ray start --block` in sessions of their own, with token auth, on 127.0.0.1.

Each node gets its own ports and temp dir, so the nodes neither see nor disturb
the local clusters other tests start with `ray.init()`, nor ~/.ray/auth_token.
Stopping a node stops only what it started (never `ray stop`).
"""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def token_env(token_path: Path) -> dict[str, str]:
    """This process's environment for a shell on the cluster: token auth with ``token_path``."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_API_SERVER_ADDRESS")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_path),
               RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")  # SIGTERM: stop now, not after a 30 s drain
    return env


def start_node(arguments: list[str], env: dict[str, str], temp_dir: str, log: Path) -> subprocess.Popen:
    """`ray start --block` with ``arguments`` (``--head ...`` or ``--address ...``) and ports of its own."""
    with log.open("w") as out:
        return subprocess.Popen(
            [str(VENV_BIN / "ray"), "start", "--block", "--node-ip-address=127.0.0.1", *arguments,
             f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}",
             "--disable-usage-stats", f"--temp-dir={temp_dir}"],
            env=env, start_new_session=True, stdout=out, stderr=subprocess.STDOUT,
        )


def stop_node(node: subprocess.Popen, token_path: str) -> None:
    """SIGTERM to `ray start --block` tears its node down; then kill what the cluster started and left
    (e.g. a job driver a failed test left running): the processes whose environment names its token."""
    node.terminate()
    try:
        node.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(node.pid, signal.SIGKILL)
        node.wait()
    leftovers = []
    for process in psutil.process_iter():
        try:
            if process.environ().get("RAY_AUTH_TOKEN_PATH") == token_path:
                process.kill()
                leftovers.append(process)
        except psutil.Error:
            continue
    psutil.wait_procs(leftovers, timeout=10)


def wait_for_port(port: int, node: subprocess.Popen, log: Path, timeout_s: float = 60) -> None:
    """Until the node listens on ``port`` (its GCS, for a head)."""
    deadline = time.monotonic() + timeout_s
    while True:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        assert node.poll() is None, log.read_text()
        assert time.monotonic() < deadline, f"nothing listens on port {port} after {timeout_s} s:\n{log.read_text()}"
        time.sleep(0.3)
