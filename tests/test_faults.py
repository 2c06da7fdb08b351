"""A stopped run never makes the next one hang: SIGKILL anywhere, Ctrl-C, a full disk.

Each run is the ``metarec-dist train`` command in its own session, as a user
starts it, on its own local Ray cluster; the tests signal the whole session
as a terminal would, and check that no process of it survives.
"""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import write_config

from metarec_dist.distributed.checkpoint import is_complete, latest_complete

pytestmark = pytest.mark.slow

CLI = [sys.executable, "-m", "metarec_dist"]
# Long enough that eight killed starts of one run do not finish it.
TRAIN = {"steps": 120, "batch_size": 16, "eval_every": 20, "learning_rate": 0.003, "patience": 100}
RUNNER = {"workers": 2, "checkpoint_every": 10, "max_failures": 0, "collective_timeout_s": 60}


class Run:
    """One ``metarec-dist train`` process in a session of its own; stderr kept in a file."""

    def __init__(self, args, cwd: Path, env: dict[str, str], log: Path) -> None:
        self.log = log
        self.started = time.monotonic()
        with open(log, "w") as stderr:
            self.process = subprocess.Popen([*CLI, *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                                            stderr=stderr, text=True, start_new_session=True)

    def stderr(self) -> str:
        return self.log.read_text()

    def wait_for(self, condition, timeout_s: float = 300) -> bool:
        """Poll ``condition()`` until it holds (True) or the process has ended (False)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if condition():
                return True
            if self.process.poll() is not None:
                return False
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting; stderr:\n{self.stderr()}")

    def signal_session(self, sig: int) -> None:
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:
            pass

    def finish(self, timeout_s: float = 600) -> tuple[int, str]:
        stdout, _ = self.process.communicate(timeout=timeout_s)
        return self.process.returncode, stdout

    def kill_and_reap(self) -> None:
        """SIGKILL every process of the session (ninja runs the compilers in process groups of
        their own), then wait until none is left."""
        self.signal_session(signal.SIGKILL)
        for line in session_processes(self.process.pid):
            try:
                os.kill(int(line.split()[1]), signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait(timeout=60)
        self.assert_session_ends()

    def assert_session_ends(self, timeout_s: float = 60) -> None:
        """No process of the run's session (Ray's included) outlives it for long."""
        deadline = time.monotonic() + timeout_s
        while session_processes(self.process.pid):
            assert time.monotonic() < deadline, f"left running: {session_processes(self.process.pid)}"
            time.sleep(0.2)


def session_processes(session: int) -> list[str]:
    listing = subprocess.run(["ps", "-eo", "sid=,pid=,stat=,comm="], capture_output=True, text=True).stdout
    return [line for line in listing.splitlines()
            if line.split()[0] == str(session) and not line.split()[2].startswith("Z")]


@pytest.fixture(scope="module")
def workspace(synthetic_store, tmp_path_factory):
    """A config and the environment of the runs."""
    base = tmp_path_factory.mktemp("faults")
    config = write_config(base, synthetic_store, train=TRAIN, runner=RUNNER)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return base, config, env


@pytest.fixture(scope="module")
def unbroken(workspace):
    """The results of the same run, never interrupted."""
    base, config, env = workspace
    run = Run(["train", str(config), "--set", f"output_dir={base / 'unbroken'}"], base, env, base / "unbroken.log")
    code, _ = run.finish()
    assert code == 0, run.stderr()
    (run_dir,) = (base / "unbroken").iterdir()
    return json.loads((run_dir / "results.json").read_text())


def run_directories(output: Path) -> list[Path]:
    return sorted(output.iterdir()) if output.is_dir() else []


def complete_checkpoints(run_dir: Path) -> list[Path]:
    return [state.parent for state in (run_dir / "ray").glob("**/state.json") if is_complete(state.parent)]


def assert_same_as_unbroken(run_dir: Path, unbroken: dict) -> None:
    results = json.loads((run_dir / "results.json").read_text())
    assert results["steps_run"] == unbroken["steps_run"] == TRAIN["steps"]
    assert [entry["step"] for entry in results["history"]] == [entry["step"] for entry in unbroken["history"]]
    # Restored parameters, optimizer moments and random streams: the same numbers, up to summation order.
    assert results["test"]["NDCG@10"] == pytest.approx(unbroken["test"]["NDCG@10"], abs=1e-3)


def test_sigkill_at_any_point_then_resume_or_restart_always_finishes_as_an_unbroken_run(workspace, unbroken):
    """Eight kills of the whole session: during imports, Ray's start, DeepSpeed's first build, the
    workers' start-up, training, checkpoint writing and evaluation (every kill after the first
    checkpoint hits a resumed run); then the run finishes."""
    base, config, env = workspace
    output = base / "killed"
    extensions = base / "killed-extensions"  # the first start compiles DeepSpeed's op: kill it mid-build
    env = {**env, "TORCH_EXTENSIONS_DIR": str(extensions)}
    rng = random.Random(0)

    def validations(run: Run) -> int:
        return len(re.findall(r"^step \d+/", run.stderr(), re.MULTILINE))

    def checkpoints() -> int:
        return len(list(output.glob("*/ray/*/checkpoint_*")))

    def after(seconds: float) -> bool:
        time.sleep(seconds)
        return True

    imports_s, start_up_s, training_s = rng.uniform(0.3, 1.5), rng.uniform(8, 11), rng.uniform(0, 0.4)
    # Where each kill lands: a condition on the run (and the checkpoints there were when it started).
    points = [
        ("imports", lambda run, before: time.monotonic() - run.started > imports_s),
        ("Ray's start", lambda run, before: "training on 2 Ray Train workers" in run.stderr()),
        ("DeepSpeed's first build", lambda run, before: (extensions / "deepspeed_shm_comm").is_dir()),
        ("a worker's start-up", lambda run, before: time.monotonic() - run.started > start_up_s
         and (extensions / "deepspeed_shm_comm" / "deepspeed_shm_comm.so").exists()),
        ("training", lambda run, before: checkpoints() > before and after(training_s)),
        ("checkpoint writing", lambda run, before: checkpoints() > before),
        ("right after a validation", lambda run, before: validations(run) >= 2),
        ("the final evaluation", lambda run, before: f"step {TRAIN['steps']}/" in run.stderr()),
    ]
    killed = []
    for index, (where, condition) in enumerate(points):
        run_dir = next((d for d in run_directories(output) if complete_checkpoints(d)), None)
        args = (["train", "--resume", str(run_dir)] if run_dir else
                ["train", str(config), "--set", f"output_dir={output}"])
        run, before = Run(args, base, env, base / f"kill-{index}.log"), checkpoints()
        assert run.wait_for(lambda run=run, before=before, condition=condition: condition(run, before)), \
            f"the run ended before the kill {where}: {run.stderr()}"
        run.kill_and_reap()
        killed.append(where)
        if where == "DeepSpeed's first build":  # the case that used to hang: torch's lock of a dead build
            (extensions / "deepspeed_shm_comm").mkdir(exist_ok=True)
            (extensions / "deepspeed_shm_comm" / "lock").touch()
    run_dir = next(d for d in run_directories(output) if complete_checkpoints(d))
    assert not (run_dir / "results.json").exists()
    run = Run(["train", "--resume", str(run_dir)], base, env, base / "final.log")
    code, _ = run.finish()
    assert code == 0, run.stderr()
    assert not list(extensions.glob("*/lock")), "a build lock was left behind"
    assert_same_as_unbroken(run_dir, unbroken)


def test_ctrl_c_stops_at_a_step_with_a_checkpoint_a_second_one_at_once_and_both_resume(workspace, unbroken):
    base, config, env = workspace
    output = base / "ctrl-c"
    run = Run(["train", str(config), "--set", f"output_dir={output}"], base, env, base / "ctrl-c.log")
    assert run.wait_for(lambda: any(complete_checkpoints(d) for d in run_directories(output)))
    run.signal_session(signal.SIGINT)  # what a terminal's Ctrl-C sends: the whole foreground group
    code, _ = run.finish()
    err = run.stderr()
    assert code == 130, err
    (run_dir,) = run_directories(output)
    command = f"metarec-dist train --resume {run_dir}"
    assert f"continue with:\n  {command}\n" in err
    record = json.loads((run_dir / "interrupted.json").read_text())
    assert record["continue_with"] == command and record["stopped_after_step"] == record["checkpoint_step"]
    assert str(latest_complete(run_dir / "ray")) == record["checkpoint"]
    assert not (run_dir / "results.json").exists()
    run.assert_session_ends()

    # The printed command continues the run; Ctrl-C twice stops it at once.
    resumed = Run(command.split()[1:], base, env, base / "ctrl-c-twice.log")
    assert resumed.wait_for(lambda: "step " in resumed.stderr())  # training again
    resumed.signal_session(signal.SIGINT)
    time.sleep(0.05)
    resumed.signal_session(signal.SIGINT)
    stopped = time.monotonic()
    code, _ = resumed.finish()
    assert time.monotonic() - stopped < 60
    err = resumed.stderr()
    assert code == 130, err
    assert re.search(r"interrupted: (stopped at once; the newest complete checkpoint is of step \d+|every worker "
                     r"stopped after step \d+ and wrote a checkpoint); continue with:", err), err
    assert (run_dir / "interrupted-1.json").is_file()  # the first record is kept
    resumed.assert_session_ends()

    final = Run(["train", "--resume", str(run_dir)], base, env, base / "ctrl-c-final.log")
    code, _ = final.finish()
    assert code == 0, final.stderr()
    assert_same_as_unbroken(run_dir, unbroken)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 16 MiB tmpfs the test mounts (CI runs as root), unmounted afterwards."""
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}); needs root")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(directory: Path) -> Path:
    """Write to ``directory`` until its file system is full; returns the filler file."""
    filler = directory / "filler"
    with open(filler, "wb") as stream:
        try:
            while True:
                stream.write(b"\0" * 65536)
                stream.flush()
        except OSError:
            pass
    return filler


