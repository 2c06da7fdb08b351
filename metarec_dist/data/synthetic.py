"""Seeded synthetic domains: the embedded default data.

A hidden "world" of latent concepts with a sparse transition matrix W drives
the sequences. Each domain has its own catalog (own size, own item ids,
disjoint from every other domain's) and assigns its items to concepts at
random, so no two domains share an id or an embedding, only (maybe) structure:

- ``target``: users walk W; the domain a model must learn with little data;
- ``related`` sources: walk a noisy copy of W (knowledge that transfers);
- ``unrelated`` sources: walk their own independent transition matrix;
- ``noise`` sources: items drawn independently by popularity, no sequence.

Within a concept, items are drawn with a Zipf-like popularity skew; sequence
lengths are geometric (at least 3, capped). Everything is vectorised over
users, so 200 domains take seconds. Each domain has its own random stream
(seed, domain index), so adding domains never changes existing ones.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator
from tqdm import tqdm

from metarec_dist.config import StrictModel
from metarec_dist.data.domain import ImportOptions, ImportReport, build_domain
from metarec_dist.data.store import DomainStore
from metarec_dist.errors import StoreError

log = logging.getLogger(__name__)

KINDS = ("target", "related", "unrelated", "noise")
_ID_BLOCK = 10_000_000  # original ids of domain i live in [(i+1)*block, (i+2)*block)
_WORLD_STREAM, _DOMAIN_STREAM = 0, 1


class SyntheticConfig(StrictModel):
    """The generator's knobs; the defaults make the README's quick-start data."""

    seed: int = 0
    name_prefix: str = Field("syn", pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
    related_sources: int = Field(4, ge=0, description="sources sharing the target's transitions")
    unrelated_sources: int = Field(2, ge=0, description="sources with their own transitions")
    noise_sources: int = Field(2, ge=0, description="sources with no sequential structure")
    latent_concepts: int = Field(24, ge=2, description="states of the hidden transition structure")
    transition_concentration: float = Field(0.1, gt=0, description="Dirichlet alpha: small = sharp")
    related_noise: float = Field(0.2, ge=0, le=1, description="how far related sources drift from W")
    target_users: int = Field(2000, ge=10)
    target_items: int = Field(1500, ge=2)
    source_users: tuple[int, int] = Field((800, 2000), description="inclusive range, drawn per source")
    source_items: tuple[int, int] = Field((300, 3000), description="inclusive range, drawn per source")
    mean_sequence_length: float = Field(9.0, gt=3)
    max_sequence_length: int = Field(50, ge=3)
    popularity_exponent: float = Field(1.0, ge=0, description="Zipf exponent of item popularity")

    @model_validator(mode="after")
    def _check_ranges(self) -> SyntheticConfig:
        for field in ("source_users", "source_items"):
            low, high = getattr(self, field)
            if not 1 <= low <= high:
                raise ValueError(f"{field} must be [low, high] with 1 <= low <= high, got [{low}, {high}]")
        if max(self.source_items[1], self.target_items) >= _ID_BLOCK:
            raise ValueError(f"catalogs must stay below {_ID_BLOCK} items")
        if self.source_items[0] < self.latent_concepts or self.target_items < self.latent_concepts:
            raise ValueError("every catalog needs at least one item per latent concept")
        return self

    @property
    def num_domains(self) -> int:
        return 1 + self.related_sources + self.unrelated_sources + self.noise_sources


@dataclass(frozen=True)
class DomainSpec:
    """One domain to generate: its name, kind and place in the id space."""

    name: str
    kind: str
    index: int


@dataclass(frozen=True)
class GeneratedDomain:
    """Events plus the hidden truth behind them (for tests and analysis)."""

    spec: DomainSpec
    events: pa.Table  # user, item (original ids), in chronological order
    item_concept: np.ndarray  # concept of local item k (original id - id offset - 1)
    transitions: np.ndarray | None  # the concept transition matrix walked (None for noise)

    @property
    def event_concepts(self) -> np.ndarray:
        """The latent concept of every event's item."""
        local_item = self.events.column("item").to_numpy() - _id_offset(self.spec) - 1
        return self.item_concept[local_item]


def _id_offset(spec: DomainSpec) -> int:
    """Original ids of domain i are offset into their own block: catalogs never overlap."""
    return (spec.index + 1) * _ID_BLOCK


def domain_specs(config: SyntheticConfig) -> list[DomainSpec]:
    """Target first, then related, unrelated and noise sources, zero-padded names."""
    width = max(2, len(str(max(config.related_sources, config.unrelated_sources, config.noise_sources))))
    specs = [DomainSpec(f"{config.name_prefix}-target", "target", 0)]
    for kind, count in (
        ("related", config.related_sources),
        ("unrelated", config.unrelated_sources),
        ("noise", config.noise_sources),
    ):
        for number in range(count):
            specs.append(DomainSpec(f"{config.name_prefix}-{kind}-{number:0{width}d}", kind, len(specs)))
    return specs


def _dirichlet_rows(rng: np.random.Generator, size: int, alpha: float) -> np.ndarray:
    return rng.dirichlet(np.full(size, alpha), size=size)


def world_transitions(config: SyntheticConfig) -> np.ndarray:
    """W: the concept transition matrix the target and related sources share."""
    rng = np.random.default_rng([config.seed, _WORLD_STREAM])
    return _dirichlet_rows(rng, config.latent_concepts, config.transition_concentration)


