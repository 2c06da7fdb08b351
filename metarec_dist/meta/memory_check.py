"""Will a run fit in memory? An estimate from the domains' sizes, checked before anything is written.

Per process, the estimate adds: every item table this process holds with its
Adam moments (a dense gradient too, where the table's gradients are not
row-sparse); the largest loss of one batch (the full softmax's logits are
positions x items, with their softmax and gradient); and the target's
evaluation (its item vectors and the searcher's copy). A distributed run's
sources are divided over its workers, all on this machine unless the run joins
a cluster (``runner.address``), where it is not checked.
"""

from __future__ import annotations

from metarec_dist.data.store import DomainStore
from metarec_dist.errors import ConfigError
from metarec_dist.meta.config import ExperimentConfig
from metarec_dist.model.recommender import has_row_sparse_table, uses_full_softmax
from metarec_dist.retrieval.memory import HEADROOM, available_bytes, index_bytes

FLOAT = 4
LOGIT_TENSORS = 3  # logits, their log-softmax, their gradient


def loss_bytes(config: ExperimentConfig, num_items: int, full_softmax: bool) -> int:
    """The largest tensors of one batch's loss: positions x scored items, three times."""
    positions = config.train.batch_size * config.model.encoder.max_length
    scored = num_items + 1 if full_softmax else positions + config.model.sampled_negatives
    return positions * scored * FLOAT * LOGIT_TENSORS


def table_bytes(config: ExperimentConfig, domain: str, num_items: int, row_sparse: bool) -> int:
    """A domain's item table with its two Adam moments (and its dense gradient unless row-sparse)."""
    model = config.effective_model
    width = model.item_widths.get(domain, model.item_width) if model.use_vq else model.width
    copies = 3 if row_sparse else 4
    return (num_items + 1) * width * FLOAT * copies


def training_bytes(config: ExperimentConfig, catalogs: dict[str, int], loss: str | None = None) -> int:
    """Estimated peak memory of one process (``loss`` overrides ``model.loss``)."""
    model = config.effective_model if loss is None else config.effective_model.model_copy(update={"loss": loss})
    workers = config.runner.workers
    target = config.data.target
    total, largest_loss = 0, 0
    for domain, items in catalogs.items():
        full = uses_full_softmax(model, items)
        share = 1.0 if domain == target else 1.0 / workers
        total += int(table_bytes(config, domain, items, has_row_sparse_table(model, items)) * share)
        largest_loss = max(largest_loss, loss_bytes(config, items, full))
    evaluation = catalogs[target] * model.width * FLOAT + index_bytes(
        config.eval.retrieval.index, catalogs[target], model.width)
    return total + largest_loss + evaluation


def check_training_memory(config: ExperimentConfig) -> None:
    """Refuse a run that cannot fit this machine's available memory, naming the option that would."""
    if config.runner.address is not None:
        return
    store = DomainStore(config.data.store)
    domains = [config.data.target] + ([] if config.method == "target_only" else list(config.data.sources))
    catalogs = {domain: store.open(domain).num_items for domain in domains}
    needed, available = training_bytes(config, catalogs), available_bytes()
    if needed <= HEADROOM * available:
        return
    largest = max(catalogs, key=catalogs.get)
    fix = "use a machine with more memory or a cluster (runner.address)"
    sampled = training_bytes(config, catalogs, loss="sampled")
    if config.model.loss != "sampled" and sampled <= HEADROOM * available:
        fix = f"set model.loss: sampled (about {sampled / 2**30:.1f} GiB)"
    elif config.train.batch_size > 1:
        fix = f"lower train.batch_size, or {fix}"
    raise ConfigError(
        f"model.loss: training needs about {needed / 2**30:.1f} GiB (largest catalog: '{largest}', "
        f"{catalogs[largest]:,} items) but {available / 2**30:.1f} GiB is available; {fix}"
    )
