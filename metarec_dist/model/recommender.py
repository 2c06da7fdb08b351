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
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from metarec_dist.config import StrictModel
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
    loss: Literal["full", "sampled"] = "full"
    sampled_negatives: int = Field(1024, ge=1, description="negatives per batch for the sampled softmax")
    precision: Literal["fp32", "bf16"] = "fp32"
    vq: VQConfig = VQConfig()
    encoder: EncoderConfig = EncoderConfig()


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

    def forward(self) -> torch.Tensor:
        """Every item's vector before quantization: [N + 1, D] (row 0 is padding)."""
        table = self.embedding.weight
        return table if self.adapter is None else self.adapter(table)


@dataclass
class ItemTables:
    inputs: torch.Tensor  # [N + 1, D] what the encoder reads (row 0 zero)
    outputs: torch.Tensor  # [N + 1, D] what scores are taken against
    vq_loss: torch.Tensor  # scalar (0 without VQ)


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

    def item_tables(self, domain: str) -> ItemTables:
        z = self.domains[module_key(domain)]()  # [N + 1, D]
        if self.quantizer is None:
            zero = z.new_zeros(())
            return ItemTables(inputs=z, outputs=z, vq_loss=zero)
        quantized = self.quantizer(z[1:])  # padding row is not quantized
        pad_row = z.new_zeros(1, z.shape[1])
        inputs = torch.cat([pad_row, quantized.vectors])
        outputs = inputs if self.config.score_with == "quantized" else z
        return ItemTables(inputs=inputs, outputs=outputs, vq_loss=quantized.loss)

    def hidden(self, inputs: torch.Tensor, tables: ItemTables) -> torch.Tensor:
        """Encoder states [B, L, D] for left-padded item ids [B, L]."""
        padding = inputs == PAD
        return self.encoder(tables.inputs[inputs], padding)

    def _autocast(self):
        device_type = next(self.parameters()).device.type
        return torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.config.precision == "bf16")

    def forward(self, domain: str, inputs: torch.Tensor, targets: torch.Tensor) -> LossOutput:
        """Next-item cross-entropy at every non-padding position, plus the VQ loss.

        The training loss is ``forward`` so ``torch.func.functional_call`` can run it
        with substituted (fast) parameters.
        """
        with self._autocast():
            tables = self.item_tables(domain)
            states = self.hidden(inputs, tables)
            positions = targets != PAD
            states, wanted = states[positions], targets[positions]  # [P, D], [P]
            if self.config.loss == "full":
                logits = states @ tables.outputs.t()  # [P, N + 1]
                logits[:, PAD] = float("-inf")
                recommendation = F.cross_entropy(_at_least_fp32(logits), wanted)
            else:
                recommendation = self._sampled_softmax(states, wanted, tables.outputs)
        vq_loss = _at_least_fp32(tables.vq_loss)
        return LossOutput(loss=recommendation + vq_loss, recommendation=recommendation, vq=vq_loss)

    def _sampled_softmax(self, states: torch.Tensor, wanted: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Softmax over the target and uniformly sampled negatives shared by the batch.

        Uniform proposals make the log-q correction a constant, so it cancels;
        a negative that happens to be a row's own target is masked out.
        """
        negatives = torch.randint(1, items.shape[0], (self.config.sampled_negatives,), device=states.device)
        positive = (states * items[wanted]).sum(-1, keepdim=True)  # [P, 1]
        negative = states @ items[negatives].t()  # [P, S]
        negative = negative.masked_fill(negatives[None, :] == wanted[:, None], float("-inf"))
        logits = _at_least_fp32(torch.cat([positive, negative], dim=1))
        return F.cross_entropy(logits, torch.zeros(len(wanted), dtype=torch.long, device=states.device))

    @torch.no_grad()
    def item_vectors(self, domain: str) -> torch.Tensor:
        """What a user's query vector is scored against: ``[N, D]`` fp32, row ``j`` = item ``j + 1``."""
        with self._autocast():
            # A copy: without the VQ the outputs are the live embedding parameter.
            return _at_least_fp32(self.item_tables(domain).outputs[1:]).detach().clone()

    @torch.no_grad()
    def query_vectors(self, domain: str, inputs: torch.Tensor) -> torch.Tensor:
        """The encoder's state after each left-padded history ``[B, L]``: ``[B, D]`` fp32."""
        with self._autocast():
            return _at_least_fp32(self.hidden(inputs, self.item_tables(domain))[:, -1]).detach()

    @torch.no_grad()
    def scores(self, domain: str, inputs: torch.Tensor) -> torch.Tensor:
        """Scores of every item for the next event: [B, N + 1] (padding column -inf)."""
        with self._autocast():
            tables = self.item_tables(domain)
            last = self.hidden(inputs, tables)[:, -1]  # [B, D]
            scores = _at_least_fp32(last @ tables.outputs.t())
        scores[:, PAD] = float("-inf")
        return scores


def _stable_hash(name: str) -> int:
    """A 62-bit hash of a domain name that is the same in every process (``hash`` is salted)."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little") >> 2


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Losses and scores in fp32 under bf16 autocast; float64 stays float64 (gradient checks)."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x
