"""The DeepSpeed internals this package relies on, where DeepSpeed has no public API.

Checked against DeepSpeed 0.19.8; tests/test_deepspeed_private.py fails loudly
when either moves. Everything else goes through DeepSpeed's public API
(``deepspeed.initialize``, ``engine.no_sync``, ``deepspeed.utils.safe_*``).
"""

from __future__ import annotations

from datetime import timedelta


def give_deepspeed_a_world_group(timeout_s: int) -> None:
    """DeepSpeed clones the world group lazily, with torch's 30-minute default timeout; make the
    clone first, with ``timeout_s``. It lives in ``deepspeed.utils.groups._WORLD_GROUP`` and is
    made only when that is None."""
    import torch.distributed as dist
    from deepspeed.utils import groups

    if groups._WORLD_GROUP is None:
        groups._WORLD_GROUP = dist.new_group(ranks=list(range(dist.get_world_size())),
                                             timeout=timedelta(seconds=timeout_s))


def link_zero_optimizer_state(zero_optimizer) -> None:
    """Link a ZeRO 1/2 optimizer's freshly created moments to its parameters' fragments, so
    ``safe_set_full_optimizer_state`` can fill them before the first step (DeepSpeed does this
    itself only inside its first ``step``)."""
    zero_optimizer._lazy_init_hp_params_optimizer_state()
