"""MetaRec on the embedded synthetic domains: the target listens to related sources."""

from pathlib import Path

import numpy as np

from metarec_dist.config import load_config
from metarec_dist.data.store import DomainStore
from metarec_dist.data.synthetic import SyntheticConfig, generate_store
from metarec_dist.meta.config import RunConfig
from metarec_dist.meta.trainer import Trainer, load_training_data

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


def test_metarec_weights_related_sources_above_unrelated_and_noise_sources(tmp_path):
    store = DomainStore(tmp_path / "store")
    generate_store(SyntheticConfig(), store)
    config = load_config(RunConfig, QUICKSTART, [f"data.store={store.root}", "train.steps=150",
                                                 "train.patience=10", f"output_dir={tmp_path / 'runs'}"])
    results = Trainer(config, load_training_data(config), progress=False).run().results
    by_kind: dict[str, list[float]] = {}
    for source, summary in results["source_weights"]["final"].items():
        by_kind.setdefault(source.split("-")[1], []).append(summary["mean_relative_weight"])
    mean = {kind: float(np.mean(weights)) for kind, weights in by_kind.items()}
    # Measured over seeds 0-2: related 1.09-1.14, unrelated 0.83-1.01, noise 0.75-0.90.
    assert mean["related"] > 1.0
    assert mean["related"] > mean["unrelated"] and mean["related"] > mean["noise"]
