"""Wall time of a MetaRec run on Beauty-10% with a 16 x 256 codebook, this code against an older checkout.

The run is ``configs/beauty_transfer.yaml`` (sources Sports, Toys, Yelp, LastFM;
one process) with ``model.vq`` at 16 codebooks of 256 codewords, validation
every 50 steps and no early stopping, so every run takes its steps. Each code
version runs in its own process (``PYTHONPATH`` picks the checkout); the wall
time is the run's own (``results.json``: loading data to the test), and the
table shows seconds per meta-step including validation. An older checkout may
run fewer steps (``--before-steps``): the comparison is per step.

    git worktree add --detach ../metarec-before <commit>
    python benchmarks/bench_beauty_metarec.py --store STORE --before ../metarec-before --before-steps 50
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from metarec_dist.machine import machine_description
from metarec_dist.report.run_directory import write_json
from metarec_dist.report.tables import format_table

HERE = Path(__file__).resolve().parents[1]
SETTINGS = ["runner.workers=1", "model.vq.num_codebooks=16", "model.vq.codewords=256", "train.eval_every=50",
            "train.patience=1000"]


def run(code: Path, store: Path, steps: int) -> dict:
    """One training run with the package at ``code``; its results.json plus the code's commit."""
    with tempfile.TemporaryDirectory() as runs:
        command = [sys.executable, "-m", "metarec_dist", "train", str(HERE / "configs/beauty_transfer.yaml"),
                   "--set", f"data.store={store}", "--set", f"train.steps={steps}", "--set", f"output_dir={runs}"]
        for setting in SETTINGS:
            command += ["--set", setting]
        environment = {**os.environ, "PYTHONPATH": str(code)}
        done = subprocess.run(command, capture_output=True, text=True, env=environment, cwd=code)
        if done.returncode != 0:
            raise SystemExit(f"the run with {code} failed:\n{done.stderr[-3000:]}")
        (results_path,) = Path(runs).glob("*/results.json")
        results = json.loads(results_path.read_text())
    commit = subprocess.run(["git", "-C", str(code), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    return {"code": str(code), "commit": commit, "steps": results["steps_run"],
            "validations": len(results["history"]), "wall_seconds": results["wall_seconds"],
            "seconds_per_step": results["wall_seconds"] / results["steps_run"],
            "valid_ndcg10": results["validation"]["NDCG@10"], "test_ndcg10": results["test"]["NDCG@10"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, required=True, help="a store with Beauty and the four sources")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--before", type=Path, help="a checkout of older code to compare with")
    parser.add_argument("--before-steps", type=int, default=50)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/beauty_metarec_16x256.json"))
    args = parser.parse_args()

    machine = machine_description(torch=torch.__version__, threads=str(torch.get_num_threads()))
    print(f"machine: {machine}", flush=True)
    rows = []
    if args.before is not None:
        rows.append({"version": "before", **run(args.before.resolve(), args.store.resolve(), args.before_steps)})
        print(rows[-1], flush=True)
    rows.append({"version": "this code", **run(HERE, args.store.resolve(), args.steps)})
    print(rows[-1], flush=True)
    if len(rows) == 2:
        rows[1]["speedup_per_step"] = rows[0]["seconds_per_step"] / rows[1]["seconds_per_step"]
    print(format_table(
        [{"version": f"{r['version']} ({r['commit']})", "steps": r["steps"], "validations": r["validations"],
          "wall s": round(r["wall_seconds"]), "s per step": round(r["seconds_per_step"], 2)} for r in rows],
        ["version", "steps", "validations", "wall s", "s per step"],
    ))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.output, {"machine": machine, "config": "configs/beauty_transfer.yaml", "settings": SETTINGS,
                             "rows": rows})
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
