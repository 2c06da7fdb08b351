"""Meta-training on Ray Train workers, each owning a shard of the source domains.

    driver:  plan_domains -> preflight -> TorchTrainer.fit() on a thread, supervised
             (start-up watchdog, Ctrl-C) -> the leader's results
    worker:  restore config and plan -> open its shard -> restore a checkpoint, if any
             -> Trainer(..., TorchCollective(), WorkerOptimizer).run()
             -> report at validations and checkpoints; the leader reports results at the end

Each worker tells a ``RunControl`` actor where it stands (``distributed.control``); a
first Ctrl-C on the driver makes every worker stop at the same step boundary
with a checkpoint, a second one (or the watchdog) aborts the run at once.

The worker runs the single-process ``Trainer`` unchanged; only the
``Collective`` differs (see ``metarec_dist.meta.step.meta_step``), so one
worker and N workers run the same code. Each worker opens only the target and
its own sources from the store and builds item tables for those alone: its
memory grows with its shard, not with the number of domains.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import secrets
import signal
import socket
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from metarec_dist.allocator import freed_memory_environment
from metarec_dist.data.store import DomainStore
from metarec_dist.distributed.control import (
    STARTING,
    TRAINING,
    RunControl,
    StopAgreement,
    StopPoll,
    controller_callbacks,
    overdue_message,
)
from metarec_dist.distributed.optimizer import deepspeed_config
from metarec_dist.distributed.plan import DomainPlan, plan_domains
from metarec_dist.distributed.preflight import check_every_node, check_resources, uses_gpus
from metarec_dist.errors import CheckpointError, ConfigError, MetarecError, RunInterrupted, TrainingError
from metarec_dist.meta.config import ExperimentConfig
from metarec_dist.meta.saved_run import MODEL_FILE
from metarec_dist.storage import Location, location

log = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
ERROR_FILE = "error.json"
INTERRUPTED_FILE = "interrupted.json"  # in the checkpoint the workers wrote when asked to stop
SUPERVISE_EVERY_S = 0.5


@dataclass
class DistributedOutcome:
    results: dict[str, Any]
    best_state: dict[str, torch.Tensor]  # theta and the target's parameters at the best validation
    plan: DomainPlan


def source_plan(config: ExperimentConfig) -> DomainPlan:
    """The domain plan for ``config.runner.workers``, from the store's counts (no tables are read)."""
    store = DomainStore(config.data.store)
    interactions = {name: int(store.open(name).meta["counts"]["interactions"]) for name in config.data.sources}
    return plan_domains(interactions, config.runner.workers)


