"""Retrieval benchmark as recorded in docs/BENCHMARKS.md: `metarec-dist bench retrieval` on the sizes below.

    python benchmarks/bench_retrieval.py            # 1M x {64, 128}, 10M x 128, 1M x 64 with equal norms
    python benchmarks/bench_retrieval.py --quick    # 200k x 64 only (a minute)

Each part is one `metarec-dist bench retrieval` run (its own JSON and PNG under
bench-runs/); see `metarec_dist/retrieval/benchmark.py` for what is measured.
"""

from __future__ import annotations

import argparse
import sys

from metarec_dist.cli import main

RUNS = {
    "1M": ["--items", "1000000", "--widths", "64", "128", "--queries", "4096", "--repeats", "3"],
    "1M-equal-norms": ["--items", "1000000", "--widths", "64", "--queries", "4096", "--repeats", "3",
                       "--norm-sigma", "0", "--approximate"],
    # At 10M: fewer queries (a flat pass is ~3 minutes here) and one approximate index (IVF cells
    # take minutes to assign 10M items on 2 cores; HNSW would take hours to build).
    "10M": ["--items", "10000000", "--widths", "128", "--queries", "1024", "--repeats", "1",
            "--approximate", "ivf_pq nprobe=32"],
}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one small catalog")
    parser.add_argument("--runs", nargs="*", choices=sorted(RUNS), default=list(RUNS), help="which parts to run")
    args = parser.parse_args()
    if args.quick:
        sys.exit(main(["bench", "retrieval", "--items", "200000", "--widths", "64", "--queries", "1024"]))
    for name in args.runs:
        print(f"== {name}", flush=True)
        code = main(["bench", "retrieval", *RUNS[name]])
        if code:
            sys.exit(code)
