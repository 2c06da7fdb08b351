"""What a training process reads: the target's split and its own sources, opened from the store."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from metarec_dist.data.sequences import SequenceView
from metarec_dist.data.splits import LeaveOneOutSplit, leave_one_out, limit_target
from metarec_dist.data.store import DomainStore
from metarec_dist.errors import ConfigError
from metarec_dist.meta.config import ExperimentConfig


@dataclass
class TrainingData:
    target: str
    split: LeaveOneOutSplit  # limited-target training rows; validation and test for every user
    catalogs: dict[str, int]  # domain -> number of items
    sources: dict[str, SequenceView]  # a source's whole sequences are training data

    def event_counts(self, domain: str) -> np.ndarray:
        """Training events per item id ``[N + 1]`` (index 0, padding, is 0): the target's limited
        training prefixes, or a source's whole sequences."""
        if domain == self.target:
            items = self.split.train.flat_rows(self.split.training_users)[2]
        else:
            view = self.sources[domain]
            items = view.flat_rows(np.arange(len(view)))[2]
        return np.bincount(items, minlength=self.catalogs[domain] + 1)


def check_domains_present(config: ExperimentConfig, sources: list[str] | None = None) -> None:
    """The target and ``sources`` (default: all configured) are in the store: reads their metadata only."""
    store = DomainStore(config.data.store)
    opening = config.data.sources if sources is None else sources
    wanted = [("data.target", config.data.target)] + [("data.sources", s) for s in opening]
    for field_name, domain in wanted:
        if domain not in store:
            present = ", ".join(store.names()[:10]) or "none"
            raise ConfigError(
                f"{field_name}: domain '{domain}' is not in the store {store.root} (present: {present}); "
                "import or generate it first"
            )


def load_training_data(config: ExperimentConfig, sources: list[str] | None = None) -> TrainingData:
    """Open the target and the sources (default: all configured; a worker: its shard), nothing else."""
    check_domains_present(config, sources)
    store = DomainStore(config.data.store)
    opening = config.data.sources if sources is None else sources
    target = store.open(config.data.target)
    split = limit_target(
        leave_one_out(target.sequences), config.data.limited_target_fraction, config.data.split_seed
    )
    opened = {name: store.open(name) for name in opening}
    catalogs = {config.data.target: target.num_items}
    catalogs.update({name: domain.num_items for name, domain in opened.items()})
    return TrainingData(
        target=config.data.target,
        split=split,
        catalogs=catalogs,
        sources={name: domain.sequences for name, domain in opened.items()},
    )
