"""Terminal summaries of a run, from its results dict (as written to results.json)."""

from __future__ import annotations

from typing import Any

from metarec_dist.report.tables import format_table


def format_run_summary(results: dict[str, Any], top_sources: int = 8) -> str:
    metrics = list(results["test"].keys() - {"users"})
    order = sorted(metrics, key=lambda m: (m == "MRR", m.split("@")[0], int(m.split("@")[1]) if "@" in m else 0))
    rows = [
        {"split": split, **{m: round(results[split][m], 4) for m in order}} for split in ("validation", "test")
    ]
    lines = [
        f"{results['method']} on '{results['target']}' "
        f"({results['training_users']:,} training users, fraction {results['limited_target_fraction']}): "
        f"best step {results['best_step']} of {results['steps_run']}, {results['wall_seconds']:.1f} s",
        format_table(rows, ["split", *order]),
    ]
    weights = results.get("source_weights", {}).get("final")
    if weights:
        ranked = sorted(weights.items(), key=lambda item: -item[1]["mean_relative_weight"])[:top_sources]
        lines.append("source weights (1.0 = a uniform share):")
        lines.append(
            format_table(
                [{"source": s, "weight": round(w["mean_relative_weight"], 3), "sampled": w["times_sampled"]}
                 for s, w in ranked],
                ["source", "weight", "sampled"],
            )
        )
    return "\n".join(lines)


def negative_transfer_warning(results: dict[str, Any], reference: dict[str, Any]) -> str | None:
    """A plain warning when a target-only ``reference`` run on the same data validated better than
    the transfer run ``results`` (both ``results.json`` dicts; compared on the selection metric)."""
    metric = results["selection_metric"]
    mine, theirs = results["validation"][metric], reference["validation"].get(metric)
    if results["method"] == "target_only" or theirs is None or theirs <= mine:
        return None
    return (f"negative transfer: target-only validates better on '{results['target']}' "
            f"(validation {metric} {theirs:.4f} against {mine:.4f} for {results['method']}); "
            "the sources cost the target accuracy in this setting")


def reference_problem(results: dict[str, Any], reference: dict[str, Any]) -> str | None:
    """Why ``reference`` cannot stand for target-only on the data ``results`` trained on (None: it can)."""
    if reference.get("method") != "target_only":
        return f"it is a {reference.get('method')} run, not target_only"
    for key in ("target", "limited_target_fraction", "selection_metric"):
        if reference.get(key) != results[key]:
            return f"its {key} is {reference.get(key)!r}, this run's is {results[key]!r}"
    return None
