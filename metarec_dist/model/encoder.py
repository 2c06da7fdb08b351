"""The shared causal sequence encoder (SASRec family), read top to bottom.

It sees only vectors in the shared space, never a domain's ids: the caller
looks items up (through the VQ codebook, or an id table for the target-only
baseline) and passes ``[B, L, D]`` vectors plus the padding mask. Inputs are
left-padded, so position L-1 is every user's latest event.

Rows of very different lengths are encoded in groups, each cut to a length
its rows share: one long history in a batch of short ones would otherwise make
every row pay for its padding (on full Beauty, 12,800 positions for ~1,500
real ones). Positions count from the right and padding is masked, and a row's
length depends on the row alone, so its states do not depend on its batch.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from metarec_dist.config import StrictModel


class EncoderConfig(StrictModel):
    layers: int = Field(2, ge=1)
    heads: int = Field(2, ge=1)
    max_length: int = Field(50, ge=2, description="most recent events read per user")
    dropout: float = Field(0.2, ge=0, lt=1, description="on embeddings and block outputs")
    attention_dropout: float = Field(0.0, ge=0, lt=1, description="on attention weights")
    ffn_multiplier: int = Field(4, ge=1, description="feed-forward width = multiplier * model width")
    group_by_length: bool = Field(
        True, description="encode rows in groups by length (off: each batch in one piece, at its longest row)"
    )


def encoded_length(span: int, width: int) -> int:
    """The length a row of ``span`` real positions is encoded at, in a batch ``width`` columns wide:
    the next power of two, at most the width.

    It depends on the row and the width only, never on the other rows, so a
    row's states are the same, bit for bit, in any batch of that width:
    evaluation (always max_length wide) gives the same ranks whatever its batch
    size or sharding. A row pays for less padding than its own span.
    """
    return min(width, 1 << max(span - 1, 0).bit_length())


def length_groups(spans: list[int], width: int) -> dict[int, list[int]]:
    """Row indices by the length they are encoded at (``encoded_length``), shortest first."""
    groups: dict[int, list[int]] = {}
    for row, span in enumerate(spans):
        groups.setdefault(encoded_length(span, width), []).append(row)
    return dict(sorted(groups.items()))


def attention_mask(padding: torch.Tensor) -> torch.Tensor:
    """Boolean [B, 1, L, L]: query i may attend key j if j <= i and j is not padding.

    A position always sees itself, so padded (left) positions never get an
    all-masked row (which would produce NaNs); their outputs are never used.
    """
    length = padding.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=padding.device).tril()
    allowed = causal & ~padding[:, None, :]  # [B, L, L]
    allowed |= torch.eye(length, dtype=torch.bool, device=padding.device)
    return allowed[:, None]


class Dropout(nn.Module):
    """Inverted dropout through a uniform mask: nn.Dropout's semantics, without torch's
    bernoulli sampling, which is slow on CPU."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        keep = torch.rand_like(x) >= self.p
        return x * keep / (1 - self.p)


class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        if width % heads:
            raise ValueError(f"encoder width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(x).split(width, dim=-1)
        # [B, L, D] -> [B, heads, L, D/heads]
        q, k, v = (t.view(batch, length, self.heads, width // self.heads).transpose(1, 2) for t in (q, k, v))
        # On CPU the math kernel is the fast one at these sizes (the flash kernel's bf16
        # backward is slow there) and the one with a double backward (second-order meta-gradients).
        with sdpa_kernel([SDPBackend.MATH]) if x.device.type == "cpu" else nullcontext():
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
            )
        return self.out(y.transpose(1, 2).reshape(batch, length, width))  # [B, L, D]


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, width: int, config: EncoderConfig):
        super().__init__()
        self.ln_attention = nn.LayerNorm(width)
        self.attention = CausalSelfAttention(width, config.heads, config.attention_dropout)
        self.ln_mlp = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, config.ffn_multiplier * width),
            nn.GELU(),
            nn.Linear(config.ffn_multiplier * width, width),
            Dropout(config.dropout),
        )
        self.dropout = Dropout(config.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attention(self.ln_attention(x), mask))
        return x + self.mlp(self.ln_mlp(x))


class SequenceEncoder(nn.Module):
    def __init__(self, width: int, config: EncoderConfig):
        super().__init__()
        self.config = config
        self.position = nn.Embedding(config.max_length, width)
        self.dropout = Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(width, config) for _ in range(config.layers))
        self.ln_final = nn.LayerNorm(width)
        self.apply(_init_weights)

    def forward(self, item_vectors: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        """item_vectors [B, L, D], padding [B, L] (True = pad) -> hidden states [B, L, D].

        States at padded positions are not meaningful (zero where a group was cut).
        """
        length = padding.shape[1]
        if length > self.config.max_length:
            raise ValueError(f"sequence length {length} exceeds encoder max_length {self.config.max_length}")
        if padding.numel() == 0 or not self.config.group_by_length:
            return self.encode(item_vectors, padding)
        real = ~padding
        # A row's span: from its first real position to the end (1 for a row of padding only).
        spans = torch.where(real.any(dim=1), length - real.int().argmax(dim=1), 1).tolist()
        groups = length_groups(spans, length)
        pieces = []
        for cut, rows in groups.items():
            index = torch.tensor(rows, device=padding.device)
            states = self.encode(item_vectors[index, length - cut:], padding[index, length - cut:])
            pieces.append(F.pad(states, (0, 0, length - cut, 0)))  # zeros where the group was cut
        grouped_rows = torch.tensor([row for rows in groups.values() for row in rows], device=padding.device)
        return torch.cat(pieces)[torch.argsort(grouped_rows)]

    def encode(self, item_vectors: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        """The whole batch in one piece, at its full length: what ``forward`` runs per group,
        and what an exported program runs (it has no Python numbers to group by)."""
        length = item_vectors.shape[1]
        # Positions count back from the latest event, so left padding does not shift them.
        positions = torch.arange(self.config.max_length - length, self.config.max_length, device=padding.device)
        # Read in the encoder's own dtype: a bf16 engine (DeepSpeed) keeps bf16 parameters, and
        # CPU LayerNorm does not mix dtypes even under autocast. A no-op for fp32 parameters.
        position = self.position(positions)
        x = self.dropout(item_vectors.to(position.dtype) + position)
        x = x * (~padding).unsqueeze(-1).to(x.dtype)
        mask = attention_mask(padding)
        for block in self.blocks:
            x = block(x, mask)
        return self.ln_final(x)


def _init_weights(module: nn.Module) -> None:
    """Small normal init (as in nanoGPT / SASRec); LayerNorm and biases at their defaults."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
