"""What a user sees of a run: progress lines on the driver and the plots, from records and results alone."""

import io

from metarec_dist.report.plots import write_plots
from metarec_dist.report.progress import ProgressPrinter


def results_with(weights_history):
    return {
        "method": "metarec", "target": "t", "selection_metric": "NDCG@10", "best_step": 4,
        "history": [{"step": s, "train_loss": 5.0 - s / 4, "valid": {"NDCG@10": 0.01 * s}} for s in (2, 4, 6)],
        "source_weights": {"history": weights_history},
    }


def test_a_log_gets_one_progress_line_per_validation_with_rate_eta_and_top_sources():
    stream = io.StringIO()  # not a terminal: compact lines, no bar
    printer = ProgressPrinter(total_steps=100, metric="NDCG@10", stream=stream)
    printer({"step": 1, "seconds": 0.5, "loss": 6.0})
    printer({"step": 2, "seconds": 1.0, "loss": 5.5, "valid": 0.0312, "top_sources": [("a", 1.3), ("b", 0.9)]})
    printer.close()
    (line,) = stream.getvalue().splitlines()
    assert line.startswith("step 2/100  2.0 steps/s  ETA 49 s")
    assert "valid NDCG@10 0.0312" in line and "top a 1.3, b 0.9" in line


def test_plots_are_written_as_png_files_from_results_alone(tmp_path):
    history = [{"step": s, "sources": ["a", "b"], "weights": [0.7, 0.3]} for s in range(1, 7)]
    written = write_plots(results_with(history), tmp_path)
    assert sorted(p.name for p in written) == ["loss.png", "source_weights.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in written)


def test_runs_without_source_weights_get_only_the_loss_plot(tmp_path):
    results = results_with([])
    del results["source_weights"]
    assert [p.name for p in write_plots(results, tmp_path)] == ["loss.png"]
