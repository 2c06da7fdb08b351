"""Per-domain item tables + the shared VQ space + the shared encoder = a recommender.

Parameters split in two, which meta-learning relies on:
- shared (theta): the encoder and the codebook, named ``encoder.*`` and
  ``quantizer.*``; every domain reads them;
- domain-local: ``domains.<key>.*``, one item table (own ids, own width) and
  one adapter into the shared space per domain, trained only by that domain.

With ``use_vq`` off (the target-only baseline) a domain's items are plain id
embeddings of the shared width and no codebook exists.
"""

from __future__ import annotations

import copy
import hashlib
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from metarec_dist.config import StrictModel
from metarec_dist.data.batches import NextItemBatch
from metarec_dist.model.encoder import EncoderConfig, SequenceEncoder
from metarec_dist.model.vq import VectorQuantizer, VQConfig

PAD = 0
SHARED_PREFIXES = ("encoder.", "quantizer.")


class ModelConfig(StrictModel):
    width: int = Field(64, ge=2, description="width of the shared space and the encoder")
    item_width: int = Field(64, ge=1, description="default width of a domain's own item table")
    item_widths: dict[str, int] = Field(default_factory=dict, description="per-domain item widths")
    use_vq: bool = Field(True, description="map items through the shared codebook (off: target-only ids)")
    item_init_std: float | None = Field(
        None, gt=0, description="std of the item tables' initial entries (unset: 1/sqrt(item width) "
        "through an adapter, 0.02 for id tables as in SASRec)"
    )
    adapter_init: Literal["random", "identity"] = Field(
        "random", description="identity: the adapter starts as the identity map (a rectangular one "
        "where the widths differ) with zero bias, so the shared space starts as the item table"
    )
    score_with: Literal["continuous", "quantized"] = Field(
        "continuous", description="item vectors the encoder output is scored against"
    )
    loss: Literal["auto", "full", "sampled"] = Field(
        "auto", description="full: softmax over the whole catalog; sampled: over the batch's targets plus "
        "sampled_negatives uniform items, logQ-corrected; auto: full up to full_softmax_max_items, else sampled"
    )
    full_softmax_max_items: int = Field(
        50_000, ge=1, description="loss auto: the largest catalog trained with the full softmax (its logits are "
        "positions x items)"
    )
    sampled_negatives: int = Field(
        4096, ge=1, description="uniform negatives shared by a batch (sampled softmax; docs/RESULTS.md compares "
        "counts against the full softmax); at least the catalog's size: every item, which is the full softmax"
    )
    item_gradients: Literal["row_sparse", "dense"] = Field(
        "row_sparse", description="row_sparse: a table trained with the sampled softmax gets the gradient of the "
        "rows a step read only, and only those rows are updated (lazy Adam); the full softmax scores, so "
        "updates, every row"
    )
    precision: Literal["fp32", "bf16"] = "fp32"
    vq: VQConfig = VQConfig()
    encoder: EncoderConfig = EncoderConfig()


def uses_full_softmax(config: ModelConfig, num_items: int) -> bool:
    """Whether a domain of ``num_items`` trains with the full softmax (``loss``, ``full_softmax_max_items``)."""
    if config.loss == "auto":
        return num_items <= config.full_softmax_max_items
    return config.loss == "full"


def has_row_sparse_table(config: ModelConfig, num_items: int) -> bool:
    """Whether such a domain's item table gets row-sparse gradients (the sampled softmax reads few rows)."""
    return config.item_gradients == "row_sparse" and not uses_full_softmax(config, num_items)


def module_key(domain: str) -> str:
    """ModuleDict keys may not contain '.', domain names may."""
    return domain.replace(".", "-")


