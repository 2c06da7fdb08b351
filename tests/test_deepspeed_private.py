"""Fails loudly when a DeepSpeed internal the package relies on moves (checked against 0.19.8)."""

import inspect


def test_deepspeed_keeps_its_world_group_clone_where_the_package_sets_it():
    from deepspeed.utils import groups

    assert hasattr(groups, "_WORLD_GROUP"), "deepspeed.utils.groups._WORLD_GROUP is gone: see deepspeed_private.py"
    source = inspect.getsource(groups._clone_world_group)
    assert "_WORLD_GROUP is None" in source, "DeepSpeed no longer makes its world group only when unset"


def test_zero_stage_1_2_still_links_optimizer_state_lazily():
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    method = getattr(DeepSpeedZeroOptimizer, "_lazy_init_hp_params_optimizer_state", None)
    assert method is not None, "DeepSpeedZeroOptimizer._lazy_init_hp_params_optimizer_state is gone"
    assert list(inspect.signature(method).parameters) == ["self"]
