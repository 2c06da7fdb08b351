"""Training-step and evaluation speed, fp32 against bf16, side by side in one run.

Data: a domain from the store (default Beauty, imported from ../shared/data).
For each precision: build the trainer from the config, warm up, then time
``--steps`` target training steps (median of ``--repeats`` blocks) and a full
validation pass (every user, full catalog). Prints a table with the bf16/fp32
ratio and writes JSON with the machine.

    python benchmarks/bench_train_step.py configs/beauty_target_only.yaml --set data.store=store
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from metarec_dist.machine import machine_description
from metarec_dist.config import load_config
from metarec_dist.meta.config import RunConfig
from metarec_dist.meta.trainer import Trainer, load_training_data
from metarec_dist.report.run_directory import write_json
from metarec_dist.report.tables import format_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--steps", type=int, default=20, help="steps per timed block")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/train_step.json"))
    args = parser.parse_args()

    machine = machine_description(torch=torch.__version__, threads=str(torch.get_num_threads()))
    print(f"machine: {machine}")
    rows = []
    for precision in ("fp32", "bf16"):
        config = load_config(RunConfig, args.config, [*args.overrides, f"model.precision={precision}"])
        trainer = Trainer(config, load_training_data(config), progress=False)
        for step in range(5):  # warm-up: allocator, kernels
            trainer._target_step(step)
        blocks = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            for step in range(args.steps):
                trainer._target_step(step)
            blocks.append((time.perf_counter() - started) / args.steps)
        trainer.evaluate("valid")  # warm-up
        evals = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            trainer.evaluate("valid")
            evals.append(time.perf_counter() - started)
        rows.append({"precision": precision, "step_ms": 1000 * statistics.median(blocks),
                     "eval_s": statistics.median(evals), "step_blocks_ms": [1000 * b for b in blocks],
                     "eval_runs_s": evals})
    fp32, bf16 = rows
    print(format_table(
        [{"precision": r["precision"], "step ms (median)": round(r["step_ms"], 1),
          "validation pass s (median)": round(r["eval_s"], 2)} for r in rows],
        ["precision", "step ms (median)", "validation pass s (median)"],
    ))
    print(f"bf16 / fp32 step time: {bf16['step_ms'] / fp32['step_ms']:.2f}; "
          f"validation: {bf16['eval_s'] / fp32['eval_s']:.2f}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.output, {"machine": machine, "config": str(args.config), "overrides": args.overrides,
                             "steps_per_block": args.steps, "results": rows})
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
