#!/usr/bin/env python
"""Import rate of ``metarec_dist.data.importer.import_file`` on a large CSV.

Data: one synthetic CSV (``user_id,item_id,timestamp``; int64 ids, int64 unix
seconds) from ``metarec_dist.data.interaction_log`` with a fixed seed: every
item at least once, then Zipf-like item popularity, log-normal user activity,
ids not ordered by popularity or activity, and timestamps drawn at random, so
the rows are in neither user nor time order.

Measurement: every repeat starts two fresh Python processes, each writing into
its own fresh store directory:

* ``total``: calls ``import_file(path, store, "bench", "csv", columns,
  ImportOptions(), overwrite=False)``, i.e. exactly the importer's code path.
  Its wall time, taken inside the child around that one call (interpreter start
  and module imports excluded), gives the rate:
  interactions/s = interactions in the file / seconds.
* ``phases``: runs the same steps as ``import_file`` one by one and times each
  one: ``read_events`` (CSV parse), ``build_domain`` (dedupe, ordering,
  filtering, re-indexing), ``sha256_of`` (checksum of the source file kept in
  meta.json) and ``DomainStore.write`` (Parquet files + meta.json). This run is
  not the one the rate comes from; its phase sum should match ``total``.

Peak memory is the child's own high-water mark (``VmHWM`` in
``/proc/self/status``, read at the end of the child). The CSV is read from
the OS page cache (it was just written), so the numbers exclude cold-disk
reads. Generation time and file size are reported separately and are not part
of the import rate.

Usage::

    python benchmarks/bench_import.py                      # 10M interactions, 3 repeats
    python benchmarks/bench_import.py --interactions 1000000 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from metarec_dist.data.interaction_log import interaction_log
from metarec_dist.machine import machine_description

REPO = Path(__file__).resolve().parent.parent
SEED = 1234
PHASES = ("read", "build", "hash", "write")

# Code run in each fresh child process: argv = mode, csv path, store directory.
CHILD_CODE = r"""
import json, sys, time
from dataclasses import asdict
from pathlib import Path

from metarec_dist.data.domain import ImportOptions, build_domain
from metarec_dist.data.importer import import_file, sha256_of
from metarec_dist.data.readers import ColumnNames, read_events
from metarec_dist.data.store import DomainStore

mode, path, root = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
store = DomainStore(root)
columns = ColumnNames("user_id", "item_id", "timestamp")
options = ImportOptions()
out = {"mode": mode}

if mode == "total":
    t0 = time.perf_counter()
    report = import_file(path, store, "bench", "csv", columns, options, overwrite=False)
    out["seconds"] = time.perf_counter() - t0
else:  # "phases": the steps of import_file, timed one by one
    t0 = time.perf_counter()
    events = read_events(path, "csv", columns)
    t1 = time.perf_counter()
    tables, report = build_domain(events, options, source=str(path))
    t2 = time.perf_counter()
    digest = sha256_of(path)
    t3 = time.perf_counter()
    meta = {
        "source": {"path": str(path.resolve()), "format": "csv", "sha256": digest, "columns": asdict(columns)},
        "import_options": options.model_dump(),
        "report": report.as_dict(),
    }
    store.write("bench", tables, meta, overwrite=False)
    t4 = time.perf_counter()
    out["phases"] = {"read": t1 - t0, "build": t2 - t1, "hash": t3 - t2, "write": t4 - t3}
    out["seconds"] = t4 - t0

out["report"] = report.as_dict()
with open("/proc/self/status") as handle:
    for line in handle:
        if line.startswith("VmHWM:"):
            out["peak_rss_bytes"] = int(line.split()[1]) * 1024
print("RESULT " + json.dumps(out))
"""


# --- data ------------------------------------------------------------------------


def make_csv(path: Path, interactions: int, users: int, items: int, seed: int) -> None:
    """Write the synthetic interaction log (``metarec_dist.data.interaction_log``) to ``path``."""
    pacsv.write_csv(interaction_log(interactions, users, items, seed), path)


# --- one measurement ---------------------------------------------------------------


def run_child(mode: str, csv_path: Path, store_dir: Path) -> dict:
    """Run the import in a fresh interpreter; return its RESULT record plus process wall time."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", CHILD_CODE, mode, str(csv_path), str(store_dir)],
        capture_output=True,
        text=True,
        env=env,
    )
    process_seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"child ({mode}) failed with exit status {proc.returncode}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    result = json.loads(lines[-1][len("RESULT "):])
    result["process_seconds"] = process_seconds
    return result


