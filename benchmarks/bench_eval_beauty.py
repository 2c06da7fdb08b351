"""Evaluating the whole Beauty test set (22,363 users, 12,101 items, history masked): searchers vs the torch reference.

A model with Beauty's catalog (width 64, as configs/beauty_target_only.yaml;
randomly initialised: the ranking work does not depend on training) ranks
every test user. Timed, median of ``--repeats``, in one process:

- the brute-force torch reference (``eval.full_ranking``: encoder, full score
  matrix per chunk of 1,024 users, history mask, rank count), in all;
- the encoder pass alone (``query_vectors``: every path pays it);
- ranking given the query vectors: the exact searcher's ``ranks`` (the
  default evaluation path) and a flat FAISS index's ``search_excluding``,
  each including building the searcher and the exclusion lists.

    python benchmarks/bench_eval_beauty.py --output benchmarks/results/eval_beauty.json
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from metarec_dist.data.importer import import_file
from metarec_dist.data.splits import leave_one_out
from metarec_dist.data.store import DomainStore
from metarec_dist.eval.full_ranking import EvalConfig, ranks_full_ranking
from metarec_dist.eval.retrieval_ranking import query_vectors, ranks_given_queries
from metarec_dist.machine import machine_description
from metarec_dist.model.recommender import ModelConfig, SequenceRecommender
from metarec_dist.report.run_directory import write_json
from metarec_dist.report.tables import format_table
from metarec_dist.retrieval.config import RetrievalConfig

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def timed(function, repeats):
    seconds, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = function()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=SHARED / "Beauty.txt")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path, help="JSON file to write")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        store = DomainStore(Path(directory))
        import_file(args.data, store)
        domain = store.open("Beauty")
        split, num_items = leave_one_out(domain.sequences), domain.num_items
    torch.manual_seed(0)
    model = SequenceRecommender(ModelConfig(width=64, item_width=64, use_vq=False), {"Beauty": num_items}).eval()
    histories, targets, length = split.test_history, split.test_item, 50
    users = np.arange(split.num_users)
    encode = lambda inputs: model.query_vectors("Beauty", inputs)  # noqa: E731

    rows = []
    seconds, _ = timed(lambda: query_vectors(encode, histories, users, length, 1024), args.repeats)
    rows.append({"what": "query vectors (encoder pass, in every path)", "seconds": seconds})
    seconds, reference = timed(
        lambda: ranks_full_ranking(lambda x: model.scores("Beauty", x), histories, targets, num_items,
                                   EvalConfig(), length),
        args.repeats,
    )
    rows.append({"what": "torch reference (encoder + full scores + mask)", "seconds": seconds, "same_ranks": True})
    queries = query_vectors(encode, histories, users, length, 1024)
    items = model.item_vectors("Beauty")
    for index in ("exact", "flat"):
        config = EvalConfig(retrieval=RetrievalConfig(index=index))
        seconds, ranks = timed(
            lambda config=config: ranks_given_queries(queries, items, histories, targets.astype(np.int64), config,
                                                      users),
            args.repeats,
        )
        same = np.array_equal(ranks, reference) if index == "exact" else bool(
            np.array_equal(np.minimum(ranks, 20), np.minimum(reference, 20)))
        rows.append({"what": f"ranking given query vectors, index={index}", "seconds": seconds, "same_ranks": same})
    machine = machine_description(torch=torch.__version__)
    print(f"machine: {machine['cpu_model']}, {machine['cpu_count']} cores; Beauty test: {len(users):,} users, "
          f"{num_items:,} items, median of {args.repeats}")
    print(format_table(rows, ["what", "seconds", "same_ranks"]))
    print("same_ranks: exact = every rank equal; flat = equal up to 20 (HR/NDCG@5/10/20 equal)")
    if args.output:
        write_json(args.output, {"machine": machine, "users": len(users), "items": num_items,
                                 "repeats": args.repeats, "rows": rows})


if __name__ == "__main__":
    main()
