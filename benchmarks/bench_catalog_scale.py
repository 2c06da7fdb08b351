"""Training-step time and peak memory as the catalog grows: what a step costs at 10k to 10M items.

Data: one domain per catalog size, generated with ``metarec-dist data
generate-log`` (every item at least once, Zipf popularity, 5 events per item,
a user per 5 items) into ``--store`` and reused by later runs.

Settings, each in a fresh process (its peak resident memory is the process's):
- ``target_only``: one SASRec-style step on the target (batch 128 x 50, width 64);
- ``metarec``: one meta-step (2 tasks, 1 inner step, a 16 x 256 product
  codebook) with two sources of ``min(items, --source-items)`` items;
- in three model settings: ``as configured`` (``model.loss: auto``: the full
  softmax up to ``model.full_softmax_max_items`` items, the sampled one above,
  row-sparse tables with it); ``sampled`` (``model.loss=sampled`` at every
  size: whether a step's cost depends on the catalog); ``full, dense`` (the full
  softmax and dense table gradients, how every step ran before), up to
  ``--dense-max-items`` (beyond it the logits do not fit in memory).
A process warms up, then times ``--steps`` steps one by one; the table shows
the median step and the step time relative to the same setting at the
smallest catalog.

    python benchmarks/bench_catalog_scale.py --items 10000 100000 1000000 10000000
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from metarec_dist.data.interaction_log import generate_interaction_domain
from metarec_dist.data.store import DomainStore
from metarec_dist.machine import machine_description, peak_resident_mb
from metarec_dist.report.run_directory import write_json
from metarec_dist.report.tables import format_table

MODEL = {"width": 64, "item_width": 64, "vq": {"num_codebooks": 16, "codewords": 256, "normalize": True},
         "encoder": {"layers": 2, "heads": 2, "max_length": 50, "dropout": 0.3}}
SETTINGS = {"as configured": {}, "sampled": {"loss": "sampled"},
            "full, dense": {"loss": "full", "item_gradients": "dense"}}


def domain_name(items: int, role: str = "target") -> str:
    return f"log-{items}" if role == "target" else f"log-{items}-source-{role}"


def ensure_domain(store: DomainStore, items: int, role: str = "target") -> None:
    name = domain_name(items, role)
    if name not in store:
        started = time.perf_counter()
        seed = items + {"target": 0, "a": 1, "b": 2}[role]
        generate_interaction_domain(store, name, 5 * items, max(items // 5, 100), items, seed=seed)
        print(f"generated {name} in {time.perf_counter() - started:.1f} s", flush=True)


def measure(store: Path, method: str, items: int, source_items: int, setting: str, steps: int) -> dict:
    """In this process: build the trainer, warm up, time ``steps`` main steps one by one."""
    from metarec_dist.meta.config import ExperimentConfig
    from metarec_dist.meta.trainer import Trainer
    from metarec_dist.meta.training_data import load_training_data

    sources = [domain_name(source_items, role) for role in ("a", "b")] if method == "metarec" else []
    config = ExperimentConfig.model_validate({
        "method": method,
        "data": {"store": str(store), "target": domain_name(items), "sources": sources},
        "model": {**MODEL, **SETTINGS[setting]},
        "meta": {"tasks_per_step": 2, "inner_steps": 1, "inner_lr": 0.1},
        "train": {"batch_size": 128, "steps": steps, "threads": torch.get_num_threads()},
    })
    trainer = Trainer(config, load_training_data(config), progress=False)
    step = trainer.steps.for_method(method)
    for index in range(3):  # warm-up: allocator, kernels
        step(index)
    times = []
    for index in range(steps):
        started = time.perf_counter()
        step(index)
        times.append(time.perf_counter() - started)
    return {"step_ms": 1000 * statistics.median(times), "step_ms_all": [1000 * t for t in times],
            "peak_rss_mb": peak_resident_mb(),
            "full_softmax": trainer.model.uses_full_softmax(domain_name(items))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, nargs="+", default=[10_000, 100_000, 1_000_000, 10_000_000])
    parser.add_argument("--source-items", type=int, default=1_000_000, help="largest source catalog (metarec)")
    parser.add_argument("--dense-max-items", type=int, default=100_000)
    parser.add_argument("--methods", nargs="+", default=["target_only", "metarec"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--store", type=Path, default=Path("bench-runs/catalog-scale-store"))
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/catalog_scale.json"))
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)  # internal: method items source_items setting
    args = parser.parse_args()

    if args.child:
        method, items, source_items, setting = args.child
        print(json.dumps(measure(args.store, method, int(items), int(source_items), setting, args.steps)))
        return

    machine = machine_description(torch=torch.__version__, threads=str(torch.get_num_threads()))
    print(f"machine: {machine}", flush=True)
    store = DomainStore(args.store)
    for items in args.items:
        ensure_domain(store, items)
    if "metarec" in args.methods:
        for items in sorted({min(i, args.source_items) for i in args.items}):
            for role in ("a", "b"):
                ensure_domain(store, items, role)

    rows = []
    for method in args.methods:
        for setting in args.settings:
            for items in args.items:
                if setting == "full, dense" and items > args.dense_max_items:
                    continue
                source_items = min(items, args.source_items)
                command = [sys.executable, __file__, "--store", str(args.store), "--steps", str(args.steps),
                           "--child", method, str(items), str(source_items), setting]
                result = subprocess.run(command, capture_output=True, text=True)
                if result.returncode != 0:
                    raise SystemExit(f"{method} at {items:,} items failed:\n{result.stderr[-3000:]}")
                measured = json.loads(result.stdout.strip().splitlines()[-1])
                row = {"method": method, "setting": setting,
                       "items": items, "source_items": source_items if method == "metarec" else 0, **measured}
                rows.append(row)
                print(f"{method} {row['setting']} {items:,} items: {measured['step_ms']:.1f} ms, "
                      f"{measured['peak_rss_mb']:.0f} MB", flush=True)
    for row in rows:
        smallest = min(r["items"] for r in rows if (r["method"], r["setting"]) == (row["method"], row["setting"]))
        base = next(r for r in rows if (r["method"], r["setting"], r["items"]) == (row["method"], row["setting"],
                                                                                    smallest))
        row["step_vs_smallest"] = row["step_ms"] / base["step_ms"]
    print(format_table(
        [{"method": r["method"], "setting": r["setting"], "items": f"{r['items']:,}",
          "loss": "full" if r["full_softmax"] else "sampled", "step ms": round(r["step_ms"], 1),
          "vs smallest": round(r["step_vs_smallest"], 2), "peak RSS MB": round(r["peak_rss_mb"])} for r in rows],
        ["method", "setting", "items", "loss", "step ms", "vs smallest", "peak RSS MB"],
    ))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.output, {"machine": machine, "model": MODEL, "steps_per_process": args.steps, "rows": rows})
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
