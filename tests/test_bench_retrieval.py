"""`metarec-dist bench retrieval` measures every searcher and writes its JSON, plot and table."""

import json

from metarec_dist.cli import main


def test_bench_retrieval_writes_json_plot_and_table(tmp_path, capsys):
    args = ["bench", "retrieval", "--items", "20000", "--widths", "16", "--queries", "300", "--repeats", "1",
            "--approximate", "ivf_flat nprobe=32", "hnsw ef=128", "--output-dir", str(tmp_path)]
    assert main(args) == 0
    (run_dir,) = tmp_path.iterdir()
    results = json.loads((run_dir / "retrieval.json").read_text())
    assert (run_dir / "recall_vs_throughput.png").stat().st_size > 1000
    searchers = [row["searcher"] for row in results["rows"]]
    assert searchers == ["faiss IndexFlatIP", "exact", "torch matmul+topk", "ivf_flat nprobe=32", "hnsw ef=128"]
    rows = {row["searcher"]: row for row in results["rows"]}
    assert rows["exact"]["identical_ids"] == 1.0 and rows["faiss IndexFlatIP"]["recall"] == 1.0
    assert rows["torch matmul+topk"]["recall"] == 1.0
    assert 0 < rows["hnsw ef=128"]["recall"] <= 1 and rows["hnsw ef=128"]["queries_per_s"] > 0
    assert results["machine"]["cpu_count"] >= 1 and results["matmul_fp32_gflops"] > 0
    out = capsys.readouterr().out
    assert "queries_per_s" in out and "GFLOP/s" in out and "machine:" in out


def test_bench_retrieval_rejects_an_unknown_setting(tmp_path, capsys):
    assert main(["bench", "retrieval", "--approximate", "lsh", "--output-dir", str(tmp_path)]) == 2
    assert "--approximate 'lsh' is unknown" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
