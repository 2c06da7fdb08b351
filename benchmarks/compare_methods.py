"""Compare methods over seeds on one config: the transfer experiment's table.

Runs every (method, seed) pair in this process through the same Trainer the
CLI uses, then prints mean and standard deviation of the test metrics (model
selection on validation only) and writes a JSON file with every run.

    python benchmarks/compare_methods.py configs/quickstart.yaml \\
        --methods target_only uniform joint metarec --seeds 0 1 2 \\
        --method-set joint:train.pretrain_steps=300 --output benchmarks/results/quickstart.json

``--set`` applies to every run; ``--method-set METHOD:KEY=VALUE`` to one method;
``--variant NAME:KEY=VALUE[,KEY=VALUE]`` adds a named extra row (e.g. target-only
on the full target data).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from metarec_dist.config import load_config
from metarec_dist.machine import machine_description
from metarec_dist.meta.config import ExperimentConfig
from metarec_dist.meta.trainer import Trainer
from metarec_dist.meta.training_data import load_training_data
from metarec_dist.report.run_directory import write_json
from metarec_dist.report.tables import format_table

METRICS = ("NDCG@10", "HR@10", "NDCG@20", "HR@20", "MRR")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--methods", nargs="*", default=["target_only", "uniform", "joint", "metarec"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--method-set", action="append", default=[], help="METHOD:KEY=VALUE")
    parser.add_argument("--variant", action="append", default=[], help="NAME:KEY=VALUE[,KEY=VALUE]")
    parser.add_argument("--output", type=Path, help="JSON file with every run (written atomically)")
    return parser.parse_args()


def runs_to_make(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """(row label, overrides) for every method and variant."""
    per_method: dict[str, list[str]] = {}
    for item in args.method_set:
        method, _, override = item.partition(":")
        per_method.setdefault(method, []).append(override)
    rows = [(method, [f"method={method}", *per_method.get(method, [])]) for method in args.methods]
    for item in args.variant:
        name, _, overrides = item.partition(":")
        rows.append((name, overrides.split(",")))
    return rows


def main() -> None:
    args = parse_args()
    records = []
    started = time.perf_counter()
    machine = machine_description(torch=torch.__version__, threads=str(torch.get_num_threads()))
    for label, overrides in runs_to_make(args):
        for seed in args.seeds:
            config = load_config(ExperimentConfig, args.config, [*args.overrides, *overrides, f"train.seed={seed}"])
            data = load_training_data(config)
            results = Trainer(config, data, progress=False).run().results
            results.pop("history")
            if "source_weights" in results:
                results["source_weights"].pop("history")
            records.append({"label": label, "seed": seed, "overrides": overrides, "results": results})
            print(
                f"{label:<24} seed {seed}: test NDCG@10 {results['test']['NDCG@10']:.4f} "
                f"HR@10 {results['test']['HR@10']:.4f} (best step {results['best_step']}, "
                f"{results['wall_seconds']:.0f} s)",
                flush=True,
            )
            if args.output:  # after every run, so a stopped comparison keeps what it measured
                save(args, machine, summary_rows(records), records)

    rows = summary_rows(records)
    print()
    print(format_table(rows, ["method", "seeds", *METRICS, "seconds"]))
    print(f"total {time.perf_counter() - started:.0f} s on {machine['cpu_model']}, {machine['cpu_count']} cores, "
          f"bf16: {machine['cpu_bf16']}")
    if args.output:
        save(args, machine, rows, records)
        print(f"wrote {args.output}")


def save(args: argparse.Namespace, machine: dict, rows: list[dict], records: list[dict]) -> None:
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.output, {"config": str(args.config), "overrides": args.overrides, "machine": machine,
                             "table": rows, "runs": records})


def summary_rows(records: list[dict]) -> list[dict]:
    """Mean ± standard deviation of each test metric per row label."""
    rows = []
    for label in dict.fromkeys(record["label"] for record in records):
        mine = [record["results"] for record in records if record["label"] == label]
        row = {"method": label, "seeds": len(mine)}
        for metric in METRICS:
            values = [result["test"][metric] for result in mine]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            row[metric] = f"{statistics.mean(values):.4f} ± {spread:.4f}"
        row["seconds"] = round(statistics.mean(result["wall_seconds"] for result in mine), 1)
        rows.append(row)
    return rows


if __name__ == "__main__":
    main()