def test_a_checkpoint_that_cannot_be_written_stops_the_run_naming_the_path_and_keeps_the_last_one(
    workspace, unbroken, small_tmpfs
):
    """A full disk, then a read-only one: each stops the run with the path and the reason, the
    checkpoint before stays complete, and the run resumes from it once the disk is fixed."""
    base, config, env = workspace
    output = base / "storage"
    args = ["train", str(config), "--set", f"output_dir={output}", "--set", f"runner.storage_path={small_tmpfs}"]
    for fault, reason in (("disk full", "No space left on device"), ("read-only", "Read-only file system")):
        run = Run(args, base, env, base / f"{fault}.log")
        before = latest_complete(small_tmpfs)
        assert run.wait_for(lambda before=before: latest_complete(small_tmpfs) not in (None, before))
        if fault == "disk full":
            filler = fill(small_tmpfs)
        else:
            subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
        code, _ = run.finish()
        err = run.stderr()
        assert code == 2, err
        assert re.match(rf"error: (the checkpoint of step \d+|Ray Train's record of the run's checkpoints) could not "
                        rf"be written to {re.escape(str(small_tmpfs))}\S* \({reason}\); the checkpoint before it is "
                        rf"intact", err.strip().splitlines()[-1]), err
        last = latest_complete(small_tmpfs)
        assert last is not None and is_complete(last)
        if fault == "disk full":
            filler.unlink()
        else:
            subprocess.run(["mount", "-o", "remount,rw", str(small_tmpfs)], check=True)
        (run_dir,) = run_directories(output)
        args = ["train", "--resume", str(run_dir)]
    resumed = Run(args, base, env, base / "storage-resume.log")
    code, _ = resumed.finish()
    assert code == 0, resumed.stderr()
    assert_same_as_unbroken(run_dir, unbroken)


