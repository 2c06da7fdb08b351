"""Which kinds of source a MetaRec config listens to, over seeds, on synthetic domains.

Trains ``CONFIG`` (one process, the test split unread) once per seed and
averages each source's relative weight (1.0 = a uniform share) by its kind,
the second part of its name (``syn-related-00`` -> ``related``), over the
whole run and over the meta-steps up to the selected (best validation) step.
Issue 17 asks for one config that both gains over target-only and ranks
related above unrelated above noise at every seed; this prints the second
half, with each seed's validation NDCG@10 beside it.

    python benchmarks/source_ranking.py configs/quickstart.yaml --seeds 0 1 2 \\
        --set data.store=store --output benchmarks/results/quickstart_source_ranking.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from metarec_dist.config import load_config
from metarec_dist.machine import machine_description
from metarec_dist.meta.config import ExperimentConfig
from metarec_dist.meta.trainer import Trainer
from metarec_dist.meta.training_data import load_training_data
from metarec_dist.report.run_directory import write_json
from metarec_dist.report.tables import format_table

KIND_ORDER = ("related", "unrelated", "noise")


def weights_by_kind(history: list[dict], until_step: int | None = None) -> dict[str, float]:
    """Mean relative weight (weight x tasks in the step) per kind of source, over the meta-steps up to
    ``until_step`` (default: all): each source's mean first, then the mean over a kind's sources."""
    per_source: dict[str, list[float]] = {}
    for entry in history:
        if until_step is None or entry["step"] <= until_step:
            for source, weight in zip(entry["sources"], entry["weights"]):
                per_source.setdefault(source, []).append(weight * len(entry["sources"]))
    kinds: dict[str, list[float]] = {}
    for source, values in per_source.items():
        kinds.setdefault(source.split("-")[1], []).append(float(np.mean(values)))
    return {kind: float(np.mean(values)) for kind, values in kinds.items()}


def ranks_sources(weights: dict[str, float]) -> bool:
    """related > unrelated > noise, for the kinds present."""
    present = [weights[kind] for kind in KIND_ORDER if kind in weights]
    return all(a > b for a, b in zip(present, present[1:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--output", type=Path, help="write the rows here as JSON")
    args = parser.parse_args()
    rows = []
    for seed in args.seeds:
        config = load_config(ExperimentConfig, args.config,
                             ["runner.workers=1", *args.overrides, f"train.seed={seed}"])
        results = Trainer(config, load_training_data(config), progress=False).run(test=False).results
        history = results["source_weights"]["history"]
        weights = weights_by_kind(history)
        early = weights_by_kind(history, until_step=results["best_step"])
        rows.append({"seed": seed, **{kind: weights.get(kind) for kind in KIND_ORDER},
                     "ranked": ranks_sources(weights),
                     **{f"{kind} to best": early.get(kind) for kind in KIND_ORDER},
                     "ranked to best": ranks_sources(early),
                     "valid_ndcg10": results["validation"]["NDCG@10"], "best_step": results["best_step"],
                     "steps_run": results["steps_run"]})
    print(format_table([{key: f"{value:.3f}" if isinstance(value, float) else value for key, value in row.items()}
                        for row in rows], list(rows[0])))
    print(f"ranked at {sum(row['ranked'] for row in rows)} of {len(rows)} seeds over the whole run, "
          f"{sum(row['ranked to best'] for row in rows)} up to the selected step")
    if args.output:
        write_json(args.output, {"config": str(args.config), "overrides": args.overrides, "rows": rows,
                                 "machine": machine_description()})


if __name__ == "__main__":
    main()