def write_json_atomically(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(payload, handle, indent=2)
            handle.write("\n")
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--interactions", type=int, default=10_000_000)
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--items", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None, help="default: a fresh temp dir, removed at the end")
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "import.json")
    args = parser.parse_args()

    machine = machine_description(pyarrow=pa.__version__, numpy=np.__version__)
    print(f"machine: {machine['cpu_model']}, {machine['cpu_count']} cores, {machine['ram_gib']} GiB RAM, GPU: none")
    print(f"python {machine['python']}, pyarrow {machine['pyarrow']}, numpy {machine['numpy']}")
    print(
        f"data: {args.interactions:,} interactions, {args.users:,} users, {args.items:,} items, "
        f"seed {SEED}; repeats: {args.repeats}"
    )

    own_workdir = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="bench_import_")) if own_workdir else args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        # --- data, generated once (not part of the rate) ---
        csv_path = workdir / "interactions.csv"
        t0 = time.perf_counter()
        make_csv(csv_path, args.interactions, args.users, args.items, SEED)
        generation_seconds = time.perf_counter() - t0
        file_bytes = csv_path.stat().st_size
        print(f"csv: {csv_path} ({file_bytes / 2**20:.1f} MiB), generated in {generation_seconds:.1f} s")

        # --- repeats ---
        repeats = []
        for r in range(args.repeats):
            results = {}
            for mode in ("total", "phases"):
                store_dir = workdir / f"store-{r}-{mode}"
                results[mode] = run_child(mode, csv_path, store_dir)
                shutil.rmtree(store_dir)
            if results["total"]["report"] != results["phases"]["report"]:
                raise SystemExit("import_file and the phase-by-phase run disagree on the import report")
            seconds = results["total"]["seconds"]
            repeats.append(
                {
                    "repeat": r,
                    "seconds": round(seconds, 3),
                    "interactions_per_s": round(args.interactions / seconds),
                    "peak_rss_gib": round(results["total"]["peak_rss_bytes"] / 2**30, 3),
                    "process_seconds": round(results["total"]["process_seconds"], 3),
                    "phases_seconds": {k: round(v, 3) for k, v in results["phases"]["phases"].items()},
                    "phases_sum_seconds": round(results["phases"]["seconds"], 3),
                    "phases_peak_rss_gib": round(results["phases"]["peak_rss_bytes"] / 2**30, 3),
                }
            )
            report = results["total"]["report"]
    finally:
        if own_workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    medians = {
        "seconds": round(statistics.median(r["seconds"] for r in repeats), 3),
        "interactions_per_s": round(statistics.median(r["interactions_per_s"] for r in repeats)),
        "peak_rss_gib": round(statistics.median(r["peak_rss_gib"] for r in repeats), 3),
        "process_seconds": round(statistics.median(r["process_seconds"] for r in repeats), 3),
        "phases_seconds": {
            p: round(statistics.median(r["phases_seconds"][p] for r in repeats), 3) for p in PHASES
        },
        "phases_sum_seconds": round(statistics.median(r["phases_sum_seconds"] for r in repeats), 3),
    }

    # --- table ---
    header = f"{'repeat':>6} {'seconds':>8} {'inter/s':>12} {'peakRSS GiB':>11} |" + "".join(
        f" {p + ' s':>8}" for p in PHASES
    ) + f" {'sum s':>8}"
    print()
    print(header)
    print("-" * len(header))
    rows = [(str(r["repeat"]), r) for r in repeats] + [("median", medians)]
    for label, r in rows:
        print(
            f"{label:>6} {r['seconds']:8.2f} {r['interactions_per_s']:12,d} {r['peak_rss_gib']:11.2f} |"
            + "".join(f" {r['phases_seconds'][p]:8.2f}" for p in PHASES)
            + f" {r['phases_sum_seconds']:8.2f}"
        )
    print()
    print(f"import report: {report}")
    print(f"target >= 1,000,000 interactions/s: {'met' if medians['interactions_per_s'] >= 1_000_000 else 'NOT met'}")

    payload = {
        "benchmark": "import_file, CSV front end, default ImportOptions",
        "machine": machine,
        "parameters": {
            "interactions": args.interactions,
            "users": args.users,
            "items": args.items,
            "repeats": args.repeats,
            "seed": SEED,
            "generator": "metarec_dist.data.interaction_log.interaction_log",
        },
        "data": {"csv_bytes": file_bytes, "generation_seconds": round(generation_seconds, 3)},
        "import_report": report,
        "repeats": repeats,
        "medians": medians,
        "target_interactions_per_s": 1_000_000,
    }
    write_json_atomically(args.output, payload)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