def test_a_worker_stuck_at_start_up_stops_the_run_naming_it_and_the_token_stays_private(workspace, tmp_path):
    """The build lock held by a live process: the watchdog stops the run in its time, naming the
    worker, its node, the lock and its holder. The run's new local cluster keeps its token 0600."""
    import fcntl

    from metarec_dist.distributed.deepspeed_ops import BUILD_LOCK

    base, config, env = workspace
    extensions = tmp_path / "extensions"
    extensions.mkdir()
    home = tmp_path / "home"
    env = {**env, "TORCH_EXTENSIONS_DIR": str(extensions), "HOME": str(home)}
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(name, None)
    with open(extensions / BUILD_LOCK, "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("pid 4242 on the-test\n")
        held.flush()
        run = Run(["train", str(config), "--set", f"output_dir={tmp_path / 'runs'}",
                   # Long enough for Ray to place the workers on a loaded machine: only the lock may stop them.
                   "--set", "runner.startup_timeout_s=30"], base, env, tmp_path / "stuck.log")
        code, _ = run.finish(timeout_s=180)
    error = run.stderr().strip().splitlines()[-1]
    assert code == 2, run.stderr()
    assert re.fullmatch(rf"error: worker [01] on node \S+ \(\S+\) is not training after [3-5]\d s: waiting for a lock "
                        rf"{re.escape(str(extensions / BUILD_LOCK))}, held by pid 4242 on the-test \(building "
                        r"DeepSpeed's deepspeed_shm_comm op\); if no build runs there, stop the process named above; "
                        r"else raise runner.startup_timeout_s", error), error
    assert time.monotonic() - run.started < 90
    run.assert_session_ends()
    assert (home / ".ray" / "auth_token").stat().st_mode & 0o777 == 0o600