def train_distributed(
    config: ExperimentConfig,
    storage_dir: Path,
    resume_from: Location | None = None,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    test: bool = True,
    callbacks: Sequence[Any] = (),
) -> DistributedOutcome:
    """Run ``config`` on ``config.runner.workers`` Ray Train workers.

    ``storage_dir``: where Ray Train keeps this run's reports and checkpoints unless
    ``runner.storage_path`` (a path or URI) is set
    (each call adds an ``attempt-N`` directory, never touching earlier ones);
    ``resume_from``: a complete checkpoint directory to continue from (local or remote);
    ``on_progress(record)``: called on the driver after every meta-step with
    the step, seconds, last loss, validation metric (at validations) and the
    top sources by weight, sent by the leader through a Ray queue;
    ``test`` False: the workers never read the test split (a tuning trial);
    ``callbacks``: more Ray Train ``UserCallback``s, run in its controller
    (a tuning trial's forwards each validation to Ray Tune).
    """
    # Workers run in directories of their own: every path they read must be absolute.
    config = config.model_copy(
        update={"data": config.data.model_copy(update={"store": location(config.data.store, "data.store").uri})}
    )
    plan = source_plan(config)
    if config.runner.zero_stage is not None or config.runner.deepspeed_config is not None:
        deepspeed_config(config)  # a bad file fails here, before any worker starts
    log.info("source domains per worker:\n%s", plan.table())
    storage = run_storage(config, storage_dir)
    connect(config)
    check_resources(config)
    check_every_node(config, storage)

    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.util.queue import Queue
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    runner = config.runner
    use_gpu = uses_gpus(runner.use_gpu)
    # Ray Train's own barriers (every ray.train.report) wait forever by default: a worker frozen
    # at a report would hang the run. The trainer hands this variable on to its controller.
    os.environ["RAY_TRAIN_COLLECTIVE_TIMEOUT_S"] = str(runner.collective_timeout_s)
    # The queue and the control are tiny actors: they take no CPU from the workers' reservation, and
    # live on the driver's node, so losing a worker's node loses neither.
    beside_driver = {"num_cpus": 0, "scheduling_strategy": NodeAffinitySchedulingStrategy(
        ray.get_runtime_context().get_node_id(), soft=False)}
    progress = Queue(maxsize=10_000, actor_options=beside_driver) if on_progress is not None else None
    control = ray.remote(RunControl).options(**beside_driver).remote(runner.workers)
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={
            "config": config.model_dump(mode="json"),
            "plan": plan.to_json(),
            "resume_from": resume_from.uri if resume_from else None,
            "test": test,
            "progress": progress,
            "control": control,
        },
        scaling_config=ScalingConfig(
            num_workers=runner.workers, use_gpu=use_gpu, resources_per_worker={"CPU": runner.cpus_per_worker}
        ),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo", timeout_s=runner.collective_timeout_s),
        run_config=RunConfig(
            name=_new_attempt_name(storage),
            storage_path=storage.uri,
            failure_config=FailureConfig(max_failures=runner.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            logging_config=LoggingConfig(log_level="WARNING"),
            callbacks=[*controller_callbacks(control), *callbacks],
        ),
    )
    try:
        with _progress_drained(progress, on_progress):
            result = _supervised_fit(trainer, control, runner.startup_timeout_s)
    except TrainingFailedError as error:
        raise _user_error(error, storage) from None
    finally:
        ray.kill(control)
    if result.checkpoint is None:
        raise TrainingError("the workers finished without reporting results; see the Ray logs in the run directory")
    with result.checkpoint.as_directory() as directory:
        if (Path(directory) / ERROR_FILE).is_file():  # the last good checkpoint stays in storage
            raise TrainingError(json.loads((Path(directory) / ERROR_FILE).read_text())["error"])
        if (Path(directory) / INTERRUPTED_FILE).is_file():
            raise RunInterrupted(json.loads((Path(directory) / INTERRUPTED_FILE).read_text())["step"])
        results = json.loads((Path(directory) / RESULTS_FILE).read_text())
        best_state = torch.load(Path(directory) / MODEL_FILE, map_location="cpu", weights_only=True)
    results["plan"] = {"workers": plan.workers, "owner": plan.owner}
    return DistributedOutcome(results=results, best_state=best_state, plan=plan)


# --- driver side ------------------------------------------------------------------------


def _supervised_fit(trainer, control, startup_timeout_s: float):
    """``trainer.fit()`` on a thread while this one watches the run.

    A first Ctrl-C asks the workers to stop at the next step boundary (they
    write a checkpoint); a second one aborts the run at once, and so does the
    start-up watchdog when a worker is not training within ``startup_timeout_s``
    or a worker reports an error no retry can fix. Ray Train registers its own
    Ctrl-C handler only when ``fit`` runs on the main thread, so this one rules.
    """
    import ray

    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as error:  # handed to the caller's thread below
            outcome["error"] = error

    thread = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    with _counted_interrupts() as interrupts:
        thread.start()
        stop_requested = False
        while thread.is_alive():
            thread.join(timeout=SUPERVISE_EVERY_S)
            if interrupts.count >= 2:
                _abort(control, thread)
                raise RunInterrupted(None)
            if interrupts.count == 1 and not stop_requested:
                control.request_stop.remote()
                stop_requested = True
                log.warning("stopping every worker at the next step boundary, after a checkpoint "
                            "(press Ctrl-C again to stop at once, without one)")
            try:
                status = ray.get(control.status.remote(), timeout=30)
            except (ray.exceptions.RayError, TimeoutError):
                continue  # the watchdog misses one look; the run itself is unaffected
            failure = status["fatal"] or overdue_message(status, startup_timeout_s)
            if failure is not None and thread.is_alive():
                _abort(control, thread)
                raise TrainingError(failure)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


class _Interrupts:
    count = 0


@contextlib.contextmanager
def _counted_interrupts():
    """Count SIGINTs instead of raising KeyboardInterrupt (main thread only; elsewhere none arrive)."""
    interrupts = _Interrupts()
    if threading.current_thread() is not threading.main_thread():
        yield interrupts
        return

    def count(signum, frame) -> None:
        interrupts.count += 1

    previous = signal.signal(signal.SIGINT, count)
    try:
        yield interrupts
    finally:
        signal.signal(signal.SIGINT, previous)


