"""The source-domain plan: deterministic, balanced by interactions, every domain owned once."""

import pytest

from metarec_dist.distributed.plan import DomainPlan, plan_domains
from metarec_dist.errors import ConfigError


def test_every_domain_has_exactly_one_owner_and_the_plan_is_deterministic():
    sizes = {f"d{i:03d}": 100 + (i * 37) % 500 for i in range(256)}
    plan = plan_domains(sizes, 2)
    assert sorted(plan.shard(0) + plan.shard(1)) == sorted(sizes)
    assert plan == plan_domains(dict(reversed(list(sizes.items()))), 2)


def test_worker_loads_differ_by_at_most_the_largest_domain():
    sizes = {f"d{i}": size for i, size in enumerate([900, 500, 400, 300, 300, 200, 100, 50])}
    plan = plan_domains(sizes, 3)
    assert sum(plan.load()) == sum(sizes.values())
    assert max(plan.load()) - min(plan.load()) <= max(sizes.values())
    assert plan.load() == [950, 900, 900]  # greedy, largest first, ties to the lower rank: hand-checked


def test_plan_survives_a_json_round_trip_and_prints_one_line_per_worker():
    plan = plan_domains({"a": 5, "b": 3, "c": 2}, 2)
    assert DomainPlan.from_json(plan.to_json()) == plan
    assert len(plan.table().splitlines()) == 1 + 2


def test_fewer_domains_than_workers_is_a_config_error_naming_the_field():
    with pytest.raises(ConfigError, match="runner.workers"):
        plan_domains({"a": 5}, 2)
