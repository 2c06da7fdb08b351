"""Distributed meta-training as the number of source domains grows, and 1 against 2 workers.

Data: synthetic stores (``metarec_dist.data.synthetic``) with 2 to 256 related
source domains of 150-400 users and 100-300 items each, and the default target
keeping 10% of its users. Model: ``configs/quickstart.yaml`` (width 32, one
encoder layer, 4 x 32 product codebook), ZeRO-2 encoder engine, no
checkpoints, and ``--tasks-per-step`` tasks per meta-step per worker (default
1: with 2 sources on 2 workers a worker owns a single source, so every
setting runs the same work per worker).

For each setting, one Ray Train run of ``--steps`` meta-steps, validated at
the half and at the end; the rate is the second half's meta-steps over its
wall time (the first half is the warm-up). Reported per run: meta-steps/s,
each worker's peak resident memory and its parameter counts (shared, target,
its own sources' tables). Two sweeps, measured in one process, one after the
other:

- domains: 2, 16, 64, 256 sources on 2 workers (target: flat step time);
- weak scaling: 16 sources on 1 worker against 32 on 2 (the same work per
  worker; efficiency = rate(2) / rate(1), target >= 90%).

    python benchmarks/bench_scaling.py --output benchmarks/results/scaling.json
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from metarec_dist.machine import machine_description
from metarec_dist.config import load_config
from metarec_dist.data.store import DomainStore
from metarec_dist.data.synthetic import SyntheticConfig, generate_store
from metarec_dist.dist.runner import train_distributed
from metarec_dist.meta.config import RunConfig
from metarec_dist.report.run_directory import write_json
from metarec_dist.report.tables import format_table

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


def make_store(root: Path, sources: int) -> tuple[DomainStore, list[str]]:
    store = DomainStore(root / f"store-{sources}")
    config = SyntheticConfig(related_sources=sources, unrelated_sources=0, noise_sources=0,
                             source_users=(150, 400), source_items=(100, 300))
    results = generate_store(config, store)
    return store, [r.name for r in results if r.kind != "target"]


def one_run(store: DomainStore, sources: list[str], workers: int, steps: int, tasks: int, workdir: Path) -> dict:
    config = load_config(RunConfig, QUICKSTART, [
        f"data.store={store.root}", f"data.sources={sources}", f"train.steps={steps}",
        f"train.eval_every={steps // 2}", "train.patience=10", f"meta.tasks_per_step={tasks}",
        f"runner.workers={workers}", "runner.checkpoint_every=0", "runner.zero_stage=2",
        f"output_dir={workdir}",
    ])
    started = time.perf_counter()
    results = train_distributed(config, Path(tempfile.mkdtemp(dir=workdir))).results
    half, end = results["history"][-2], results["history"][-1]
    per_worker = results["per_worker"]
    return {
        "sources": len(sources),
        "workers": workers,
        "meta_steps_per_s": (end["step"] - half["step"]) / (end["seconds"] - half["seconds"]),
        "peak_rss_mb_per_worker": [round(w["peak_rss_mb"]) for w in per_worker],
        "source_parameters_per_worker": [w["parameters"]["sources"] for w in per_worker],
        "shared_parameters": per_worker[0]["parameters"]["shared"],
        "wall_seconds_with_startup": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domains", nargs="+", type=int, default=[2, 16, 64, 256])
    parser.add_argument("--steps", type=int, default=80, help="meta-steps per run (rate over the second half)")
    parser.add_argument("--tasks-per-step", type=int, default=1, help="tasks per meta-step per worker")
    parser.add_argument("--repeats", type=int, default=1, help="runs per setting; the median rate is reported")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/scaling.json"))
    args = parser.parse_args()

    machine = machine_description()
    print(f"machine: {machine}")
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as scratch:
        workdir = Path(scratch)
        settings = [("domains", n, 2) for n in args.domains] + [("weak", 16, 1), ("weak", 32, 2)]
        for sweep, count, workers in settings:
            store, sources = make_store(workdir, count)
            runs = [one_run(store, sources, workers, args.steps, args.tasks_per_step, workdir) for _ in range(args.repeats)]
            rates = [run["meta_steps_per_s"] for run in runs]
            row = {**runs[0], "sweep": sweep, "meta_steps_per_s": statistics.median(rates), "rates": rates}
            print(f"{sweep:7s} {count:4d} sources on {workers} worker(s): {row['meta_steps_per_s']:.2f} meta-steps/s, "
                  f"peak RSS per worker {row['peak_rss_mb_per_worker']} MB", flush=True)
            rows.append(row)

    domain_rows = [r for r in rows if r["sweep"] == "domains"]
    base = domain_rows[0]["meta_steps_per_s"]
    for row in domain_rows:
        total = sum(row["source_parameters_per_worker"])
        row["step_time_vs_first"] = round(base / row["meta_steps_per_s"], 3)
        row["largest_worker_share_of_source_tables"] = round(max(row["source_parameters_per_worker"]) / total, 3)
    one, two = (r for r in rows if r["sweep"] == "weak")
    efficiency = two["meta_steps_per_s"] / one["meta_steps_per_s"]

    print()
    print(format_table(
        [{"sources": r["sources"], "workers": r["workers"], "meta-steps/s": round(r["meta_steps_per_s"], 2),
          "step time vs 2": r["step_time_vs_first"], "peak MB/worker": max(r["peak_rss_mb_per_worker"]),
          "largest share of tables": r["largest_worker_share_of_source_tables"]} for r in domain_rows],
        ["sources", "workers", "meta-steps/s", "step time vs 2", "peak MB/worker", "largest share of tables"],
    ))
    print(f"\nweak scaling (16 sources per worker): 1 worker {one['meta_steps_per_s']:.2f} meta-steps/s, "
          f"2 workers {two['meta_steps_per_s']:.2f}: efficiency {efficiency:.1%}")
    write_json(args.output, {"machine": machine, "steps": args.steps, "repeats": args.repeats,
                             "tasks_per_step": args.tasks_per_step, "runs": rows,
                             "weak_scaling_efficiency": efficiency})
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
