"""A synthetic interaction log of any size, shaped like a real one: for catalogs of millions of items.

Every item occurs at least once (when there are at least as many
interactions as items); beyond that item popularity is Zipf-like
(p(rank) ~ 1 / (rank + 10)). User activity is log-normal, ids are unrelated
to popularity or activity and timestamps random (so rows are in neither user
nor time order, as in a real export). It has no
sequential structure (``data.synthetic`` makes domains that do); it exists to
measure what grows with the catalog: import, training steps, memory, search.
Written into the store through the importer's core, like a real file.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from metarec_dist.data.domain import ImportOptions, ImportReport, build_domain
from metarec_dist.data.store import DomainStore, check_domain_name
from metarec_dist.data.synthetic import draw_from_cdf

ITEM_ZIPF_OFFSET = 10.0
USER_ACTIVITY_SIGMA = 1.0
TIME_START, TIME_END = 1_388_534_400, 1_704_067_200  # 2014-01-01 .. 2024-01-01 UTC


def interaction_log(interactions: int, users: int, items: int, seed: int, zipf_exponent: float = 1.0) -> pa.Table:
    """``user_id``, ``item_id`` (int64, 0-based) and ``timestamp`` (unix seconds) for ``interactions`` events."""
    rng = np.random.default_rng(seed)
    activity = rng.lognormal(0.0, USER_ACTIVITY_SIGMA, size=users)
    user_ids = rng.permutation(users)[_draw(activity, interactions, rng)]
    popularity = 1.0 / (np.arange(items) + ITEM_ZIPF_OFFSET) ** zipf_exponent
    # Every item once (a catalog of ``items``, as far as interactions allow), the rest by popularity.
    ranks = np.concatenate([np.arange(min(items, interactions)),
                            _draw(popularity, max(interactions - items, 0), rng)])
    item_ids = rng.permutation(items)[ranks]
    timestamps = rng.integers(TIME_START, TIME_END, size=interactions, dtype=np.int64)
    return pa.table({"user_id": user_ids.astype(np.int64), "item_id": item_ids.astype(np.int64),
                     "timestamp": timestamps})


def _draw(weights: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """``size`` indices drawn with probability proportional to ``weights``."""
    cdf = np.cumsum(weights, dtype=np.float64)
    return draw_from_cdf(cdf / cdf[-1], rng.random(size))


def generate_interaction_domain(
    store: DomainStore, name: str, interactions: int, users: int, items: int, seed: int = 0,
    overwrite: bool = False,
) -> ImportReport:
    """Generate a log and write it as domain ``name`` (users with fewer than 3 events are dropped)."""
    name = check_domain_name(name)
    store.check_writable(name, overwrite)
    events = interaction_log(interactions, users, items, seed).rename_columns(["user", "item", "timestamp"])
    options = ImportOptions()
    tables, report = build_domain(events, options, source=f"interaction log (seed {seed})")
    settings = {"interactions": interactions, "users": users, "items": items, "seed": seed}
    meta = {"source": {"generator": "interaction_log", "settings": settings},
            "import_options": options.model_dump(), "report": report.as_dict()}
    store.write(name, tables, meta, overwrite=overwrite)
    return report
