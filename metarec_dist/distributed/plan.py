"""Which worker owns which source domain: a plan, as data you can print, save and test.

Sources are dealt greedily, largest first, each to the worker with the fewest
interactions so far (ties: the lower rank), which keeps every worker's share of
the work within one domain of the mean. The plan depends only on the domains'
sizes and the number of workers, so every process computes the same one and a
resumed run with another worker count simply computes a new one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from metarec_dist.errors import ConfigError


@dataclass(frozen=True)
class DomainPlan:
    workers: int
    owner: dict[str, int]  # source domain -> rank
    interactions: dict[str, int]  # source domain -> number of interactions

    def shard(self, rank: int) -> list[str]:
        """The sources worker ``rank`` owns, sorted by name."""
        return sorted(name for name, owner in self.owner.items() if owner == rank)

    def load(self) -> list[int]:
        """Interactions per worker."""
        totals = [0] * self.workers
        for name, rank in self.owner.items():
            totals[rank] += self.interactions[name]
        return totals

    def table(self) -> str:
        """One line per worker: its domains and interactions."""
        lines = [f"{'worker':>6}  {'domains':>7}  {'interactions':>12}  first domains"]
        for rank, total in enumerate(self.load()):
            shard = self.shard(rank)
            shown = ", ".join(shard[:4]) + (f", ... (+{len(shard) - 4})" if len(shard) > 4 else "")
            lines.append(f"{rank:>6}  {len(shard):>7}  {total:>12,}  {shown}")
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps({"workers": self.workers, "owner": self.owner, "interactions": self.interactions},
                          sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> DomainPlan:
        values = json.loads(text)
        return cls(workers=values["workers"], owner=values["owner"], interactions=values["interactions"])


def plan_domains(interactions: dict[str, int], workers: int) -> DomainPlan:
    """Assign every source to one of ``workers`` ranks, balanced by interaction count."""
    if workers < 1:
        raise ConfigError(f"runner.workers: must be at least 1, got {workers}")
    if len(interactions) < workers:
        raise ConfigError(
            f"runner.workers: {workers} workers need at least {workers} source domains, "
            f"the config lists {len(interactions)}; use fewer workers or add sources"
        )
    totals = [0] * workers
    owner: dict[str, int] = {}
    for name in sorted(interactions, key=lambda n: (-interactions[n], n)):
        rank = min(range(workers), key=lambda r: (totals[r], r))
        owner[name] = rank
        totals[rank] += interactions[name]
    return DomainPlan(workers=workers, owner=owner, interactions=dict(interactions))
