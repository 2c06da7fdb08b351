"""A million-item domain trains on one machine: a step reads and updates only the items it uses."""

import json
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow

ITEMS = 1_000_000
PEAK_RSS_LIMIT_MB = 3_500  # issue target: 4 GB per worker at 1M items

TRAIN_A_MILLION_ITEM_DOMAIN = textwrap.dedent(f"""
    import json, time
    import numpy as np
    from metarec_dist.data.sequences import SequenceView
    from metarec_dist.machine import peak_resident_mb
    from metarec_dist.data.splits import leave_one_out, limit_target
    from metarec_dist.meta.config import ExperimentConfig
    from metarec_dist.meta.trainer import Trainer
    from metarec_dist.meta.training_data import TrainingData

    rng = np.random.default_rng(0)
    users, length = 2_000, 20
    values = (rng.zipf(1.3, users * length) % {ITEMS} + 1).astype(np.int32)  # Zipf popularity
    sequences = SequenceView.from_offsets(values, np.arange(0, users * length + 1, length))
    data = TrainingData("big", limit_target(leave_one_out(sequences), 1.0, 0), {{"big": {ITEMS}}}, {{}})
    config = ExperimentConfig(
        method="target_only", data={{"target": "big"}},
        model={{"width": 64, "encoder": {{"layers": 1, "heads": 2, "max_length": 20}}}},
        train={{"steps": 6, "batch_size": 64, "eval_every": 3, "threads": 2}})
    trainer = Trainer(config, data, progress=False)
    started = time.perf_counter()
    outcome = trainer.run()
    print(json.dumps({{
        "peak_rss_mb": peak_resident_mb(),
        "seconds": time.perf_counter() - started,
        "full_softmax": trainer.model.uses_full_softmax("big"),
        "row_sparse": trainer.model.row_sparse_names(),
        "test": outcome.results["test"],
        "losses": [entry["train_loss"] for entry in outcome.results["history"]],
    }}))
""")


def test_a_million_item_domain_trains_and_validates_within_a_bounded_peak_memory():
    done = subprocess.run([sys.executable, "-c", TRAIN_A_MILLION_ITEM_DOMAIN], capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    run = json.loads(done.stdout.strip().splitlines()[-1])
    # The logits of a full softmax alone would be positions x items: about 5 GB per tensor here.
    assert not run["full_softmax"] and run["row_sparse"] == ["domains.big.embedding.weight"]
    assert run["peak_rss_mb"] < PEAK_RSS_LIMIT_MB, run
    assert run["test"]["users"] == 2_000 and all(0 < loss < 100 for loss in run["losses"])


def test_a_catalog_too_large_for_the_full_softmax_is_refused_naming_the_loss_that_fits(tmp_path, capsys):
    from metarec_dist.cli import main
    from metarec_dist.meta.config import ExperimentConfig
    from metarec_dist.meta.memory_check import training_bytes
    from metarec_dist.retrieval.memory import available_bytes

    users = 100_000  # 300,000 distinct items, three events per user
    csv = tmp_path / "wide.csv"
    csv.write_text("user,item\n" + "".join(f"{u},{3 * u + k}\n" for u in range(users) for k in range(3)))
    assert main(["data", "import", str(csv), "--store", str(tmp_path / "store"), "--name", "wide",
                 "--user-column", "user", "--item-column", "item", "--timestamp-column", ""]) == 0
    config = tmp_path / "wide.yaml"
    config.write_text(f"method: target_only\ndata: {{store: {tmp_path / 'store'}, target: wide}}\n"
                      f"train: {{batch_size: 256}}\nmodel: {{encoder: {{max_length: 50}}}}\n"
                      f"runner: {{workers: 1}}\noutput_dir: {tmp_path / 'runs'}\n")
    full = ExperimentConfig.model_validate({"method": "target_only", "data": {"target": "wide"},
                                            "train": {"batch_size": 256}, "model": {"loss": "full"}})
    assert training_bytes(full, {"wide": 3 * users}) > available_bytes()  # logits: 12,800 x 300,001 floats x 3
    capsys.readouterr()

    assert main(["train", str(config), "--set", "model.loss=full"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "model.loss" in error and "300,000 items" in error and "set model.loss: sampled" in error
    assert not (tmp_path / "runs").exists()  # nothing written
