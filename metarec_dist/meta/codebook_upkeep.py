"""The codebook between steps, the same in every worker: dead codewords replaced, health read.

Usage counts are summed over workers; the leader picks replacements and its
codebook is broadcast, so theta stays identical everywhere. Each function is a
collective: every worker calls it at the same step.
"""

from __future__ import annotations

from typing import Any

import torch

from metarec_dist.meta.step import Collective
from metarec_dist.model.vq import VectorQuantizer


def summed_usage(quantizer: VectorQuantizer, collective: Collective) -> torch.Tensor:
    """Codeword assignment counts since the last re-initialisation, summed over workers."""
    usage = quantizer.usage.clone()
    collective.all_reduce_sum_([usage])
    return usage


def codebook_health(quantizer: VectorQuantizer, collective: Collective) -> dict[str, Any]:
    """Perplexity and dead codes over every worker's assignments since the last re-initialisation."""
    return quantizer.health(summed_usage(quantizer, collective))


def reinit_dead_codes_everywhere(quantizer: VectorQuantizer, collective: Collective) -> None:
    """Replace dead codewords from every worker's usage; the leader decides, all end equal."""
    collective.all_reduce_sum_([quantizer.usage])
    if collective.rank == 0:
        quantizer.reinit_dead_codes()
    else:
        quantizer.usage.zero_()
    collective.broadcast_(quantizer.codebooks.data, source=0)
