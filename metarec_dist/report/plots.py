"""Plots of a run, drawn from its ``results.json`` alone (never from logs).

- ``loss.png``: the training loss (mean since the previous validation) and the
  validation selection metric against the step;
- ``source_weights.png`` (MetaRec): each source's weight relative to a uniform
  share, as a running mean over the steps it was sampled, so a reader sees
  which sources the target listens to and when that settled.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers
import matplotlib.pyplot as plt  # noqa: E402

from metarec_dist.report.run_directory import write_bytes  # noqa: E402

MAX_SOURCES_DRAWN = 12  # beyond that a legend is unreadable: the highest and lowest are drawn


def write_plots(results: dict[str, Any], run_dir: Path) -> list[Path]:
    """Draw the run's plots into ``run_dir``; returns the files written."""
    written = [_loss_plot(results, run_dir / "loss.png")]
    if results.get("source_weights", {}).get("history"):
        written.append(_weights_plot(results, run_dir / "source_weights.png"))
    return written


def save_figure(figure, path: Path) -> Path:
    """Write ``figure`` as a PNG, atomically, and close it."""
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    write_bytes(path, buffer.getvalue())
    return path


def _loss_plot(results: dict[str, Any], path: Path) -> Path:
    history = results["history"]
    steps = [entry["step"] for entry in history]
    metric = results["selection_metric"]
    figure, loss_axis = plt.subplots(figsize=(6.4, 3.6))
    loss_axis.plot(steps, [entry["train_loss"] for entry in history], color="tab:blue", marker=".")
    loss_axis.set_xlabel("step")
    loss_axis.set_ylabel("training loss", color="tab:blue")
    metric_axis = loss_axis.twinx()
    metric_axis.plot(steps, [entry["valid"][metric] for entry in history], color="tab:orange", marker=".")
    metric_axis.set_ylabel(f"validation {metric}", color="tab:orange")
    metric_axis.axvline(results["best_step"], color="gray", linestyle=":", linewidth=1)
    loss_axis.set_title(f"{results['method']} on {results['target']}")
    return save_figure(figure, path)


def _weights_plot(results: dict[str, Any], path: Path) -> Path:
    running: dict[str, list[tuple[int, float]]] = defaultdict(list)
    totals: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for entry in results["source_weights"]["history"]:
        share = len(entry["sources"])
        for source, weight in zip(entry["sources"], entry["weights"]):
            totals[source] += weight * share  # 1.0 = a uniform share
            counts[source] += 1
            running[source].append((entry["step"], totals[source] / counts[source]))
    ranked = sorted(running, key=lambda s: -running[s][-1][1])
    if len(ranked) > MAX_SOURCES_DRAWN:
        half = MAX_SOURCES_DRAWN // 2
        ranked = ranked[:half] + ranked[-half:]
    figure, axis = plt.subplots(figsize=(6.4, 3.6))
    for source in ranked:
        steps, values = zip(*running[source])
        axis.plot(steps, values, label=source, linewidth=1.2)
    axis.axhline(1.0, color="gray", linestyle=":", linewidth=1)
    axis.set_xlabel("meta-step")
    axis.set_ylabel("mean weight (1 = uniform share)")
    axis.set_title("which sources the target listens to")
    axis.legend(fontsize=7, ncol=2, loc="best")
    return save_figure(figure, path)


def recall_throughput_plot(rows: list[dict[str, Any]], path: Path) -> Path:
    """Recall@k against queries/s (log scale), one panel per catalog, one colour per searcher."""
    catalogs = sorted({(row["items"], row["width"]) for row in rows})
    searchers = list(dict.fromkeys(row["searcher"] for row in rows))
    colours = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(searchers)}
    figure, axes = plt.subplots(1, len(catalogs), figsize=(5.5 * len(catalogs), 4.2), squeeze=False)
    for axis, (items, width) in zip(axes[0], catalogs):
        for row in (r for r in rows if (r["items"], r["width"]) == (items, width) and r.get("recall") is not None):
            axis.scatter(row["queries_per_s"], row["recall"], s=40, color=colours[row["searcher"]],
                         label=row["searcher"])
        axis.set_xscale("log")
        axis.set_xlabel("queries / s")
        axis.set_ylabel(f"recall@{rows[0]['k']} against exact")
        axis.set_title(f"{items:,} items x {width}")
        axis.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower left")
    return save_figure(figure, path)
