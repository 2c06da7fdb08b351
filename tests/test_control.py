"""The driver's control of a run: the start-up watchdog's verdicts, the workers' stop agreement,
the DeepSpeed op build that a killed build cannot block, and the Ray internals these rely on."""

import fcntl
import json
import subprocess
import sys
import textwrap

import pytest
from conftest import in_two_processes

from metarec_dist.distributed.control import STARTING, TRAINING, RunControl, overdue_message


def test_the_watchdog_is_quiet_while_everyone_trains_or_the_wait_is_short():
    control = RunControl(workers=2)
    control.phase(0, "n0", STARTING)
    assert overdue_message(control.status(), timeout_s=60) is None  # still within the time
    control.phase(0, "n0", TRAINING)
    control.phase(1, "n1", TRAINING)
    assert overdue_message({**control.status(), "waiting_s": 1e9}, timeout_s=60) is None


def test_the_watchdog_names_the_waiting_worker_its_node_and_what_it_waits_on():
    control = RunControl(workers=2)
    control.phase(0, "n0", TRAINING)
    control.phase(1, "host-b (10.0.0.2)", "waiting for a lock", "/x/metarec-build.lock, held by pid 42 on host-b")
    message = overdue_message({**control.status(), "waiting_s": 301}, timeout_s=300)
    assert message.startswith("worker 1 on node host-b (10.0.0.2) is not training after 301 s: waiting for a lock "
                              "/x/metarec-build.lock, held by pid 42 on host-b; ")
    assert "runner.startup_timeout_s" in message and "\n" not in message


def test_the_watchdog_names_a_worker_that_never_started_and_ray_trains_state():
    control = RunControl(workers=2)
    control.set_train_state("SchedulingState")
    control.phase(0, "n0", TRAINING)
    message = overdue_message({**control.status(), "waiting_s": 400}, timeout_s=300)
    assert message.startswith("worker 1 did not start after 400 s: Ray Train is in SchedulingState")
    assert "runner.workers x runner.cpus_per_worker" in message


def test_a_replaced_worker_group_starts_a_new_start_up_wait():
    control = RunControl(workers=2)
    control.phase(0, "n0", TRAINING)
    control.phase(1, "n1", TRAINING)
    control.waiting_since -= 1000  # the run has been going for a while
    control.phase(1, "n1", STARTING)  # Ray Train restarted the group after a failure
    status = control.status()
    assert status["waiting_s"] < 5 and set(status["ranks"]) == {1}
    control.phase(0, "n0", TRAINING)
    control.waiting_since -= 1000
    control.set_train_state("RestartingState")
    assert control.status()["ranks"] == {} and control.status()["waiting_s"] < 5


def _stop_in_rank(rank: int, out: str) -> None:
    from metarec_dist.distributed.control import StopAgreement

    stop = StopAgreement(timeout_s=60)
    asked_at = 4 if rank == 1 else None  # only rank 1 is asked, at step 4
    stopped_at = next(step for step in range(1, 20) if stop.should_stop(step == asked_at))
    quiet = StopAgreement(timeout_s=60)
    never = [quiet.should_stop(False) for _ in range(5)]
    quiet.close()
    with open(f"{out}/rank{rank}.json", "w") as file:
        json.dump({"stopped_at": stopped_at, "never": never}, file)


def test_every_worker_stops_at_the_same_step_one_after_any_of_them_was_asked(tmp_path):
    in_two_processes(_stop_in_rank, tmp_path)
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got == {"stopped_at": 5, "never": [False] * 5}


def test_ray_train_takes_the_controller_callback_it_relies_on():
    """Fails loudly when Ray Train's internal callback hooks move (checked against Ray 2.60)."""
    import inspect

    from ray.train import RunConfig
    from ray.train.v2._internal.execution.callback import ControllerCallback
    from ray.train.v2._internal.execution.controller.controller import TrainController

    from metarec_dist.distributed.control import controller_callbacks

    (callback,) = controller_callbacks(control=None)
    assert isinstance(callback, ControllerCallback)
    assert RunConfig(callbacks=[callback]).callbacks == [callback]
    for hook in ("after_controller_start", "after_controller_state_update"):
        assert list(inspect.signature(getattr(ControllerCallback, hook)).parameters) == \
               list(inspect.signature(getattr(type(callback), hook)).parameters)
    assert "abort" in vars(TrainController)  # what the driver calls to stop a run at once


LOAD = textwrap.dedent("""
    import pathlib
    from metarec_dist.distributed.deepspeed_ops import SHM_OP, TORCH_LOCK, extensions_directory, load_deepspeed_ops
    load_deepspeed_ops(lambda phase, detail: print(phase, detail, flush=True))
    # deepspeed.initialize asks for the op again: it must come from DeepSpeed's cache, not behind torch's lock.
    lock = extensions_directory() / SHM_OP / TORCH_LOCK
    lock.touch()
    try:
        from deepspeed.comm.torch import build_shm_op
        assert build_shm_op() is not None
    finally:
        lock.unlink()
    print("loaded", flush=True)
""")


@pytest.mark.slow
def test_the_build_lock_of_a_live_builder_is_waited_for_and_the_loaded_op_bypasses_torchs_lock():
    """The package's build lock held by a live process: waited for, naming the holder; then the op
    loads, and DeepSpeed's own request for it never waits on torch's lock file."""
    from metarec_dist.distributed.deepspeed_ops import BUILD_LOCK, extensions_directory

    lock = extensions_directory() / BUILD_LOCK  # this environment's: a build here is shared with the suite
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        held.seek(0)
        held.truncate()
        held.write("pid 4242 on the-test\n")
        held.flush()
        loader = subprocess.Popen([sys.executable, "-c", LOAD], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)
        waiting = loader.stdout.readline()
        assert waiting.startswith(f"waiting for a lock {lock}, held by pid 4242 on the-test"), waiting
        assert loader.poll() is None  # still waiting while the lock is held
    out, err = loader.communicate(timeout=600)
    assert loader.returncode == 0, err
    assert out.splitlines()[0].split()[0] in ("compiling", "loading") and out.splitlines()[-1] == "loaded"


def test_the_local_clusters_auth_token_is_made_and_kept_readable_by_its_owner_only(tmp_path, monkeypatch):
    from metarec_dist.distributed.runner import _owner_only_auth_token

    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    token = tmp_path / ".ray" / "auth_token"
    _owner_only_auth_token(create=True)  # before a new local cluster: made 0600, the way Ray makes one
    assert token.stat().st_mode & 0o777 == 0o600
    assert len(token.read_text()) == 64 and int(token.read_text(), 16) >= 0
    first = token.read_text()
    token.chmod(0o644)  # as Ray itself writes it
    _owner_only_auth_token(create=True)
    assert token.stat().st_mode & 0o777 == 0o600 and token.read_text() == first  # tightened, not replaced
    elsewhere = tmp_path / "cluster-token"
    elsewhere.write_text("b" * 64)
    elsewhere.chmod(0o644)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(elsewhere))
    _owner_only_auth_token(create=False)  # joining a cluster with its token file: tightened too
    assert elsewhere.stat().st_mode & 0o777 == 0o600
