"""Distributed meta-training as the number of source domains grows, and 1 against 2 workers.

Data: synthetic stores (``metarec_dist.data.synthetic``) with 2 to 256 related
source domains of 150-400 users and 100-300 items each, and the default target
keeping 10% of its users. Model: ``configs/quickstart.yaml`` (width 32, one
encoder layer, 4 x 32 product codebook), the default encoder engine (ZeRO
stage 0), no checkpoints, and ``--tasks-per-step`` tasks per meta-step per
worker (default 1: with 2 sources on 2 workers a worker owns a single source,
so every setting runs the same work per worker).

For each setting, one Ray Train run of ``--steps`` meta-steps, validated at
the half and at the end; the rate is the second half's meta-steps over its
wall time (the first half is the warm-up). Reported per run: meta-steps/s,
each worker's peak resident memory and its parameter counts (shared, target,
its own sources' tables). The settings of a sweep take turns, ``--repeats``
rounds, so machine noise hits them alike; tables give medians. Two sweeps,
measured in one process, one after the other:

- domains: 2, 16, 64, 256 sources on 2 workers (target: flat step time);
- weak scaling: one store of 32 sources; 2 workers (16 sources each) against
  1 worker owning exactly worker 0's 16 (the same domains, so the same work
  per worker; efficiency = rate(2) / rate(1), target >= 90%). It runs for the
  quick-start model and for each ``--weak-model`` (a larger model does more
  work per step for the same number of collectives). The 1-worker run is
  measured twice: on an idle machine, and with every other core kept busy by
  a spinning process at a Ray worker's niceness ("loaded"), which is what a
  worker of the 2-worker run sees (Ray's own processes then share the
  workers' cores). Each run also
  reports where a worker's meta-step time went: collectives (waiting for the
  slower worker included), the DeepSpeed engine, and the rest (the tasks'
  compute). The machine's own ceiling comes from the same meta-training of
  worker 0's shard without Ray, in one single-threaded process: alone, and
  with worker 1's shard training in a second process beside it (the cores'
  shared caches and memory bandwidth, with nothing of Ray or of the
  synchronisation between workers).

    python benchmarks/bench_scaling.py --output benchmarks/results/scaling.json
    python benchmarks/bench_scaling.py --domains --steps 160 --output benchmarks/results/scaling_weak.json
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from metarec_dist.allocator import keep_freed_memory
from metarec_dist.config import load_config
from metarec_dist.data.store import DomainStore
from metarec_dist.data.synthetic import SyntheticConfig, generate_store
from metarec_dist.distributed.runner import source_plan, train_distributed
from metarec_dist.machine import machine_description
from metarec_dist.meta.config import ExperimentConfig, RunnerConfig
from metarec_dist.meta.trainer import Trainer
from metarec_dist.meta.training_data import load_training_data
from metarec_dist.report.run_directory import write_json
from metarec_dist.report.tables import format_table

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


def make_store(root: Path, sources: int) -> tuple[DomainStore, list[str]]:
    store = DomainStore(root / f"store-{sources}")
    config = SyntheticConfig(related_sources=sources, unrelated_sources=0, noise_sources=0,
                             source_users=(150, 400), source_items=(100, 300))
    results = generate_store(config, store)
    return store, [r.name for r in results if r.kind != "target"]


# Larger models for the weak-scaling sweep (--weak-model): the Beauty experiments' encoder.
MODELS = {
    "quickstart": [],
    "beauty": ["model.width=64", "model.item_width=64", "model.encoder.layers=2", "model.encoder.max_length=50",
               "model.encoder.group_by_length=true", "train.batch_size=128"],
}


def run_config(store: DomainStore, sources: list[str], workers: int, steps: int, tasks: int, workdir: Path,
               model: str = "quickstart") -> ExperimentConfig:
    return load_config(ExperimentConfig, QUICKSTART, [
        f"data.store={store.root}", f"data.sources={sources}", f"train.steps={steps}",
        f"train.eval_every={steps // 2}", "train.patience=10", f"meta.tasks_per_step={tasks}",
        f"runner.workers={workers}", "runner.checkpoint_every=0",
        f"output_dir={workdir}", *MODELS[model],
    ])


def second_half_rate(history: list[dict]) -> float:
    """Meta-steps per second between the last two validations (the half and the end)."""
    half, end = history[-2], history[-1]
    return (end["step"] - half["step"]) / (end["seconds"] - half["seconds"])


def one_run(store: DomainStore, sources: list[str], workers: int, steps: int, tasks: int, workdir: Path,
            model: str = "quickstart") -> dict:
    config = run_config(store, sources, workers, steps, tasks, workdir, model)
    started = time.perf_counter()
    results = train_distributed(config, Path(tempfile.mkdtemp(dir=workdir))).results
    per_worker = results["per_worker"]
    return {
        "sources": len(sources),
        "workers": workers,
        "model": model,
        "meta_steps_per_s": second_half_rate(results["history"]),
        "peak_rss_mb_per_worker": [round(w["peak_rss_mb"]) for w in per_worker],
        "source_parameters_per_worker": [w["parameters"]["sources"] for w in per_worker],
        "shared_parameters": per_worker[0]["parameters"]["shared"],
        "main_step_ms_per_worker": [w["main_step_ms"] for w in per_worker],
        "wall_seconds_with_startup": time.perf_counter() - started,
    }


def _train_in_process(config_json: dict, results: multiprocessing.Queue) -> None:
    """Child process: the run's meta-training here, one thread, no Ray; puts its rate on ``results``."""
    keep_freed_memory()  # as every metarec-dist process does
    torch.set_num_threads(1)
    config = ExperimentConfig.model_validate(config_json)
    outcome = Trainer(config, load_training_data(config), progress=False).run()
    results.put(second_half_rate(outcome.results["history"]))


