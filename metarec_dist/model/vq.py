"""Product vector quantization: the shared item space every domain maps into.

A vector z of width ``num_codebooks * code_width`` is cut into
``num_codebooks`` sub-vectors; sub-vector m is replaced by its nearest (L2)
codeword in codebook m. The quantized item is the concatenation of its
codewords, so all domains speak one vocabulary of ``codewords ** codebooks``
combinations while the codebooks themselves stay small (and shardable by
codebook across workers).

Training: straight-through gradients (the forward value is the codeword, the
backward passes to z unchanged), a codebook loss pulling codewords to their
sub-vectors and a commitment loss (weight ``commitment``) pulling sub-vectors
to their codewords, as in VQ-VAE. Codebook health is tracked from assignment
counts: perplexity and dead codes, which ``reinit_dead_codes`` replaces with
recently seen sub-vectors at step boundaries (never inside ``forward``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pydantic import Field
from torch import nn

from metarec_dist.config import StrictModel


class VQConfig(StrictModel):
    """The codebook; its total width is the model's shared width (``ModelConfig.width``)."""

    num_codebooks: int = Field(4, ge=1, description="sub-spaces (product quantization)")
    codewords: int = Field(64, ge=2, description="codewords per codebook")
    commitment: float = Field(0.25, ge=0, description="weight of the commitment loss")
    dead_code_threshold: float = Field(
        0.0, ge=0, description="a codeword used at most this often since the last check is dead"
    )


@dataclass
class Quantized:
    vectors: torch.Tensor  # [..., D] straight-through: value = codewords, gradient -> z
    codes: torch.Tensor  # [..., M] int64 codeword index per codebook
    loss: torch.Tensor  # scalar: codebook loss + commitment * commitment loss


def nearest_codewords(sub_vectors: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """Index of the L2-nearest codeword: sub_vectors [n, M, d], codebooks [M, K, d] -> [n, M].

    ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2; ||x||^2 is the same for every c, so it is dropped.
    """
    cross = torch.einsum("nmd,mkd->nmk", sub_vectors, codebooks)  # [n, M, K]
    distances = codebooks.pow(2).sum(-1).unsqueeze(0) - 2 * cross
    return distances.argmin(dim=-1)


class ProductQuantizer(nn.Module):
    def __init__(self, config: VQConfig, width: int):
        super().__init__()
        if width % config.num_codebooks:
            raise ValueError(f"width {width} is not divisible by num_codebooks {config.num_codebooks}")
        self.config = config
        self.width = width
        self.code_width = width // config.num_codebooks
        self.codebooks = nn.Parameter(torch.randn(config.num_codebooks, config.codewords, self.code_width) * 0.1)
        # Health statistics: buffers, not parameters (no gradients, not meta-learned).
        self.register_buffer("usage", torch.zeros(config.num_codebooks, config.codewords), persistent=False)
        self._recent: torch.Tensor | None = None

    def forward(self, z: torch.Tensor) -> Quantized:
        """Quantize z [..., D] (D = num_codebooks * code_width)."""
        codebooks, config = self.codebooks, self.config
        lead = z.shape[:-1]
        sub = z.reshape(-1, config.num_codebooks, self.code_width)  # [n, M, d]
        with torch.no_grad():
            codes = nearest_codewords(sub.detach().float(), codebooks.detach().float())  # [n, M]
        book = torch.arange(config.num_codebooks, device=z.device).unsqueeze(0)  # [1, M]
        chosen = codebooks[book, codes]  # [n, M, d]
        codebook_loss = (chosen - sub.detach()).pow(2).mean()
        commitment_loss = (sub - chosen.detach()).pow(2).mean()
        straight_through = sub + (chosen - sub).detach()
        if self.training:
            self._record(codes, sub.detach())
        return Quantized(
            vectors=straight_through.reshape(*lead, self.width),
            codes=codes.reshape(*lead, config.num_codebooks),
            loss=codebook_loss + config.commitment * commitment_loss,
        )

    @torch.no_grad()
    def _record(self, codes: torch.Tensor, sub: torch.Tensor) -> None:
        counts = torch.zeros_like(self.usage)
        counts.scatter_add_(1, codes.t(), torch.ones_like(codes.t(), dtype=counts.dtype))
        self.usage += counts
        self._recent = sub[-4096:].float()  # candidates for re-initialising dead codes

    @torch.no_grad()
    def health(self) -> dict[str, float]:
        """Perplexity (mean over codebooks; K = all codes used evenly) and dead-code fraction."""
        total = self.usage.sum(dim=1, keepdim=True).clamp_min(1)
        probabilities = self.usage / total
        entropy = -(probabilities * probabilities.clamp_min(1e-12).log()).sum(dim=1)
        dead = (self.usage <= self.config.dead_code_threshold).float().mean()
        return {"perplexity": float(entropy.exp().mean()), "dead_fraction": float(dead)}

    @torch.no_grad()
    def reinit_dead_codes(self, generator: torch.Generator | None = None) -> int:
        """Replace codewords unused since the last call by recent sub-vectors; reset counts."""
        replaced = 0
        if self._recent is not None and self.usage.sum() > 0:
            for book in range(self.config.num_codebooks):
                dead = torch.nonzero(self.usage[book] <= self.config.dead_code_threshold).flatten()
                if len(dead):
                    pick = torch.randint(len(self._recent), (len(dead),), generator=generator)
                    self.codebooks[book, dead] = self._recent[pick, book].to(self.codebooks.dtype)
                    replaced += len(dead)
        self.usage.zero_()
        return replaced
