"""The codebook replicated in every worker against searched where it lives, in real 2-worker runs.

Runs ``metarec-dist train configs/beauty_transfer.yaml`` on 2 Ray Train workers
for each codebook size and placement (``runner.shard_codebook_from``: 2 forces
the owner search, null a replica; ``vq.codes per_step`` with a replica
separates the search's placement from how often it runs), one run at a time,
and reports each worker's mean main-step time (the time in collectives
included), the codebook values it holds between steps, its codebook Adam
state and its peak resident memory, read from the run's results.json.

    python benchmarks/bench_codebook_placement.py --store STORE
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from metarec_dist.machine import machine_description
from metarec_dist.report.run_directory import write_json
from metarec_dist.report.tables import format_table

HERE = Path(__file__).resolve().parents[1]
PLACEMENTS = {  # name -> overrides
    "replica": ["runner.shard_codebook_from=null"],
    "replica, per-step codes": ["runner.shard_codebook_from=null", "model.vq.codes=per_step"],
    "owner search": ["runner.shard_codebook_from=2"],
}


def run(store: str, codebook: str, overrides: list[str], steps: int, workdir: Path) -> dict:
    books, codewords = codebook.split("x")
    output = workdir / f"{codebook}-{len(list(workdir.iterdir()))}"
    command = [sys.executable, "-m", "metarec_dist", "train", str(HERE / "configs/beauty_transfer.yaml"),
               "--set", f"data.store={store}", "--set", "runner.workers=2", "--set", f"train.steps={steps}",
               "--set", f"train.eval_every={steps}", "--set", f"model.vq.num_codebooks={books}",
               "--set", f"model.vq.codewords={codewords}", "--set", f"output_dir={output}"]
    for override in overrides:
        command += ["--set", override]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    (results,) = output.glob("*/results.json")
    return json.loads(results.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True, help="domain store with Beauty and the four sources")
    parser.add_argument("--codebooks", nargs="+", default=["16x256", "8x65536"], help="MxK")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--output", type=Path, default=HERE / "benchmarks/results/codebook_placement.json")
    args = parser.parse_args()
    machine = machine_description(torch=torch.__version__, threads="1 per worker, 2 workers")
    print(f"machine: {machine}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for codebook in args.codebooks:
            for placement, overrides in PLACEMENTS.items():
                results = run(args.store, codebook, overrides, args.steps, Path(workdir))
                workers = results["per_worker"]
                rows.append({
                    "codebook": codebook,
                    "placement": placement,
                    "step_ms": [round(w["main_step_ms"]["total"], 1) for w in workers],
                    "in_collectives_ms": [round(w["main_step_ms"]["in_collectives"], 1) for w in workers],
                    "codewords_held": [w["codewords_held"] for w in workers],
                    "peak_rss_mb": [w["peak_rss_mb"] for w in workers],
                    "valid_ndcg10": results["validation"]["NDCG@10"],
                    "wall_seconds": round(results["wall_seconds"], 1),
                })
                print(json.dumps(rows[-1]), flush=True)
    table = [{"codebook": r["codebook"], "placement": r["placement"],
              "step ms (w0 / w1)": " / ".join(map(str, r["step_ms"])),
              "in collectives ms": " / ".join(map(str, r["in_collectives_ms"])),
              "codebook values held": " / ".join(map(str, r["codewords_held"])),
              "peak RSS MB": " / ".join(f"{m:.0f}" for m in r["peak_rss_mb"])} for r in rows]
    print(format_table(table, list(table[0])))
    write_json(args.output, {"machine": machine, "steps": args.steps, "rows": rows})
    print(f"results: {args.output}")


if __name__ == "__main__":
    main()