def in_process_rate(config: ExperimentConfig, beside: ExperimentConfig | None = None) -> float:
    """Meta-steps/s of ``config`` trained without Ray, optionally with ``beside`` training in a second process.

    The second run is given twice the steps and stopped when the measured one
    ends, so it runs beside the whole measurement.
    """
    import ray

    ray.shutdown()  # no local cluster idling beside it (the next Ray run starts a new one)
    spawn = multiprocessing.get_context("spawn")
    results, ignored = spawn.Queue(), spawn.Queue()  # both kept alive until the children have started
    measured = spawn.Process(target=_train_in_process, args=(config.model_dump(mode="json"), results))
    partner = None
    if beside is not None:
        longer = beside.model_copy(update={"train": beside.train.model_copy(update={"steps": 2 * beside.train.steps})})
        partner = spawn.Process(target=_train_in_process, args=(longer.model_dump(mode="json"), ignored))
        partner.start()
    measured.start()
    try:
        return results.get(timeout=3600)
    finally:
        measured.join()
        if partner is not None:
            partner.kill()
            partner.join()


def _spin() -> None:
    os.nice(15)  # as niced as a Ray worker: the same claim on the CPU as a second worker
    while True:
        pass


@contextlib.contextmanager
def busy_cores(count: int) -> Iterator[None]:
    """``count`` processes spinning on a core each, while the block runs."""
    spinners = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(count)]
    for spinner in spinners:
        spinner.start()
    try:
        yield
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.join()


def time_split(row: dict) -> str:
    """Mean over workers of a meta-step's time: collectives / DeepSpeed engine / the rest (compute)."""
    parts = row["main_step_ms_per_worker"]
    mean = {key: statistics.mean(p[key] for p in parts) for key in parts[0]}
    rest = mean["total"] - mean["in_collectives"] - mean["in_encoder_engine"]
    return (f"{mean['total']:.0f} ms = collectives {mean['in_collectives']:.0f} + engine "
            f"{mean['in_encoder_engine']:.0f} + compute {rest:.0f}")


