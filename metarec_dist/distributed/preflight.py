"""Checks before any worker starts: the cluster has the resources, and every node sees the data.

A run whose workers would wait forever for CPUs or GPUs the cluster lacks, or
fail one by one on a store or storage path only the driver can see, stops here
with one line naming the field, the path and the node.
"""

from __future__ import annotations

import uuid

from metarec_dist.data.store import DomainStore
from metarec_dist.errors import ConfigError, MetarecError
from metarec_dist.meta.config import ExperimentConfig
from metarec_dist.storage import Location, location

NODE_CHECK_TIMEOUT_S = 120


def check_resources(config: ExperimentConfig) -> None:
    """Enough CPUs (and GPUs, if asked for) in the cluster for ``runner.workers``."""
    import ray

    runner = config.runner
    resources = ray.cluster_resources()
    wanted = runner.workers * runner.cpus_per_worker
    if resources.get("CPU", 0) < wanted:
        raise ConfigError(
            f"runner.workers: {runner.workers} workers x {runner.cpus_per_worker} CPUs need {wanted} CPUs, "
            f"the Ray cluster has {resources.get('CPU', 0):g}; lower runner.workers or runner.cpus_per_worker"
        )
    if runner.use_gpu is True and resources.get("GPU", 0) < runner.workers:
        raise ConfigError(
            f"runner.use_gpu: {runner.workers} workers need {runner.workers} GPUs, the cluster has "
            f"{resources.get('GPU', 0):g}; set runner.use_gpu to auto or false"
        )


def uses_gpus(setting: bool | str) -> bool:
    """``runner.use_gpu``: ``auto`` means GPUs when the cluster has any."""
    if setting == "auto":
        import ray

        return ray.cluster_resources().get("GPU", 0) > 0
    return bool(setting)


def check_access(store: str, domains: list[str], storage: str) -> str | None:
    """What this machine cannot do of what a worker does with the data: read each domain's metadata and
    tables in ``store`` and write a file in ``storage``. None when it can; else one line."""
    try:
        opened = DomainStore(store)
        for name in domains:
            domain = opened.open(name)
            domain.meta  # noqa: B018 (reading it is the check)
            if not domain.path.child("sequences.parquet").is_file():
                return f"data.store: {domain.path}/sequences.parquet is missing"
    except MetarecError as error:
        return str(error)
    except OSError as error:
        return f"data.store: cannot read {store} ({str(error).splitlines()[0]})"
    folder = location(storage, "runner.storage_path")
    probe = folder.child(f".metarec-probe-{uuid.uuid4().hex}")
    try:
        folder.filesystem.create_dir(folder.path, recursive=True)
        probe.write_bytes(b"")
        probe.delete_file()
    except OSError as error:
        return f"runner.storage_path: {storage} is not writable ({str(error).splitlines()[0]}); choose another"
    return None


def check_every_node(config: ExperimentConfig, storage: Location) -> None:
    """``check_access`` on every live node of the cluster (a zero-CPU task pinned to each); the first
    failure, naming its node, is raised as a ``ConfigError``."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    domains = [config.data.target, *config.data.sources]
    nodes = [node for node in ray.nodes() if node["Alive"]]
    remote_check = ray.remote(num_cpus=0, max_retries=0)(check_access)
    pending = {
        remote_check.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
        ).remote(config.data.store, domains, storage.uri): node
        for node in nodes
    }
    done, late = ray.wait(list(pending), num_returns=len(pending), timeout=NODE_CHECK_TIMEOUT_S)
    for ref in done:
        try:
            failure = ray.get(ref)
        except ray.exceptions.RayError as error:
            failure = f"the check could not run there ({str(error).strip().splitlines()[0]})"
        if failure is not None:
            raise ConfigError(f"node {_name(pending[ref])}: {failure}")
    if late:
        names = ", ".join(_name(pending[ref]) for ref in late)
        raise ConfigError(f"node {names}: did not answer a check of the store and storage path within "
                          f"{NODE_CHECK_TIMEOUT_S} s; check that the node is healthy (ray status)")


def _name(node: dict) -> str:
    return f"{node['NodeManagerAddress']} ({node['NodeID'][:8]})"