class DomainItems(nn.Module):
    """One domain's item table in its own id space and width, and its adapter."""

    def __init__(
        self,
        num_items: int,
        width: int,
        shared_width: int,
        adapter: bool,
        generator: torch.Generator,
        init_std: float | None = None,
        adapter_init: Literal["random", "identity"] = "random",
    ):
        super().__init__()
        self.num_items = num_items
        self.row_sparse = False  # set by the model: gradients of the rows read only
        # Sorted item ids whose rows ``embedding.weight`` holds (None: every row). A table split
        # by rows over workers holds only what the current step reads (``hold_rows``).
        self.resident: torch.Tensor | None = None
        self.embedding = nn.Embedding(num_items + 1, width, padding_idx=PAD)
        # Unless init_std says otherwise: through an adapter, tables start at unit-scale rows
        # (1/sqrt(width) per entry) so quantization has distinct vectors to tell apart; id
        # tables as in SASRec (0.02).
        std = init_std or (0.02 if not adapter else 1.0 / width**0.5)
        with torch.no_grad():
            self.embedding.weight.normal_(0.0, std, generator=generator)
            self.embedding.weight[PAD].zero_()
        self.adapter = None
        if adapter:
            self.adapter = nn.Linear(width, shared_width)
            bound = 1.0 / width**0.5  # nn.Linear's default range, drawn from this domain's stream
            with torch.no_grad():
                if adapter_init == "identity":
                    nn.init.eye_(self.adapter.weight)
                    self.adapter.bias.zero_()
                else:
                    self.adapter.weight.uniform_(-bound, bound, generator=generator)
                    self.adapter.bias.uniform_(-bound, bound, generator=generator)

        # Each item's share of the domain's training events (set by the trainer): the
        # sampled softmax's proposal for in-batch negatives. Unset: uniform.
        self.register_buffer("event_share", torch.full((num_items + 1,), 1.0 / num_items), persistent=False)

    def forward(self, ids: torch.Tensor | None = None) -> torch.Tensor:
        """Items' vectors before quantization: ``ids`` [R] -> [R, D]; None: every row, [N + 1, D]
        (row 0 is padding). Only the rows asked for are read and adapted."""
        weight = self.embedding.weight
        if ids is None:
            if self.resident is not None:
                raise RuntimeError("this table holds some rows only: assemble it before reading every row")
            rows = weight
        else:
            local = ids if self.resident is None else self._resident_rows(ids)
            rows = F.embedding(local, weight, sparse=self.row_sparse)
        return rows if self.adapter is None else self.adapter(rows)

    def _resident_rows(self, ids: torch.Tensor) -> torch.Tensor:
        rows = torch.searchsorted(self.resident, ids).clamp_max(len(self.resident) - 1)
        if not torch.equal(self.resident[rows], ids):
            missing = ids[self.resident[rows] != ids][:5].tolist()
            raise RuntimeError(f"items {missing} are not among the rows this table holds: load them first")
        return rows

    @torch.no_grad()
    def hold_rows(self, ids: torch.Tensor | None, rows: torch.Tensor) -> None:
        """Make the table hold ``rows``, the rows of items ``ids`` (sorted; None: the whole table)."""
        self.embedding.weight.data = rows
        self.resident = ids


@dataclass
class ItemTables:
    """Some items' vectors: row r is item ``ids[r]``; ``ids`` None: every item, row j is item j."""

    ids: torch.Tensor | None  # sorted, unique, starting with padding (0)
    inputs: torch.Tensor  # [R, D] what the encoder reads (the padding row zero)
    outputs: torch.Tensor  # [R, D] what scores are taken against
    vq_loss: torch.Tensor  # scalar (0 without VQ)

    def rows_of(self, items: torch.Tensor) -> torch.Tensor:
        """Rows holding ``items`` (each must be among ``ids``)."""
        return items if self.ids is None else torch.searchsorted(self.ids, items)


@dataclass
class LossOutput:
    loss: torch.Tensor  # recommendation loss + VQ loss
    recommendation: torch.Tensor
    vq: torch.Tensor