def _abort(control, thread: threading.Thread) -> None:
    """Stop the run now: Ray Train's controller kills its workers and exits (as on Ray's own Ctrl-C)."""
    import ray

    with contextlib.suppress(ray.exceptions.RayError, TimeoutError):
        controller = ray.get(control.get_controller.remote(), timeout=30)
        if controller is not None:
            ray.get(controller.abort.remote(), timeout=60)
    thread.join(timeout=60)


@contextlib.contextmanager
def _progress_drained(progress, on_progress):
    """Hand the leader's progress records to ``on_progress`` from a daemon thread while the block runs."""
    if progress is None:
        yield
        return
    from ray.util.queue import Empty

    finished = threading.Event()

    def drain() -> None:
        while not finished.is_set():
            try:
                on_progress(progress.get(block=True, timeout=0.5))
            except Empty:
                continue
        while not progress.empty():  # the last records, sent just before fit() returned
            on_progress(progress.get_nowait())

    reader = threading.Thread(target=drain, name="progress", daemon=True)
    reader.start()
    try:
        yield
    finally:
        finished.set()
        reader.join(timeout=2)
        progress.shutdown()


def run_storage(config: ExperimentConfig, storage_dir: Path) -> Location:
    """Where Ray Train keeps a run's reports and checkpoints: ``runner.storage_path``, else ``storage_dir``."""
    return location(config.runner.storage_path or storage_dir, "runner.storage_path")


def _new_attempt_name(storage: Location) -> str:
    existing = {name for name in storage.folders() if name.startswith("attempt-")}
    return next(f"attempt-{n}" for n in range(1, len(existing) + 2) if f"attempt-{n}" not in existing)


def connect(config: ExperimentConfig, dashboard: bool = False) -> None:
    """Join ``runner.address`` (or RAY_ADDRESS), else start a quiet local cluster.

    ``dashboard``: give a local cluster its dashboard, whose state API Ray Train
    needs to free the CPUs of a run whose driver was killed (a stopped tuning trial).
    """
    # The controller reads worker reports once per health check; a short period keeps
    # per-validation reports from stalling the workers.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    import ray

    if ray.is_initialized():
        return
    address = config.runner.address or os.environ.get("RAY_ADDRESS")
    _owner_only_auth_token(create=address is None)
    try:
        ray.init(
            address=address,
            log_to_driver=False,
            logging_level=logging.ERROR,
            runtime_env=_driver_runtime_env({"PYTHONWARNINGS": "ignore::FutureWarning", **freed_memory_environment()}),
            # A local cluster needs no dashboard (its processes take CPU from the workers);
            # jobs are submitted to a cluster started with `ray start`, which has one.
            include_dashboard=False if address is None and not dashboard else None,
        )
    except (ConnectionError, RuntimeError, ValueError) as error:
        where = address or "a new local cluster"
        raise ConfigError(
            f"runner.address: cannot connect to Ray at {where} ({str(error).splitlines()[0]}); "
            "check the address, or leave it unset to start a local cluster"
        ) from None


def _owner_only_auth_token(create: bool) -> None:
    """Keep the cluster's auth token readable by its owner only.

    A new local cluster (``ray.init()``) writes ``~/.ray/auth_token`` world-readable
    when none exists: make it first, 0600, the way Ray makes it (``secrets.token_hex(32)``);
    tighten a token file of ours that others can read.
    """
    if os.environ.get("RAY_AUTH_MODE", "token").lower() != "token" or os.environ.get("RAY_AUTH_TOKEN"):
        return
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if create and not path.exists() and "RAY_AUTH_TOKEN_PATH" not in os.environ:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it meanwhile: tightened below
            pass
        else:
            with os.fdopen(handle, "w") as token:
                token.write(secrets.token_hex(32))
    with contextlib.suppress(OSError):
        owner_and_mode = path.stat()
        if owner_and_mode.st_uid == os.getuid() and owner_and_mode.st_mode & 0o077:
            path.chmod(0o600)


def _driver_runtime_env(env_vars: dict[str, str]) -> dict[str, Any] | None:
    """``env_vars`` less those a submitted job's runtime env already sets.

    Inside ``ray job submit`` the job's runtime env (cluster/runtime_env.yaml)
    reaches every worker, and ``ray.init`` refuses a runtime env that repeats
    any of its environment variables; the job's values win.
    """
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    job_vars = (job.get("runtime_env") or {}).get("env_vars") or {}
    own = {name: value for name, value in env_vars.items() if name not in job_vars}
    return {"env_vars": own} if own else None


STALL_MARK = "stalled at meta-step"  # in the error a worker raises when a collective timed out


