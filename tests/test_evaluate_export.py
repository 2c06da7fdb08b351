"""`evaluate RUN_DIR` reproduces a run's metrics; `export RUN_DIR` pieces reproduce its top-10 without this package."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from metarec_dist.cli import main
from metarec_dist.data.batches import left_padded
from metarec_dist.eval.retrieval_ranking import excluded_rows
from metarec_dist.meta.saved_run import load_saved_run
from metarec_dist.retrieval.config import RetrievalConfig
from metarec_dist.retrieval.search import build_searcher, search_excluding
from tests.conftest import write_config


@pytest.fixture(scope="module")
def finished_run(synthetic_store, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("run")
    config = write_config(tmp_path, synthetic_store, method="target_only")
    assert main(["train", str(config)]) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    return run_dir


def test_evaluate_reproduces_the_run_metrics_and_keeps_earlier_evaluations(finished_run, capsys):
    results = json.loads((finished_run / "results.json").read_text())
    assert main(["evaluate", str(finished_run)]) == 0
    assert main(["evaluate", str(finished_run), "--set", "eval.retrieval.index=flat"]) == 0
    evaluations = sorted(finished_run.glob("evaluation-*.json"))
    assert len(evaluations) == 2
    by_index = {e["retrieval"]["index"]: e for e in (json.loads(path.read_text()) for path in evaluations)}
    exact, flat = by_index["exact"], by_index["flat"]
    for name, value in results["test"].items():
        assert exact["test"][name] == pytest.approx(value, abs=1e-12), name
        if name != "MRR":
            assert flat["test"][name] == pytest.approx(value, abs=1e-12), name
    assert "NDCG@10" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "train.steps=3"], "only eval.* may change"),
        (["--set", "eval.retrieval.index=lsh"], "eval.retrieval.index"),
    ],
)
def test_evaluate_refuses_bad_overrides(finished_run, capsys, args, message):
    assert main(["evaluate", str(finished_run), *args]) == 2
    assert message in capsys.readouterr().err


def test_a_run_without_a_saved_model_is_refused(tmp_path, capsys):
    (tmp_path / "config.yaml").write_text("method: metarec\n")
    for command in ("evaluate", "export"):
        assert main([command, str(tmp_path)]) == 2
        assert "no saved model (model.pt)" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "missing")]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_a_corrupt_saved_model_is_named(finished_run, tmp_path, capsys):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    (copy / "model.pt").write_bytes(b"not a torch file")
    assert main(["evaluate", str(copy)]) == 2
    assert "model.pt: unreadable" in capsys.readouterr().err


SERVE_WITHOUT_THE_PACKAGE = textwrap.dedent("""
    import sys
    sys.modules["metarec_dist"] = None  # importing the package now fails: prove we do not
    import json, faiss, numpy as np, pyarrow.parquet as pq, torch
    export, histories = sys.argv[1], np.load(sys.argv[2])
    program = torch.export.load(export + "/encoder.pt2").module()
    index = faiss.read_index(export + "/items.faiss")
    items = pq.read_table(export + "/items.parquet")
    queries = program(torch.from_numpy(histories)).detach().numpy()
    scores, rows = index.search(queries, 10 + histories.shape[1])
    top = []
    for user in range(len(histories)):
        seen = set(histories[user][histories[user] > 0].tolist())
        ids = [int(r) + 1 for r in rows[user] if r >= 0 and int(r) + 1 not in seen][:10]
        top.append(ids)
    assert items.column("item").to_pylist()[:3] == [1, 2, 3]
    print(json.dumps(top))
""")


def test_exported_pieces_reproduce_the_evaluation_top_10(finished_run, tmp_path, capsys):
    assert main(["export", str(finished_run)]) == 0
    (export,) = (finished_run / "exports").iterdir()
    manifest = json.loads((export / "manifest.json").read_text())
    assert manifest["index"] == "flat" and manifest["max_length"] == 10

    saved = load_saved_run(finished_run)
    split, target = saved.data.split, saved.config.data.target
    users = np.arange(0, split.num_users, 3)
    histories = left_padded(split.test_history, users, 10).astype(np.int64)
    np.save(tmp_path / "histories.npy", histories)
    served = subprocess.run(
        [sys.executable, "-c", SERVE_WITHOUT_THE_PACKAGE, str(export), str(tmp_path / "histories.npy")],
        capture_output=True, text=True, check=True,
    )
    # The evaluation's top-10: the package's own query vectors, exact searcher, histories excluded.
    import torch

    queries = saved.model.query_vectors(target, torch.from_numpy(histories)).numpy()
    searcher = build_searcher(saved.model.item_vectors(target), RetrievalConfig())
    excluded = [np.unique(row[row > 0]) - 1 for row in histories]
    expected = search_excluding(searcher, queries, 10, excluded).rows + 1
    assert json.loads(served.stdout) == expected.tolist()
    catalog = saved.data.catalogs[target]
    assert excluded_rows(split.test_history, users[:1], split.test_item, catalog, saved.config.eval) is not None
