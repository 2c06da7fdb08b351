"""Vector quantization: the shared item space every domain maps into.

Two kinds (``VQConfig.kind``), both built from ``num_codebooks`` codebooks of
``codewords`` entries:

- ``product`` (default): z of width D is cut into M sub-vectors of width D/M;
  sub-vector m is replaced by its nearest (L2) codeword in codebook m, and the
  quantized item is their concatenation;
- ``residual``: codebook 1 quantizes z, codebook 2 what is left
  (z - c_1), and so on; the quantized item is the sum c_1 + ... + c_M, which
  approximates z more closely with every level (codewords are full width D).

Either way all domains speak one vocabulary of ``codewords ** codebooks``
combinations while the codebooks stay small, and shardable by codebook across
workers.

Training: straight-through gradients (the forward value is the quantized
vector, the backward passes to z unchanged), a codebook loss pulling each
codeword to what it quantized and a commitment loss (weight ``commitment``)
pulling z to its quantized vector, as in VQ-VAE. Codebook health is tracked
from assignment counts: perplexity and dead codes, which ``reinit_dead_codes``
replaces with recently quantized vectors at step boundaries (never inside
``forward``). With ``codes: per_step`` a training step finds its items' codes
once, before its forwards (``StepCodes``), and ``forward`` looks them up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from metarec_dist.config import StrictModel


class VQConfig(StrictModel):
    """The codebook; its total width is the model's shared width (``ModelConfig.width``)."""

    kind: Literal["product", "residual"] = "product"
    num_codebooks: int = Field(4, ge=1, description="sub-spaces (product) or levels (residual)")
    codewords: int = Field(64, ge=2, description="codewords per codebook")
    commitment: float = Field(0.25, ge=0, description="weight of the commitment loss")
    init: Literal["random", "data"] = Field(
        "random", description="data: codewords start as samples of the items' vectors (initialize_from)"
    )
    normalize: bool = Field(
        False, description="quantize z / ||z||: every domain's items on the unit sphere, whatever its table's scale"
    )
    dead_code_threshold: float = Field(
        0.0, ge=0, description="a codeword used at most this often since the last check is dead"
    )
    codes: Literal["live", "per_step"] = Field(
        "live", description="live: every forward finds its items' nearest codewords; per_step: a training "
        "step finds them once, before its forwards, against the codebook it starts from (the inner loop's "
        "adapted codewords then move the quantized vectors, not the codes). A codebook searched where it "
        "lives (runner.shard_codebook_from) is always per_step"
    )


RECENT_VECTORS = 4096  # the last quantized sub-vectors kept as replacements for dead codewords


@dataclass
class StepCodes:
    """Codes found before a step (``vq.codes: per_step``): per domain, the sorted item ids and their
    codes ``[n, M]``, which index the codewords the quantizer holds for the step."""

    by_domain: dict[str, tuple[torch.Tensor, torch.Tensor]]

    def of(self, domain: str, ids: torch.Tensor) -> torch.Tensor:
        """The codes of items ``ids`` of ``domain`` (each must have been found for the step)."""
        if domain not in self.by_domain:
            raise RuntimeError(f"no codes were found for domain '{domain}' this step: load its items first")
        known, codes = self.by_domain[domain]
        rows = torch.searchsorted(known, ids).clamp_max(len(known) - 1)
        if not torch.equal(known[rows], ids):
            missing = ids[known[rows] != ids][:5].tolist()
            raise RuntimeError(f"items {missing} of '{domain}' have no codes this step: load them first")
        return codes[rows]


@dataclass
class Quantized:
    vectors: torch.Tensor  # [..., D] straight-through: value = codewords, gradient -> z
    codes: torch.Tensor  # [..., M] int64 codeword index per codebook
    loss: torch.Tensor  # scalar: codebook loss + commitment * commitment loss