def _user_error(error: Exception, storage: Location) -> MetarecError:
    """The most useful failure, as one line.

    Ray Train's controller failing to write the run's state to ``storage`` (a
    full or read-only disk); else, of the workers' failures, in order: an error
    the user can fix (any rank); a worker that waited in a collective (it names
    the meta-step); a worker Ray lost contact with (frozen, killed, out of
    memory); else the first failure, naming its rank. A frozen worker shows up
    as either of the middle two, whichever Ray notices first.
    """
    controller_failure = getattr(error, "controller_failure", None)
    if isinstance(controller_failure, OSError):
        return CheckpointError(not_written_message("Ray Train's record of the run's checkpoints", storage,
                                                   controller_failure))
    failures = sorted((getattr(error, "worker_failures", {}) or {}).items())
    for _rank, failure in failures:
        cause: BaseException | None = failure
        while cause is not None:
            if isinstance(cause, MetarecError):
                return type(cause)(str(cause))
            cause = getattr(cause, "cause", None) or cause.__cause__
    last_lines = {rank: (str(failure).strip().splitlines() or [type(failure).__name__])[-1]
                  for rank, failure in failures}
    for rank, line in last_lines.items():
        if STALL_MARK in line:  # "RuntimeError: worker 1 stalled at ...": keep our sentence
            return TrainingError(line[line.find(f"worker {rank} "):])
    for rank, line in last_lines.items():
        if _lost_contact(line):
            return TrainingError(
                f"worker {rank} stopped responding (its process froze, died or ran out of memory); "
                f"Ray said: {line}"
            )
    if last_lines:
        rank, line = next(iter(last_lines.items()))
        return TrainingError(f"worker {rank} failed: {line}")
    return TrainingError(f"the Ray Train run failed: {str(error).strip().splitlines()[0]}")


def not_written_message(what: str, where: Path | str, error: OSError) -> str:
    """One line for a checkpoint write that failed (pyarrow's OSErrors carry the errno, not its text)."""
    reason = os.strerror(error.errno) if error.errno else str(error).splitlines()[0]
    return (f"{what} could not be written to {where} ({reason}); the checkpoint before it is intact: "
            f"make room there (or set runner.storage_path), then continue with metarec-dist train --resume RUN_DIR")


def _lost_contact(line: str) -> bool:
    """Whether a Ray error line says the worker's actor is gone or unreachable."""
    marks = ("ActorUnavailableError", "ActorDiedError", "is unavailable", "actor died", "actor is dead")
    return any(mark in line for mark in marks)


# --- worker side ------------------------------------------------------------------------


