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