class SequenceRecommender(nn.Module):
    def __init__(self, config: ModelConfig, catalogs: dict[str, int]):
        """``catalogs``: domain name -> number of items (ids 1..N)."""
        super().__init__()
        self.config = config
        self.encoder = SequenceEncoder(config.width, config.encoder)
        self.quantizer = VectorQuantizer(config.vq, config.width) if config.use_vq else None
        keys = [module_key(name) for name in catalogs]
        if len(set(keys)) != len(keys):
            raise ValueError(f"domain names collide once '.' becomes '-': {sorted(catalogs)}")
        # Each domain's parameters come from a random stream of its own (one draw of the
        # global generator, plus the domain's name), so a domain starts the same whichever
        # other domains share the process: a worker holding a shard of the sources builds
        # exactly the tables the single-process model has.
        domain_seed_base = int(torch.randint(0, 2**62, ()))
        with torch.random.fork_rng(devices=[]):  # nn.Linear's own default init must not move the global stream
            self.domains = nn.ModuleDict(
                {
                    module_key(name): DomainItems(
                        num_items,
                        config.item_widths.get(name, config.item_width) if config.use_vq else config.width,
                        config.width,
                        adapter=config.use_vq,
                        generator=torch.Generator().manual_seed(domain_seed_base ^ _stable_hash(name)),
                        init_std=config.item_init_std,
                        adapter_init=config.adapter_init,
                    )
                    for name, num_items in catalogs.items()
                }
            )
        for name, items in zip(catalogs, self.domains.values()):
            # The flag on the parameter too: code holding only the tensor (meta-gradients) reads it.
            items.row_sparse = items.embedding.weight.row_sparse = self._row_sparse(name)
        self.initialize_codebook()

    @torch.no_grad()
    def initialize_codebook(self, generator: torch.Generator | None = None) -> None:
        """Seed the codebook from every domain's item vectors (``vq.init: data``); done at construction."""
        if self.quantizer is None or self.config.vq.init != "data":
            return
        vectors = torch.cat([items()[1:] for items in self.domains.values()])
        self.quantizer.initialize_from(vectors, generator)

    # --- parameter groups -------------------------------------------------------

    # Parameters are fixed once built; these lookups are cached because walking the module
    # tree costs O(domains) per call, which a meta-step must not pay with hundreds of domains.

    def parameter_index(self) -> dict[str, nn.Parameter]:
        """name -> parameter, for every parameter (cached)."""
        if "_parameter_index" not in self.__dict__:
            self.__dict__["_parameter_index"] = dict(self.named_parameters())
        return self.__dict__["_parameter_index"]

    def shared_names(self) -> list[str]:
        return [name for name in self.parameter_index() if name.startswith(SHARED_PREFIXES)]

    def local_names(self, domain: str) -> list[str]:
        prefix = f"domains.{module_key(domain)}."
        return [name for name in self.parameter_index() if name.startswith(prefix)]

    def restricted_to(self, domains: tuple[str, ...]) -> SequenceRecommender:
        """A view holding only ``domains``' tables; every module (so every parameter) is shared.

        ``torch.func.functional_call`` walks every parameter of the module it is
        given; a task touches the shared parts and one or two domains, so it runs
        on this view and its cost does not grow with the number of domains.
        """
        views = self.__dict__.setdefault("_views", {})
        if domains not in views:
            view = copy.copy(self)  # shallow: the same submodules, parameters and buffers
            view.__dict__ = {k: v for k, v in self.__dict__.items() if k not in ("_views", "_parameter_index")}
            view._modules = dict(self._modules)
            view._modules["domains"] = nn.ModuleDict({module_key(d): self.domains[module_key(d)] for d in domains})
            views[domains] = view
        return views[domains]

    # --- forward pieces ----------------------------------------------------------

    def item_tables(self, domain: str, ids: torch.Tensor | None = None) -> ItemTables:
        """Items ``ids`` (sorted, unique, starting with padding 0; None: the whole catalog) adapted and
        quantized. A training step passes the ids it reads: only those rows are read and quantized."""
        z = self.domains[module_key(domain)](ids)  # [R, D]
        if self.quantizer is None:
            return ItemTables(ids=ids, inputs=z, outputs=z, vq_loss=z.new_zeros(()))
        codes = None
        if self.quantizer.step_codes is not None:  # vq.codes per_step: found before the step
            if ids is None:
                raise RuntimeError("a step's codes cover the items it reads: quantize the catalog outside a step")
            codes = self.quantizer.step_codes.of(domain, ids[1:])
        quantized = self.quantizer(z[1:], codes)  # padding is not quantized
        inputs = torch.cat([z.new_zeros(1, z.shape[1]), quantized.vectors])
        outputs = inputs if self.config.score_with == "quantized" else z
        return ItemTables(ids=ids, inputs=inputs, outputs=outputs, vq_loss=quantized.loss)

    def quantized_ids(self, domain: str, inputs: torch.Tensor) -> torch.Tensor:
        """The item ids (sorted, no padding) ``forward`` quantizes for a batch of ``inputs`` (scores are
        taken against the continuous vectors, as codes found before a step require)."""
        if self.config.score_with != "continuous":
            raise ValueError("codes found before a step need model.score_with continuous")
        return _used_ids(inputs)[1:]

    @torch.no_grad()
    def quantizer_inputs(self, domain: str, ids: torch.Tensor) -> torch.Tensor:
        """What the codebooks quantize for items ``ids``: ``[n, M, d]`` fp32 sub-vectors, computed as a
        forward computes them (same precision), without gradient."""
        with self._autocast():
            z = self.domains[module_key(domain)](ids)
        flat = self.quantizer.flat_input(z)
        return flat.reshape(len(ids), self.config.vq.num_codebooks, -1).float()

    def hidden(self, inputs: torch.Tensor, tables: ItemTables) -> torch.Tensor:
        """Encoder states [B, L, D] for left-padded item ids [B, L]."""
        padding = inputs == PAD
        return self.encoder(tables.inputs[tables.rows_of(inputs)], padding)

    @property
    def device(self) -> torch.device:
        """Where the parameters are (one device per process: ``metarec_dist.device``)."""
        return next(self.parameters()).device

    def tensors(self, batch: NextItemBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch's inputs and targets as tensors on this model's device."""
        device = self.device
        return torch.as_tensor(batch.inputs, device=device), torch.as_tensor(batch.targets, device=device)

    def set_item_frequencies(self, domain: str, counts: torch.Tensor) -> None:
        """Events per item id ``[N + 1]`` in the domain's training data: the sampled softmax's proposal."""
        items = self.domains[module_key(domain)]
        share = counts.double().clamp_min(0)
        share[PAD] = 0
        items.event_share.copy_(share / share.sum().clamp_min(1))

    def uses_full_softmax(self, domain: str) -> bool:
        return uses_full_softmax(self.config, self.domains[module_key(domain)].num_items)

    def _row_sparse(self, domain: str) -> bool:
        return has_row_sparse_table(self.config, self.domains[module_key(domain)].num_items)

    def row_sparse_names(self) -> list[str]:
        """The item tables whose gradients are row-sparse (``item_gradients``)."""
        return [f"domains.{key}.embedding.weight" for key, items in self.domains.items() if items.row_sparse]

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.precision == "bf16")

    def forward(self, domain: str, inputs: torch.Tensor, targets: torch.Tensor,
                negatives: torch.Tensor | None = None) -> LossOutput:
        """Next-item cross-entropy at every non-padding position, plus the VQ loss of the items read.

        ``negatives``: the sampled softmax's uniform draws (``draw_negatives``; default: drawn here).

        The training loss is ``forward`` so ``torch.func.functional_call`` can run it
        with substituted (fast) parameters. Only the items the batch reads are
        quantized (and with the sampled softmax, only those and its candidates
        are adapted), so the VQ loss is over the items read.
        """
        positions = targets != PAD
        wanted = targets[positions]  # [P]
        full = self.uses_full_softmax(domain)
        with self._autocast():
            candidates, log_q = (None, None) if full else self._candidates(domain, wanted, negatives)
            if self.quantizer is not None and self.config.score_with == "quantized":
                # Scored items are quantized too: the items read are the inputs and the scored ones.
                tables = self.item_tables(domain, None if full else _used_ids(inputs, candidates))
                scored = tables.outputs if full else tables.outputs[tables.rows_of(candidates)]
            else:
                tables = self.item_tables(domain, _used_ids(inputs))
                scored = self.domains[module_key(domain)](candidates)  # [N + 1 or C, D]
            states = self.hidden(inputs, tables)[positions]  # [P, D]
            logits = states @ scored.t()
            if full:
                logits[:, PAD] = float("-inf")
                recommendation = F.cross_entropy(_at_least_fp32(logits), wanted)
            else:
                logits = _at_least_fp32(logits) - log_q
                recommendation = F.cross_entropy(logits, torch.searchsorted(candidates, wanted))
        vq_loss = _at_least_fp32(tables.vq_loss)
        return LossOutput(loss=recommendation + vq_loss, recommendation=recommendation, vq=vq_loss)

    def draw_negatives(self, domain: str) -> torch.Tensor | None:
        """The sampled softmax's ``sampled_negatives`` uniform item ids (every item if the catalog is no
        larger); None where the domain trains with the full softmax."""
        items = self.domains[module_key(domain)]
        if self.uses_full_softmax(domain):
            return None
        # Drawn from the CPU's stream on every device: the same draws on CPU and GPU, one state to checkpoint.
        if self.config.sampled_negatives >= items.num_items:
            return torch.arange(1, items.num_items + 1, device=self.device)
        return torch.randint(1, items.num_items + 1, (self.config.sampled_negatives,)).to(self.device)

    def rows_read(self, domain: str, inputs: torch.Tensor, targets: torch.Tensor,
                  negatives: torch.Tensor | None) -> torch.Tensor | None:
        """The item ids (sorted, padding first) whose rows ``forward`` with these arguments reads;
        None: every row (the full softmax scores the whole catalog)."""
        if self.uses_full_softmax(domain):
            return None
        if negatives is None:
            raise ValueError(f"domain '{domain}' trains with the sampled softmax: draw its negatives first")
        return _used_ids(inputs, targets, negatives)

    def _candidates(self, domain: str, wanted: torch.Tensor,
                    negatives: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The sampled softmax's items: the batch's targets (in-batch negatives for each other) plus
        ``sampled_negatives`` uniform draws, deduplicated and sorted; and log q, the log of each
        one's probability of being among them, which is subtracted from its logit (logQ correction):
        an item drawn often is not counted as more relevant for it. q = 1 - (1 - 1/N)^S (1 - p)^P,
        with p the item's share of the domain's training events and P the batch's targets."""
        items = self.domains[module_key(domain)]
        draws = self.config.sampled_negatives
        negatives = self.draw_negatives(domain) if negatives is None else negatives
        candidates = torch.unique(torch.cat([wanted, negatives.to(wanted.device)]))
        if draws >= items.num_items:  # every item is a candidate, surely: the full softmax
            return candidates, torch.zeros(len(candidates), device=wanted.device)
        log_missed = draws * math.log1p(-1.0 / items.num_items) + len(wanted) * torch.log1p(
            -items.event_share[candidates].clamp_max(1 - 1e-12))
        return candidates, torch.log(-torch.expm1(log_missed)).to(torch.float32)

    @torch.no_grad()
    def catalog(self, domain: str) -> ItemTables:
        """Every item adapted and quantized, without gradient: computed once per evaluation or export."""
        with self._autocast():
            return self.item_tables(domain)

    @torch.no_grad()
    def item_vectors(self, domain: str, catalog: ItemTables | None = None) -> torch.Tensor:
        """What a user's query vector is scored against: ``[N, D]`` fp32, row ``j`` = item ``j + 1``."""
        catalog = catalog if catalog is not None else self.catalog(domain)
        # A copy: without the VQ the outputs are the live embedding parameter.
        return _at_least_fp32(catalog.outputs[1:]).detach().clone()

    @torch.no_grad()
    def query_vectors(self, domain: str, inputs: torch.Tensor, catalog: ItemTables | None = None) -> torch.Tensor:
        """The encoder's state after each left-padded history ``[B, L]``: ``[B, D]`` fp32.

        ``catalog``: ``catalog(domain)`` computed once for many batches (default: only the rows
        ``inputs`` reads are computed)."""
        with self._autocast():
            inputs = inputs.to(self.device)
            tables = catalog if catalog is not None else self.item_tables(domain, _used_ids(inputs))
            return _at_least_fp32(self.hidden(inputs, tables)[:, -1]).detach()

    @torch.no_grad()
    def scores(self, domain: str, inputs: torch.Tensor) -> torch.Tensor:
        """Scores of every item for the next event: [B, N + 1] (padding column -inf)."""
        with self._autocast():
            tables = self.item_tables(domain)
            last = self.hidden(inputs.to(self.device), tables)[:, -1]  # [B, D]
            scores = _at_least_fp32(last @ tables.outputs.t())
        scores[:, PAD] = float("-inf")
        return scores


def _used_ids(*ids: torch.Tensor) -> torch.Tensor:
    """The distinct item ids in ``ids``, sorted, padding (0) first: the rows a step reads."""
    pad = torch.zeros(1, dtype=torch.long, device=ids[0].device)
    return torch.unique(torch.cat([pad, *(t.reshape(-1).long() for t in ids)]))


def _stable_hash(name: str) -> int:
    """A 62-bit hash of a domain name that is the same in every process (``hash`` is salted)."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little") >> 2


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Losses and scores in fp32 under bf16 autocast; float64 stays float64 (gradient checks)."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x
