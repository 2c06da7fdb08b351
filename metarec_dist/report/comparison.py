"""A comparison of methods over seeds: the table (mean ± std per test metric, best marked) and its plot.

Input: one record per training run, ``{"label", "seed", "results"}`` where
``results`` is the run's ``results.json``. Model selection happened inside each
run on validation data; here only the test metrics those runs read once are
summarised.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from metarec_dist.report.plots import plt, save_figure

METRICS = ("NDCG@10", "HR@10", "NDCG@20", "HR@20", "MRR")


def summary_rows(records: list[dict[str, Any]], metrics: tuple[str, ...] = METRICS) -> list[dict[str, Any]]:
    """Per label (in first-seen order): seeds, and each metric's mean, std and whether it is the best mean."""
    rows = []
    for label in dict.fromkeys(record["label"] for record in records):
        mine = [record["results"] for record in records if record["label"] == label]
        row: dict[str, Any] = {"method": label, "seeds": len(mine),
                               "seconds": statistics.mean(result["wall_seconds"] for result in mine)}
        for metric in metrics:
            values = [result["test"][metric] for result in mine]
            row[metric] = {"mean": statistics.mean(values),
                           "std": statistics.stdev(values) if len(values) > 1 else 0.0, "values": values}
        rows.append(row)
    for metric in metrics:
        best = max(row[metric]["mean"] for row in rows)
        for row in rows:
            row[metric]["best"] = row[metric]["mean"] == best
    return rows


def table_rows(rows: list[dict[str, Any]], metrics: tuple[str, ...] = METRICS) -> list[dict[str, str]]:
    """``summary_rows`` as text cells: ``mean ± std`` (one seed: the value), the best mean marked with ``*``."""

    def cell(row: dict[str, Any], metric: str) -> str:
        spread = f" ± {row[metric]['std']:.4f}" if row["seeds"] > 1 else ""
        return f"{row[metric]['mean']:.4f}{spread}{' *' if row[metric]['best'] else ''}"

    return [{"method": row["method"], "seeds": str(row["seeds"]), **{metric: cell(row, metric) for metric in metrics},
             "seconds": f"{row['seconds']:.0f}"} for row in rows]


def comparison_plot(rows: list[dict[str, Any]], path: Path, metrics: tuple[str, ...] = ("NDCG@10", "HR@10")) -> Path:
    """Bars of each method's mean test metric with its standard deviation over seeds."""
    figure, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6), squeeze=False)
    names = [row["method"] for row in rows]
    for axis, metric in zip(axes[0], metrics):
        means = [row[metric]["mean"] for row in rows]
        colours = ["tab:orange" if row[metric]["best"] else "tab:blue" for row in rows]
        axis.bar(names, means, yerr=[row[metric]["std"] for row in rows], color=colours, capsize=4)
        axis.set_title(f"test {metric} (mean ± std over seeds)")
        axis.tick_params(axis="x", rotation=20)
    return save_figure(figure, path)


def negative_transfer_warnings(records: list[dict[str, Any]]) -> list[str]:
    """For each transfer row, a plain warning when target-only's mean validation metric is higher."""
    validation = {}
    for record in records:
        results = record["results"]
        metric = results["selection_metric"]
        validation.setdefault((record["label"], results["method"], metric), []).append(results["validation"][metric])
    references = [(metric, statistics.mean(values)) for (label, method, metric), values in validation.items()
                  if label == "target_only"]
    warnings = []
    for (label, method, metric), values in validation.items():
        for reference_metric, reference in references:
            if method != "target_only" and metric == reference_metric and reference > statistics.mean(values):
                warnings.append(f"negative transfer: target-only validates better than {label} (mean validation "
                                f"{metric} {reference:.4f} against {statistics.mean(values):.4f})")
    return warnings