def generate_domain(spec: DomainSpec, config: SyntheticConfig, world: np.ndarray) -> GeneratedDomain:
    """Simulate one domain's users; vectorised over users, one loop over time steps."""
    rng = np.random.default_rng([config.seed, _DOMAIN_STREAM, spec.index])
    concepts = config.latent_concepts
    if spec.kind == "target":
        num_users, num_items = config.target_users, config.target_items
    else:
        num_users = int(rng.integers(config.source_users[0], config.source_users[1] + 1))
        num_items = int(rng.integers(config.source_items[0], config.source_items[1] + 1))

    transitions = {
        "target": world,
        "related": (1 - config.related_noise) * world
        + config.related_noise * _dirichlet_rows(rng, concepts, config.transition_concentration),
        "unrelated": _dirichlet_rows(rng, concepts, config.transition_concentration),
        "noise": None,
    }[spec.kind]

    # Every concept owns at least one item; the rest are spread at random.
    item_concept = np.concatenate([rng.permutation(concepts), rng.integers(0, concepts, num_items - concepts)])
    rng.shuffle(item_concept)
    popularity = 1.0 / (rng.permutation(num_items) + 1.0) ** config.popularity_exponent

    lengths = np.minimum(
        2 + rng.geometric(1.0 / (config.mean_sequence_length - 2), size=num_users), config.max_sequence_length
    )
    steps = int(lengths.max())
    if transitions is None:
        items = draw_from_cdf(np.cumsum(popularity) / popularity.sum(), rng.random((num_users, steps)))
    else:
        items = _walk(transitions, item_concept, popularity, num_users, steps, rng)

    alive = np.arange(steps)[None, :] < lengths[:, None]  # (users, steps)
    offset = _id_offset(spec)
    events = pa.table(
        {
            "user": np.repeat(np.arange(num_users, dtype=np.int64) + offset + 1, lengths),
            "item": items[alive].astype(np.int64) + offset + 1,  # row-major = chronological per user
        }
    )
    return GeneratedDomain(spec, events, item_concept, transitions)


def draw_from_cdf(cdf: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """Inverse-CDF sampling, clipped against rounding in the last cdf entry."""
    return np.minimum(np.searchsorted(cdf, uniforms, side="right"), len(cdf) - 1)


def _walk(transitions, item_concept, popularity, num_users, steps, rng) -> np.ndarray:
    """Items of users walking the concept chain: (users, steps) local item indices."""
    concepts = len(transitions)
    # Items sorted by concept; a "global" cdf whose segment c spans (c, c+1] lets one
    # searchsorted draw a popularity-weighted item of concept c for every user at once.
    by_concept = np.argsort(item_concept, kind="stable")
    concept_sorted = item_concept[by_concept]
    weights = popularity[by_concept]
    totals = np.bincount(concept_sorted, weights=weights, minlength=concepts)
    cumulative = np.cumsum(weights)
    segment_start = np.cumsum(totals) - totals
    within = (cumulative - segment_start[concept_sorted]) / totals[concept_sorted]
    global_cdf = concept_sorted + within
    is_last = np.r_[concept_sorted[1:] != concept_sorted[:-1], True]
    global_cdf[is_last] = concept_sorted[is_last] + 1.0  # exact segment ends
    transition_cdf = np.cumsum(transitions, axis=1)

    state = rng.integers(0, concepts, num_users)
    items = np.empty((num_users, steps), dtype=np.int64)
    for step in range(steps):
        position = np.searchsorted(global_cdf, state + rng.random(num_users), side="left")
        items[:, step] = by_concept[np.minimum(position, len(by_concept) - 1)]
        next_state = (rng.random(num_users)[:, None] > transition_cdf[state]).sum(axis=1)
        state = np.minimum(next_state, concepts - 1)
    return items


@dataclass(frozen=True)
class GenerationResult:
    name: str
    kind: str
    status: str  # "written", "unchanged" (identical domain already there) or "replaced"
    report: ImportReport | None


def generate_store(config: SyntheticConfig, store: DomainStore, overwrite: bool = False) -> list[GenerationResult]:
    """Generate every configured domain into ``store``.

    A domain already present from the same generator settings is left as it is
    (the generator is deterministic), so re-running is cheap and safe; one made
    otherwise is replaced only with ``overwrite``.
    """
    specs = domain_specs(config)
    settings = config.model_dump(mode="json")
    for spec in specs:
        if spec.name in store and not overwrite and not _same_generation(store, spec, settings):
            raise StoreError(
                f"{store.path(spec.name)}: domain '{spec.name}' exists but was not generated with these "
                "settings; pass --overwrite to replace it, or set name_prefix for a separate set"
            )
    world = world_transitions(config)
    results = []
    for spec in tqdm(specs, desc="generating domains", unit="domain", disable=None, leave=False):
        if spec.name in store and _same_generation(store, spec, settings):
            results.append(GenerationResult(spec.name, spec.kind, "unchanged", None))
            continue
        existed = spec.name in store
        generated = generate_domain(spec, config, world)
        options = ImportOptions(max_sequence_length=config.max_sequence_length)
        tables, report = build_domain(generated.events, options, source=f"synthetic domain {spec.name}")
        meta = {
            "source": {"format": "synthetic", "kind": spec.kind, "domain_index": spec.index, "generator": settings},
            "import_options": options.model_dump(),
            "report": report.as_dict(),
        }
        store.write(spec.name, tables, meta, overwrite=True)
        results.append(GenerationResult(spec.name, spec.kind, "replaced" if existed else "written", report))
    return results


def _same_generation(store: DomainStore, spec: DomainSpec, settings: dict) -> bool:
    try:
        source = store.open(spec.name).meta.get("source", {})
    except StoreError:
        return False
    return source.get("format") == "synthetic" and source.get("generator") == settings and source.get(
        "domain_index"
    ) == spec.index