def nearest_codewords(sub_vectors: torch.Tensor, codebooks: torch.Tensor, rows: int = 512) -> torch.Tensor:
    """Index of the L2-nearest codeword: sub_vectors [n, M, d], codebooks [M, K, d] -> [n, M].

    ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2; ||x||^2 is the same for every c, so it is dropped.
    Computed ``rows`` vectors at a time, one matrix multiply per codebook: the [rows, K]
    distances stay in cache instead of an [n, M, K] tensor going through memory
    (``benchmarks/bench_quantizer.py`` compares the two).
    """
    by_book = sub_vectors.transpose(0, 1)  # [M, n, d]
    books, n = by_book.shape[:2]
    norms = codebooks.pow(2).sum(-1).unsqueeze(1)  # [M, 1, K]
    transposed = codebooks.transpose(1, 2)  # [M, d, K]
    # Every buffer is allocated once: per-chunk tensors would fragment the heap on large catalogs.
    codes = torch.empty(n, books, dtype=torch.long, device=sub_vectors.device)
    distances = torch.empty(books * min(rows, n) * codebooks.shape[1], dtype=sub_vectors.dtype,
                            device=sub_vectors.device)
    chunk_codes = torch.empty(books * min(rows, n), dtype=torch.long, device=sub_vectors.device)
    for begin in range(0, n, rows):
        part = by_book[:, begin : begin + rows]  # [M, r, d]
        r = part.shape[1]
        chunk = distances[: books * r * codebooks.shape[1]].view(books, r, codebooks.shape[1])
        torch.baddbmm(norms, part, transposed, alpha=-2, out=chunk)
        torch.argmin(chunk, dim=-1, out=chunk_codes[: books * r].view(books, r))
        codes[begin : begin + r].copy_(chunk_codes[: books * r].view(books, r).t())
    return codes


