"""The driver's line to a running job: where each worker stands, a stop request, the controller.

    workers  --phase(rank, ...)-->  RunControl  <--status() / request_stop()--  driver
    rank 0   --stop_requested()-->  RunControl
    Ray Train's controller  --set_controller(itself)-->  RunControl  (so the driver can abort it)

``RunControl`` is a small actor (no CPU) that only stores what it is told. The
driver polls it: ``overdue_message`` turns its status into the start-up
watchdog's one-line message; a first Ctrl-C becomes ``request_stop``.
Workers agree on the step to stop at with ``StopAgreement``.
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

TRAINING = "training"  # the phase a worker reports once it enters the training loop
STARTING = "starting"  # the first phase of every worker of every attempt


class RunControl:
    """Made remote by the runner (``ray.remote(num_cpus=0)(RunControl)``); plain state, one clock."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.phases: dict[int, dict[str, Any]] = {}
        self.waiting_since = time.monotonic()  # when the current attempt's workers were first awaited
        self.stop = False
        self.fatal: str | None = None  # a worker's error that no retry can fix (a full disk, say)
        self.controller = None
        self.train_state = "not started"

    def phase(self, rank: int, node: str, phase: str, detail: str = "") -> None:
        now = time.monotonic()
        everyone_trained = len(self.phases) == self.workers and all(
            entry["phase"] == TRAINING for entry in self.phases.values())
        if phase == STARTING and everyone_trained:  # Ray Train replaced the worker group: a new start-up
            self.phases, self.waiting_since = {}, now
        self.phases[rank] = {"node": node, "phase": phase, "detail": detail, "since": now}

    def set_train_state(self, state: str) -> None:
        if state == "RestartingState":
            self.phases, self.waiting_since = {}, time.monotonic()
        self.train_state = state

    def request_stop(self) -> None:
        self.stop = True

    def stop_requested(self) -> bool:
        return self.stop

    def fail(self, message: str) -> None:
        self.fatal = self.fatal or message

    def set_controller(self, controller) -> None:
        self.controller = controller

    def get_controller(self):
        return self.controller

    def status(self) -> dict[str, Any]:
        """Each rank's phase and how long it has been in it; how long the slowest start has taken."""
        now = time.monotonic()
        ranks = {rank: {"node": entry["node"], "phase": entry["phase"], "detail": entry["detail"],
                        "seconds": now - entry["since"]} for rank, entry in self.phases.items()}
        return {"workers": self.workers, "ranks": ranks, "waiting_s": now - self.waiting_since,
                "train_state": self.train_state, "fatal": self.fatal}


def overdue_message(status: dict[str, Any], timeout_s: float) -> str | None:
    """The start-up watchdog: None while every worker trains or the wait is within ``timeout_s``,
    else one line naming the first worker not training, its node, what it waits on, and the fix."""
    ranks = status["ranks"]
    waiting = [rank for rank in range(status["workers"]) if ranks.get(rank, {}).get("phase") != TRAINING]
    if not waiting or status["waiting_s"] < timeout_s:
        return None
    rank = waiting[0]
    entry = ranks.get(rank)
    took = f"after {status['waiting_s']:.0f} s"
    if entry is None:
        return (f"worker {rank} did not start {took}: Ray Train is in {status['train_state']} (its process was "
                f"never placed or never reached the training function); check that the cluster has the "
                f"resources of runner.workers x runner.cpus_per_worker (`ray status`), or raise "
                f"runner.startup_timeout_s")
    what = f"{entry['phase']} {entry['detail']}".strip()
    remedy = {
        "waiting for a lock": "if no build runs there, stop the process named above; else raise "
                              "runner.startup_timeout_s",
        "compiling": "the first build on a slow node can take minutes: raise runner.startup_timeout_s",
    }.get(entry["phase"], "see its log under the run's Ray session directory, or raise runner.startup_timeout_s")
    return f"worker {rank} on node {entry['node']} is not training {took}: {what}; {remedy}"


class StopAgreement:
    """Whether to stop now, agreed by every worker one step after any of them was asked.

    At every step boundary each worker calls ``should_stop(asked)``: it reads
    the all-reduce started at the previous boundary (every worker gets the same
    answer at the same step) and starts the next one with its own ``asked``.
    The all-reduce runs asynchronously on a group of its own, so a step does not
    wait for it.
    """

    def __init__(self, timeout_s: float) -> None:
        self._group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
        self._flag = torch.zeros(1, dtype=torch.int32)
        self._pending = None

    def should_stop(self, asked: bool) -> bool:
        if self._pending is not None:
            self._pending.wait()
            self._pending = None
            if int(self._flag.item()):
                return True
        self._flag.fill_(int(asked))
        self._pending = dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, group=self._group, async_op=True)
        return False

    def close(self) -> None:
        if self._pending is not None:
            self._pending.wait()
            self._pending = None


class StopPoll:
    """Rank 0's view of the driver's stop request: one call in flight at a time, never blocking."""

    def __init__(self, control, interval_s: float = 0.25) -> None:
        self._control, self._interval = control, interval_s
        self._pending, self._sent = None, 0.0
        self.asked = False

    def __call__(self) -> bool:
        import ray

        if self._pending is not None and ray.wait([self._pending], timeout=0)[0]:
            self.asked = self.asked or bool(ray.get(self._pending))
            self._pending = None
        if self._pending is None and not self.asked and time.monotonic() - self._sent >= self._interval:
            self._pending, self._sent = self._control.stop_requested.remote(), time.monotonic()
        return self.asked


def controller_callbacks(control) -> list:
    """Ray Train callbacks that hand ``control`` the run's controller actor (so the driver can abort
    the run) and each of its state changes (a restart begins a new start-up).

    ``ControllerCallback`` is internal to Ray Train (checked against Ray 2.60:
    ``ray.train.v2._internal.execution.callback``); ``ray.train.RunConfig(callbacks=...)``
    takes any ``RayTrainCallback``. tests/test_control.py fails if either changes.
    """
    import ray
    from ray.train.v2._internal.execution.callback import ControllerCallback

    class TellRunControl(ControllerCallback):
        def after_controller_start(self, train_run_context) -> None:
            control.set_controller.remote(ray.get_runtime_context().current_actor)

        def after_controller_state_update(self, previous_state, current_state) -> None:
            control.set_train_state.remote(type(current_state).__name__)

    return [TellRunControl()]