def take_turns(settings: dict, repeats: int) -> dict[object, list[dict]]:
    """Each setting's runs: every setting once per round, ``repeats`` rounds (noise hits them alike)."""
    runs: dict[object, list[dict]] = {name: [] for name in settings}
    for _ in range(repeats):
        for name, run in settings.items():
            runs[name].append(run())
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domains", nargs="*", type=int, default=[2, 16, 64, 256],
                        help="numbers of sources for the domain sweep (none: weak scaling only)")
    parser.add_argument("--steps", type=int, default=80, help="meta-steps per run (rate over the second half)")
    parser.add_argument("--tasks-per-step", type=int, default=1, help="tasks per meta-step per worker")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of runs; the median rate is reported")
    parser.add_argument("--weak-model", nargs="*", default=["beauty"], choices=sorted(set(MODELS) - {"quickstart"}),
                        help="larger models for the weak-scaling sweep, besides the quick-start one")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/scaling.json"))
    args = parser.parse_args()

    machine = machine_description()
    print(f"machine: {machine}")
    rows: list[dict] = []
    references: dict[str, dict[str, float]] = {}

    def ray_run(store: DomainStore, sources: list[str], workers: int, model: str = "quickstart",
                loaded: bool = False) -> Callable[[], dict]:
        def run() -> dict:
            with busy_cores(os.cpu_count() - workers) if loaded else contextlib.nullcontext():
                return one_run(store, sources, workers, args.steps, args.tasks_per_step, workdir, model)
        return run

    def record(sweep: str, runs: list[dict], loaded: bool = False) -> None:
        rates = [run["meta_steps_per_s"] for run in runs]
        median = sorted(runs, key=lambda run: run["meta_steps_per_s"])[len(runs) // 2]
        row = {**median, "sweep": sweep, "loaded": loaded, "meta_steps_per_s": statistics.median(rates),
               "rates": rates}
        print(f"{sweep:7s} {row['model']:10s} {row['sources']:4d} sources on {row['workers']} worker(s)"
              f"{' (loaded)' if loaded else ''}: {row['meta_steps_per_s']:.2f} meta-steps/s {rates}, peak RSS per "
              f"worker {row['peak_rss_mb_per_worker']} MB; {time_split(row)}", flush=True)
        rows.append(row)

    with tempfile.TemporaryDirectory() as scratch:
        workdir = Path(scratch)
        stores = {count: make_store(workdir, count) for count in args.domains}
        runs = take_turns({count: ray_run(*stores[count], workers=2) for count in args.domains}, args.repeats)
        for count in args.domains:
            record("domains", runs[count])
        store, sources = make_store(workdir, 32)
        # The 1-worker run owns exactly worker 0's shard of the 2-worker plan: the same domains.
        plan = source_plan(run_config(store, sources, 2, args.steps, args.tasks_per_step, workdir))
        for model in ["quickstart", *args.weak_model]:
            own, other = (run_config(store, plan.shard(rank), 1, args.steps, args.tasks_per_step, workdir, model)
                          for rank in (0, 1))
            runs = take_turns({
                "one": ray_run(store, plan.shard(0), workers=1, model=model),
                "loaded": ray_run(store, plan.shard(0), workers=1, model=model, loaded=True),
                "two": ray_run(store, sources, workers=2, model=model),
                "no_ray_alone": lambda own=own: {"meta_steps_per_s": in_process_rate(own)},
                "no_ray_beside": lambda own=own, other=other: {"meta_steps_per_s": in_process_rate(own, beside=other)},
            }, args.repeats)
            record("weak", runs["one"])
            record("weak", runs["loaded"], loaded=True)
            record("weak", runs["two"])
            references[model] = {}
            for name in ("no_ray_alone", "no_ray_beside"):
                rates = [run["meta_steps_per_s"] for run in runs[name]]
                references[model] |= {name: statistics.median(rates), f"{name}_rates": rates}
            print(f"weak    {model:10s} worker 0's shard without Ray: {references[model]['no_ray_alone']:.2f} "
                  f"meta-steps/s alone, {references[model]['no_ray_beside']:.2f} beside worker 1's", flush=True)

    domain_rows = [r for r in rows if r["sweep"] == "domains"]
    base = domain_rows[0]["meta_steps_per_s"] if domain_rows else None  # step time against the first setting
    for row in domain_rows:
        total = sum(row["source_parameters_per_worker"])
        row["step_time_vs_first"] = round(base / row["meta_steps_per_s"], 3)
        row["largest_worker_share_of_source_tables"] = round(max(row["source_parameters_per_worker"]) / total, 3)
    weak = {}
    for model in ["quickstart", *args.weak_model]:
        one, loaded, two = (r for r in rows if r["sweep"] == "weak" and r["model"] == model)
        reference = references[model]
        weak[model] = {"one_worker": one["meta_steps_per_s"], "one_worker_loaded": loaded["meta_steps_per_s"],
                       "two_workers": two["meta_steps_per_s"],
                       "efficiency": two["meta_steps_per_s"] / one["meta_steps_per_s"],
                       "efficiency_vs_loaded": two["meta_steps_per_s"] / loaded["meta_steps_per_s"],
                       **reference,
                       "machine_ceiling": reference["no_ray_beside"] / reference["no_ray_alone"]}

    print()
    if domain_rows:
        print(format_table(
            [{"sources": r["sources"], "workers": r["workers"], "meta-steps/s": round(r["meta_steps_per_s"], 2),
              "step time vs 2": r["step_time_vs_first"], "peak MB/worker": max(r["peak_rss_mb_per_worker"]),
              "largest share of tables": r["largest_worker_share_of_source_tables"]} for r in domain_rows],
            ["sources", "workers", "meta-steps/s", "step time vs 2", "peak MB/worker", "largest share of tables"],
        ))
    for model, result in weak.items():
        print(f"weak scaling, {model} model (16 sources per worker): 1 worker {result['one_worker']:.2f} "
              f"meta-steps/s ({result['one_worker_loaded']:.2f} loaded), 2 workers {result['two_workers']:.2f}: "
              f"efficiency {result['efficiency']:.1%} ({result['efficiency_vs_loaded']:.1%} against the loaded "
              f"1-worker run); without Ray, a second training process costs the first "
              f"{1 - result['machine_ceiling']:.1%} (ceiling {result['machine_ceiling']:.1%})")
    write_json(args.output, {"machine": machine, "steps": args.steps, "repeats": args.repeats,
                             "tasks_per_step": args.tasks_per_step,
                             "zero_stage": RunnerConfig().zero_stage,
                             "runs": rows, "weak_scaling": weak})
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
