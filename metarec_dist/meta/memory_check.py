"""Will a run fit in memory? An estimate from the domains' sizes, checked before anything is written.

The estimate covers every process of the run on this machine (a distributed
run's workers all run here unless it joins a cluster, ``runner.address``,
where it is not checked). Each worker holds: the target's item table with its
Adam moments (a dense gradient too where the table's gradients are not
row-sparse), or its block of it where the table is split by rows
(``runner.shard_target_rows_from``: then the whole table only while
validating), and the best state's copy; the largest loss of one batch (the
full softmax's logits are positions x items, with their softmax and gradient);
and the target's evaluation (its item vectors and the searcher's copy). The
sources' tables are divided over the workers.
"""

from __future__ import annotations

from metarec_dist.data.store import DomainStore
from metarec_dist.errors import ConfigError
from metarec_dist.meta.config import ExperimentConfig, target_table_is_split
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
    copies = 3 if row_sparse else 4
    return _values_bytes(config, domain, num_items) * copies


def _values_bytes(config: ExperimentConfig, domain: str, num_items: int) -> int:
    model = config.effective_model
    width = model.item_widths.get(domain, model.item_width) if model.use_vq else model.width
    return (num_items + 1) * width * FLOAT


def training_bytes(config: ExperimentConfig, catalogs: dict[str, int], loss: str | None = None) -> int:
    """Estimated peak memory of the run's processes on this machine (``loss`` overrides ``model.loss``)."""
    model = config.effective_model if loss is None else config.effective_model.model_copy(update={"loss": loss})
    workers, target = config.runner.workers, config.data.target
    target_items = catalogs[target]
    row_sparse = has_row_sparse_table(model, target_items)
    values = _values_bytes(config, target, target_items)
    if target_table_is_split(config.runner, target_items, row_sparse, workers):
        target_table = table_bytes(config, target, target_items, row_sparse) // workers + values  # + whole
    else:
        target_table = table_bytes(config, target, target_items, row_sparse)
    largest_loss = max(loss_bytes(config, items, uses_full_softmax(model, items)) for items in catalogs.values())
    evaluation = target_items * model.width * FLOAT + index_bytes(config.eval.retrieval.index, target_items,
                                                                  model.width)
    per_worker = target_table + values + largest_loss + evaluation  # values: the best state's copy
    sources = sum(table_bytes(config, domain, items, has_row_sparse_table(model, items))
                  for domain, items in catalogs.items() if domain != target)
    return workers * per_worker + sources


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