class VectorQuantizer(nn.Module):
    def __init__(self, config: VQConfig, width: int):
        super().__init__()
        if config.kind == "product" and width % config.num_codebooks:
            raise ValueError(f"width {width} is not divisible by num_codebooks {config.num_codebooks}")
        self.config = config
        self.width = width
        self.code_width = width // config.num_codebooks if config.kind == "product" else width
        self.codebooks = nn.Parameter(torch.randn(config.num_codebooks, config.codewords, self.code_width) * 0.1)
        # Health statistics: buffers, not parameters (no gradients, not meta-learned).
        self.register_buffer("usage", torch.zeros(config.num_codebooks, config.codewords), persistent=False)
        self.recent: torch.Tensor | None = None  # recently quantized sub-vectors: dead-code replacements
        # Set for a step with ``codes: per_step`` (``metarec_dist.meta.step_codes``); None: search in forward.
        self.step_codes: StepCodes | None = None

    def forward(self, z: torch.Tensor, codes: torch.Tensor | None = None) -> Quantized:
        """Quantize z [..., D]; ``codes`` [n, M]: found before the step, not searched (nor counted) here."""
        lead = z.shape[:-1]
        flat = self.flat_input(z)  # [n, D]
        searched = codes is None
        if self.config.kind == "product":
            quantized_part = flat.reshape(-1, self.config.num_codebooks, self.code_width)  # [n, M, d]
            if searched:
                codes = self.search(quantized_part)
        elif not searched:
            raise ValueError("codes found before a step need vq.kind product")
        else:
            quantized_part, codes = self._residual_levels(flat.detach())  # [n, M, D], [n, M]
        book = torch.arange(self.config.num_codebooks, device=z.device).unsqueeze(0)  # [1, M]
        chosen = self.codebooks[book, codes]  # [n, M, d]
        quantized = chosen.reshape(-1, self.width) if self.config.kind == "product" else chosen.sum(dim=1)
        codebook_loss = (chosen - quantized_part.detach()).pow(2).mean()
        commitment_loss = (flat - quantized.detach()).pow(2).mean()
        if self.training and searched:
            self.record(codes, quantized_part.detach())
        return Quantized(
            vectors=(flat + (quantized - flat).detach()).reshape(*lead, self.width),
            codes=codes.reshape(*lead, self.config.num_codebooks),
            loss=codebook_loss + self.config.commitment * commitment_loss,
        )

    @torch.no_grad()
    def search(self, sub_vectors: torch.Tensor) -> torch.Tensor:
        """Nearest codeword of each sub-vector ``[n, M, d]`` in every codebook held: ``[n, M]``."""
        return nearest_codewords(sub_vectors.detach().float(), self.codebooks.detach().float())

    def flat_input(self, z: torch.Tensor) -> torch.Tensor:
        """What the codebooks quantize: z as [n, D], on the unit sphere if ``normalize``."""
        flat = z.reshape(-1, self.width)
        return torch.nn.functional.normalize(flat, dim=-1) if self.config.normalize else flat

    @torch.no_grad()
    def initialize_from(self, vectors: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Codewords := random samples of what each codebook will quantize (k-means-style seeding).

        Random codewords far from the data leave most of them unused from the
        first step on; seeding from the vectors starts every codeword where items are.
        """
        flat = self.flat_input(vectors.detach().float())
        residual = flat
        for level in range(self.config.num_codebooks):
            if self.config.kind == "product":
                pool = flat[:, level * self.code_width : (level + 1) * self.code_width]
            else:
                pool = residual
            replace = len(pool) < self.config.codewords
            pick = (
                torch.randint(len(pool), (self.config.codewords,), generator=generator)
                if replace
                else torch.randperm(len(pool), generator=generator)[: self.config.codewords]
            )
            self.codebooks[level] = pool[pick].to(self.codebooks.dtype)
            if self.config.kind == "residual":
                codes = nearest_codewords(residual.unsqueeze(1), self.codebooks[level : level + 1].float())[:, 0]
                residual = residual - self.codebooks[level, codes].float()

    @torch.no_grad()
    def _residual_levels(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy residual assignment: what each level quantized [n, M, D] and its codes [n, M]."""
        residual = flat.float()
        levels, codes = [], []
        for level in range(self.config.num_codebooks):
            book = self.codebooks[level : level + 1].detach().float()  # [1, K, D]
            code = nearest_codewords(residual.unsqueeze(1), book)[:, 0]  # [n]
            levels.append(residual)
            codes.append(code)
            residual = residual - book[0, code]
        return torch.stack(levels, dim=1).to(flat.dtype), torch.stack(codes, dim=1)

    @torch.no_grad()
    def record(self, codes: torch.Tensor, sub: torch.Tensor) -> None:
        counts = torch.zeros_like(self.usage)
        counts.scatter_add_(1, codes.t(), torch.ones_like(codes.t(), dtype=counts.dtype))
        self.usage += counts
        self.recent = sub[-RECENT_VECTORS:].float()  # what each codebook quantized: candidates for dead codes

    @torch.no_grad()
    def health(self, usage: torch.Tensor | None = None) -> dict[str, float]:
        """Perplexity (mean over codebooks; K = all codes used evenly) and dead-code fraction.

        ``usage``: assignment counts to read instead of this process's own (e.g. summed over workers).
        """
        usage = self.usage if usage is None else usage
        total = usage.sum(dim=1, keepdim=True).clamp_min(1)
        probabilities = usage / total
        entropy = -(probabilities * probabilities.clamp_min(1e-12).log()).sum(dim=1)
        dead = (usage <= self.config.dead_code_threshold).float().mean()
        return {"perplexity": float(entropy.exp().mean()), "dead_fraction": float(dead)}

    @torch.no_grad()
    def reinit_dead_codes(self, generator: torch.Generator | None = None) -> int:
        """Replace codewords unused since the last call by recent sub-vectors; reset counts."""
        replaced = 0
        if self.recent is not None and self.usage.sum() > 0:
            for book in range(self.config.num_codebooks):
                dead = torch.nonzero(self.usage[book] <= self.config.dead_code_threshold).flatten()
                if len(dead):
                    pick = torch.randint(len(self.recent), (len(dead),), generator=generator)
                    self.codebooks[book, dead] = self.recent[pick, book].to(self.codebooks.dtype)
                    replaced += len(dead)
        self.usage.zero_()
        return replaced
