"""Training-step and validation-pass speed: what each speed-up of the step buys, side by side.

Data: a domain from the store (default Beauty, imported from ../shared/data).
Settings, each in its own process (the allocator setting is process-wide):
- ``baseline``: every batch encoded in one piece, glibc's default allocator
  (the reference point);
- ``grouped``: rows encoded in groups by length (``model.encoder.group_by_length``);
- ``grouped + kept memory``: and freed memory kept in the process
  (``metarec_dist.allocator``), as ``metarec-dist`` runs;
- the last one again in bf16.
Each process builds the trainer, warms up, then times ``--steps`` target
training steps and one full validation pass (every user, full catalog). The
settings take turns, ``--repeats`` rounds, so machine noise hits them alike;
the table gives medians and the ratio to the baseline.

    python benchmarks/bench_train_step.py configs/beauty_target_only.yaml --set data.store=store
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

from metarec_dist.machine import machine_description
from metarec_dist.report.run_directory import write_json
from metarec_dist.report.tables import format_table

SETTINGS = [
    {"name": "baseline", "precision": "fp32", "group_by_length": False, "keep_freed_memory": False},
    {"name": "grouped", "precision": "fp32", "group_by_length": True, "keep_freed_memory": False},
    {"name": "grouped + kept memory", "precision": "fp32", "group_by_length": True, "keep_freed_memory": True},
    {"name": "grouped + kept memory, bf16", "precision": "bf16", "group_by_length": True, "keep_freed_memory": True},
]


def measure(config_path: Path, overrides: list[str], setting: dict, steps: int) -> dict:
    """One setting, in this process: mean time of `steps` training steps, and one validation pass."""
    from metarec_dist.allocator import keep_freed_memory
    from metarec_dist.config import load_config
    from metarec_dist.meta.config import ExperimentConfig
    from metarec_dist.meta.trainer import Trainer
    from metarec_dist.meta.training_data import load_training_data

    if setting["keep_freed_memory"]:
        keep_freed_memory()
    overrides = [*overrides, f"model.precision={setting['precision']}",
                 f"model.encoder.group_by_length={setting['group_by_length']}"]
    config = load_config(ExperimentConfig, config_path, overrides)
    trainer = Trainer(config, load_training_data(config), progress=False)
    for step in range(5):  # warm-up: allocator, kernels
        trainer.steps.target(step)
    started = time.perf_counter()
    for step in range(steps):
        trainer.steps.target(step)
    step_seconds = (time.perf_counter() - started) / steps
    trainer.evaluate("valid")  # warm-up
    started = time.perf_counter()
    trainer.evaluate("valid")
    return {"step_ms": 1000 * step_seconds, "eval_s": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per process")
    parser.add_argument("--repeats", type=int, default=3, help="rounds over the settings")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/train_step.json"))
    parser.add_argument("--setting", type=int, help=argparse.SUPPRESS)  # internal: measure one setting
    args = parser.parse_args()

    if args.setting is not None:
        print(json.dumps(measure(args.config, args.overrides, SETTINGS[args.setting], args.steps)))
        return

    machine = machine_description(torch=torch.__version__, threads=str(torch.get_num_threads()))
    print(f"machine: {machine}")
    runs: list[list[dict]] = [[] for _ in SETTINGS]
    for round_number in range(args.repeats):
        for index, setting in enumerate(SETTINGS):
            command = [sys.executable, __file__, str(args.config), "--steps", str(args.steps),
                       "--setting", str(index), *(f"--set={o}" for o in args.overrides)]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                raise SystemExit(f"{setting['name']} failed:\n{result.stderr[-3000:]}")
            runs[index].append(json.loads(result.stdout.strip().splitlines()[-1]))
            print(f"round {round_number + 1}: {setting['name']}: {runs[index][-1]}", flush=True)

    rows = []
    for setting, measured in zip(SETTINGS, runs):
        rows.append({**setting, "step_ms": statistics.median(r["step_ms"] for r in measured),
                     "eval_s": statistics.median(r["eval_s"] for r in measured), "runs": measured})
    baseline = rows[0]
    print(format_table(
        [{"setting": r["name"], "step ms (median)": round(r["step_ms"], 1),
          "step vs baseline": round(r["step_ms"] / baseline["step_ms"], 2),
          "validation pass s (median)": round(r["eval_s"], 2),
          "validation vs baseline": round(r["eval_s"] / baseline["eval_s"], 2)} for r in rows],
        ["setting", "step ms (median)", "step vs baseline", "validation pass s (median)", "validation vs baseline"],
    ))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.output, {"machine": machine, "config": str(args.config), "overrides": args.overrides,
                             "steps_per_process": args.steps, "results": rows})
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
