"""Nearest-codeword search: the dense einsum against the chunked search, side by side.

The quantizer assigns every item of a domain's catalog at each forward, so on
large catalogs with fine codebooks (16 x 256) the search is a large part of a
training step. For each setting: median time of the dense search (one
[n, M, K] distance tensor, the reference) and of
``nearest_codewords`` (``rows`` vectors at a time), with the ratio, and a
check that both give the same codes. One thread, as a worker has.

    python benchmarks/bench_quantizer.py
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from bench_eval_beauty import timed  # this directory is on sys.path when run as a script

from metarec_dist.machine import machine_description
from metarec_dist.model.vq import nearest_codewords
from metarec_dist.report.run_directory import write_json
from metarec_dist.report.tables import format_table

# (items, codebooks, codewords, width): Beauty's and Sports' catalogs, and a larger one.
SETTINGS = [(12101, 16, 256, 64), (18357, 16, 256, 64), (18357, 4, 64, 64), (100000, 16, 256, 64)]


def dense_search(sub_vectors: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """The baseline: every distance at once."""
    cross = torch.einsum("nmd,mkd->nmk", sub_vectors, codebooks)
    return (codebooks.pow(2).sum(-1).unsqueeze(0) - 2 * cross).argmin(dim=-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/quantizer.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    machine = machine_description(torch=torch.__version__, threads="1")
    print(f"machine: {machine}")
    rows = []
    for items, books, codewords, width in SETTINGS:
        generator = torch.Generator().manual_seed(0)
        sub = torch.nn.functional.normalize(torch.randn(items, width, generator=generator), dim=-1)
        sub = sub.reshape(items, books, width // books)
        codebooks = torch.randn(books, codewords, width // books, generator=generator) * 0.1
        same = bool(torch.equal(dense_search(sub, codebooks), nearest_codewords(sub, codebooks)))
        dense, _ = timed(lambda sub=sub, codebooks=codebooks: dense_search(sub, codebooks), args.repeats)
        chunked, _ = timed(lambda sub=sub, codebooks=codebooks: nearest_codewords(sub, codebooks), args.repeats)
        rows.append({"items": items, "codebook": f"{books} x {codewords}", "dense_s": dense,
                     "chunked_s": chunked, "speedup": dense / chunked, "same_codes": same})
    print(format_table(rows, ["items", "codebook", "dense_s", "chunked_s", "speedup", "same_codes"]))
    write_json(args.output, {"machine": machine, "repeats": args.repeats, "rows": rows})
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
