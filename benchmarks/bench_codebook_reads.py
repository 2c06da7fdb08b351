"""How much of the codebook a meta-step reads, and what each way of sharding it would move per step.

A worker's forward passes need the codeword of every (sub-space, item) they
quantize, and finding it needs every codeword of the sub-space. Two ways to
give it to them, per step and worker:

- ``replica`` (the shipped design): every worker holds all codewords (the
  Adam state stays with each sub-space's owner); the codebook's gradient joins
  the step's all-reduce and the updated codebooks are all-reduced back: two
  codebook-sized tensors;
- ``owner search``: a worker holds no codewords. It sends each quantized item's
  sub-vectors to the owners, which search and answer with the codes and the
  distinct codewords chosen; after the step the codewords' gradients go back.

This runs real meta-steps (``configs/beauty_transfer.yaml``, one process) for
each codebook size, records every quantizer call of a step, and reports the
share of the codewords a step reads and the bytes of the tensors each way
exchanges (what a collective moves over the wire is a multiple of these).
Replication costs the codebook's size; the owner search costs the step's items.

    python benchmarks/bench_codebook_reads.py --store STORE
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from metarec_dist.config import load_config
from metarec_dist.machine import machine_description
from metarec_dist.meta.config import ExperimentConfig
from metarec_dist.meta.trainer import Trainer
from metarec_dist.meta.training_data import load_training_data
from metarec_dist.report.run_directory import write_json
from metarec_dist.report.tables import format_table

HERE = Path(__file__).resolve().parents[1]
CODEBOOKS = ["16x256", "4x64", "16x4096", "8x65536"]
BYTES = 4  # fp32 codewords and gradients
CODE_BYTES = 4  # a codeword's index within its sub-space


def reads_per_step(config: ExperimentConfig, warmup: int, steps: int) -> list[dict[str, float]]:
    """Run ``warmup + steps`` meta-steps; for each measured step, the items quantized and the
    distinct codewords read in each sub-space."""
    trainer = Trainer(config, load_training_data(config), progress=False)
    quantizer = trainer.model.quantizer
    calls: list[torch.Tensor] = []
    quantizer.register_forward_hook(lambda module, inputs, output: calls.append(output.codes.detach()))
    measured = []
    for step in range(1, warmup + steps + 1):
        calls.clear()
        trainer.steps.meta(step)
        if step > warmup:
            codes = torch.cat([c.reshape(-1, quantizer.config.num_codebooks) for c in calls])
            distinct = [len(torch.unique(codes[:, book])) for book in range(quantizer.config.num_codebooks)]
            measured.append({"items": len(codes), "rows_read": sum(distinct),
                             "fraction_read": sum(distinct) / (quantizer.config.codewords * len(distinct))})
    return measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, required=True, help="a store with Beauty and the four sources")
    parser.add_argument("--config", type=Path, default=HERE / "configs/beauty_transfer.yaml")
    parser.add_argument("--codebooks", nargs="+", default=CODEBOOKS, help="MxK: sub-spaces x codewords")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--output", type=Path, default=HERE / "benchmarks/results/codebook_reads.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    machine = machine_description(torch=torch.__version__, threads="1")
    print(f"machine: {machine}", flush=True)
    rows = []
    for setting in args.codebooks:
        books, codewords = (int(part) for part in setting.split("x"))
        config = load_config(ExperimentConfig, args.config, [
            f"data.store={args.store}", "runner.workers=1", "train.threads=1",
            f"model.vq.num_codebooks={books}", f"model.vq.codewords={codewords}"])
        width = config.model.width
        code_width = width // books
        measured = reads_per_step(config, args.warmup, args.steps)
        items = statistics.median(m["items"] for m in measured)
        rows_read = statistics.median(m["rows_read"] for m in measured)
        codebook_bytes = books * codewords * code_width * BYTES
        replica = 2 * codebook_bytes
        owner_search = items * (width * BYTES + books * CODE_BYTES) + 2 * rows_read * code_width * BYTES
        rows.append({
            "codebook": setting, "codebook_kb": codebook_bytes / 1024,
            "items_per_step": items,
            "codewords_read": f"{statistics.median(m['fraction_read'] for m in measured):.0%}",
            "replica_kb": replica / 1024, "owner_search_kb": owner_search / 1024,
            "owner_search_over_replica": owner_search / replica,
        })
        print(rows[-1], flush=True)
    print(format_table(rows, ["codebook", "codebook_kb", "items_per_step", "codewords_read", "replica_kb",
                              "owner_search_kb", "owner_search_over_replica"]))
    write_json(args.output, {"machine": machine, "config": str(args.config), "warmup": args.warmup,
                             "steps": args.steps, "rows": rows})
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