def _worker_loop(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: restore, build, loop, report."""
    import ray.train
    from ray.train import Checkpoint
    from ray.util.queue import Full

    from metarec_dist.device import use_device, worker_device
    from metarec_dist.distributed.checkpoint import read_checkpoint, write_checkpoint
    from metarec_dist.distributed.collective import TorchCollective
    from metarec_dist.distributed.deepspeed_ops import load_deepspeed_ops
    from metarec_dist.distributed.optimizer import WorkerOptimizer
    from metarec_dist.meta.trainer import Trainer
    from metarec_dist.meta.training_data import load_training_data

    # The same config and plan in every worker.
    config = ExperimentConfig.model_validate(loop_config["config"])
    plan = DomainPlan.from_json(loop_config["plan"])
    progress = loop_config.get("progress")  # a ray.util.queue.Queue to the driver, or None
    control = loop_config["control"]
    device = worker_device()
    use_device(device)  # first: the collective's buffers and DeepSpeed's accelerator follow it
    collective = TorchCollective()
    rank = collective.rank
    node = f"{socket.gethostname()} ({ray.util.get_node_ip_address()})"

    def phase(name: str, detail: str = "") -> None:  # for the driver's start-up watchdog
        control.phase.remote(rank, node, name, detail)

    phase(STARTING, f"pid {os.getpid()}, {device}")
    torch.set_num_threads(config.runner.cpus_per_worker)
    stop = StopAgreement(config.runner.collective_timeout_s)
    asked_to_stop = StopPoll(control) if rank == 0 else (lambda: False)

    try:
        # Build: the target and this worker's own sources, nothing else.
        phase("loading data", f"the target and {len(plan.shard(rank))} sources from {config.data.store}")
        data = load_training_data(config, plan.shard(rank))
        if config.runner.zero_stage is not None and device.type == "cpu":
            load_deepspeed_ops(phase)  # DeepSpeed's CPU accelerator builds an op; CUDA's needs none here
        phase("building the model and optimizer")
        trainer = Trainer(
            config, data, progress=False, collective=collective,
            make_optimizer=lambda model, lrs, cfg: WorkerOptimizer(model, lrs, cfg, data.target, collective),
            device=device,
        )
        # Restore: this run's last checkpoint (a worker was replaced), else the run being resumed.
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            phase("restoring", "the run's last checkpoint")
            with checkpoint.as_directory() as directory:
                step = read_checkpoint(Path(directory), trainer, trainer.optimizer, plan)
            log.warning("worker %d restored from its run's checkpoint at step %d", rank, step)
        elif loop_config.get("resume_from"):
            phase("restoring", f"the checkpoint {loop_config['resume_from']}")
            with location(loop_config["resume_from"], "--resume").as_local_folder() as directory:
                read_checkpoint(directory, trainer, trainer.optimizer, plan)
    except MetarecError as error:  # the same config everywhere: every worker fails here alike
        _report_final(rank, {ERROR_FILE: json.dumps({"error": str(error)}).encode()})
        return

    # Loop: every worker reports at every validation and checkpoint (reports synchronise).
    every = config.runner.checkpoint_every

    def report_validation(entry: dict[str, Any]) -> None:
        ray.train.report({"step": entry["step"], "train_loss": entry["train_loss"], **entry["valid"],
                          "early_stopped": trainer.loop.stopped})

    def after_step(step: int) -> None:
        if progress is not None and rank == 0:
            try:
                progress.put_nowait(trainer.progress_record(step))
            except Full:  # nobody is reading (the driver went away): progress is optional
                pass
        stopping = stop.should_stop(asked_to_stop())
        if stopping or (every and step % every == 0 and step < config.train.steps and not trainer.loop.stopped):
            _checkpoint(step, stopping)
        if stopping:
            raise _StopRequested

    def _checkpoint(step: int, stopping: bool) -> None:
        try:
            with tempfile.TemporaryDirectory() as directory:
                write_checkpoint(Path(directory), trainer, trainer.optimizer, plan)
                if stopping and rank == 0:
                    (Path(directory) / INTERRUPTED_FILE).write_text(json.dumps({"step": step}))
                ray.train.report({"step": step}, checkpoint=Checkpoint.from_directory(directory))
        except OSError as error:  # a full or unwritable disk: a retry would fail the same way
            where = error.filename or ray.train.get_context().get_storage().experiment_fs_path
            message = not_written_message(f"the checkpoint of step {step}", where, error)
            control.fail.remote(message)  # the driver stops the run: Ray would retry it in vain
            raise CheckpointError(message) from None

    phase(TRAINING)
    try:
        outcome = trainer.run(on_validation=report_validation, after_step=after_step, test=loop_config["test"])
    except _StopRequested:
        return  # the driver reads the interruption from the checkpoint just reported
    except TrainingError as error:
        # Every worker sees the same losses, so all of them stop here together; reporting the
        # error (instead of raising) keeps Ray from retrying a run that would fail again, and
        # the last good checkpoint stays in storage.
        _report_final(rank, {ERROR_FILE: json.dumps({"error": str(error)}).encode()})
        return
    except Exception as error:  # gloo's RuntimeError, or Ray Train's CollectiveTimeoutError at a report
        if "timed out" not in str(error).lower() and "timeout" not in str(error).lower():
            raise
        # A collective another worker never reached: say who waited, and where.
        raise RuntimeError(
            f"worker {rank} {STALL_MARK} {trainer.loop.step + 1}: a collective waited "
            f"{config.runner.collective_timeout_s} s for a worker that never reached it "
            f"({str(error).strip().splitlines()[0]})"
        ) from None
    stop.close()

    # Report: the leader's results and best weights travel as the final checkpoint.
    model = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in outcome.best_state.items()}, model)
    _report_final(rank, {RESULTS_FILE: json.dumps(outcome.results or {}).encode(),
                         MODEL_FILE: model.getvalue()})


class _StopRequested(Exception):
    """Raised by a worker's step hook once every worker has agreed to stop (a checkpoint is written)."""


def _report_final(rank: int, files: dict[str, bytes]) -> None:
    """The last report of every worker; the leader's carries ``files`` as a checkpoint."""
    import ray.train
    from ray.train import Checkpoint

    if rank != 0:
        ray.train.report({"done": 1})
        return
    with tempfile.TemporaryDirectory() as directory:
        for name, content in files.items():
            (Path(directory) / name).write_bytes(content)
        ray.train.report({"done": 1}, checkpoint=Checkpoint.from_directory(directory))
