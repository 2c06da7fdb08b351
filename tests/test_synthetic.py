"""The embedded synthetic domains: seeded, disjoint, structured, fast."""

import time

import numpy as np
import pytest

from metarec_dist.data.store import DomainStore
from metarec_dist.data.synthetic import (
    SyntheticConfig,
    domain_specs,
    generate_domain,
    generate_store,
    world_transitions,
)
from metarec_dist.errors import StoreError

SMALL = SyntheticConfig(related_sources=2, unrelated_sources=2, noise_sources=1, target_users=500)


def test_same_seed_gives_identical_domains_and_another_seed_differs(tmp_path):
    from metarec_dist.data.store import DomainStore

    first, second, other = (DomainStore(tmp_path / n) for n in ("a", "b", "c"))
    generate_store(SMALL, first)
    generate_store(SMALL, second)
    generate_store(SMALL.model_copy(update={"seed": 1}), other)
    for name in first.names():
        assert first.open(name).table("sequences").equals(second.open(name).table("sequences"))
    assert not first.open("syn-target").table("sequences").equals(other.open("syn-target").table("sequences"))


def test_catalogs_are_disjoint_and_of_different_sizes(store):
    generate_store(SMALL, store)
    catalogs = {name: set(store.open(name).table("items").column("original_id").to_pylist()) for name in store.names()}
    users = {name: set(store.open(name).table("users").column("original_id").to_pylist()) for name in store.names()}
    names = list(catalogs)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not catalogs[a] & catalogs[b]
            assert not users[a] & users[b]
    assert len({len(c) for c in catalogs.values()}) == len(catalogs)


def test_domains_have_popularity_skew_and_varied_lengths(store):
    generate_store(SMALL, store)
    domain = store.open("syn-target")
    counts = np.sort(np.bincount(domain.sequences.values)[1:])[::-1]
    top_decile_share = counts[: len(counts) // 10].sum() / counts.sum()
    assert top_decile_share > 0.3  # uniform would be 0.1
    lengths = domain.sequences.lengths
    assert lengths.min() >= 3 and lengths.max() > 4 * np.median(lengths)


def concept_transitions(generated):
    """Empirical concept -> next concept frequencies of a generated domain."""
    users = generated.events.column("user").to_numpy()
    concepts = generated.event_concepts
    same_user = users[1:] == users[:-1]
    size = generated.item_concept.max() + 1
    counts = np.zeros((size, size))
    np.add.at(counts, (concepts[:-1][same_user], concepts[1:][same_user]), 1)
    return counts / counts.sum(axis=1, keepdims=True)


def test_related_sources_share_the_targets_structure_and_others_do_not():
    config = SyntheticConfig(related_sources=3, unrelated_sources=3, noise_sources=2, source_users=(3000, 3000))
    world = world_transitions(config)
    specs = {spec.name: spec for spec in domain_specs(config)}
    target = concept_transitions(generate_domain(specs["syn-target"], config, world))

    def distance(name):  # mean total-variation distance between transition rows
        other = concept_transitions(generate_domain(specs[name], config, world))
        return 0.5 * np.abs(other - target).sum(axis=1).mean()

    related = [distance(f"syn-related-{i:02d}") for i in range(3)]
    unrelated = [distance(f"syn-unrelated-{i:02d}") for i in range(3)]
    noise = [distance(f"syn-noise-{i:02d}") for i in range(2)]
    assert max(related) < 0.35
    assert min(unrelated) > 0.6 and min(noise) > 0.6
    assert max(related) < min(unrelated + noise) / 2


def test_generating_again_with_the_same_settings_changes_nothing(store):
    generate_store(SMALL, store)
    before = {name: (store.root / name / "sequences.parquet").stat().st_mtime_ns for name in store.names()}
    results = generate_store(SMALL, store)
    assert {result.status for result in results} == {"unchanged"}
    assert before == {name: (store.root / name / "sequences.parquet").stat().st_mtime_ns for name in store.names()}


def test_other_settings_do_not_replace_domains_without_overwrite(store):
    generate_store(SMALL, store)
    reseeded = SMALL.model_copy(update={"seed": 9})
    with pytest.raises(StoreError, match="--overwrite"):
        generate_store(reseeded, store)
    results = generate_store(reseeded, store, overwrite=True)
    assert {result.status for result in results} == {"replaced"}


def test_adding_sources_leaves_existing_domains_unchanged(tmp_path):
    from metarec_dist.data.store import DomainStore

    few, many = DomainStore(tmp_path / "few"), DomainStore(tmp_path / "many")
    generate_store(SMALL, few)
    generate_store(SMALL.model_copy(update={"related_sources": 5}), many)
    for name in ("syn-target", "syn-related-00", "syn-related-01"):
        assert few.open(name).table("sequences").equals(many.open(name).table("sequences"))


def test_two_hundred_domains_generate_in_seconds(store):
    config = SyntheticConfig(related_sources=120, unrelated_sources=40, noise_sources=39)
    started = time.perf_counter()
    results = generate_store(config, store)
    elapsed = time.perf_counter() - started
    assert len(results) == len(store.names()) == 200
    # A loose bound: it catches a loss of vectorisation (a loop per user), not noise.
    assert elapsed < 30, f"200 domains took {elapsed:.1f} s"


def test_a_generated_interaction_log_covers_its_catalog_with_zipf_popularity(tmp_path, capsys):
    from metarec_dist.cli import main

    root = tmp_path / "store"
    assert main(["data", "generate-log", "--store", str(root), "--name", "log", "--items", "20000"]) == 0
    domain = DomainStore(root).open("log")
    counts = np.bincount(domain.sequences.values, minlength=domain.num_items + 1)[1:]
    assert domain.num_items > 0.98 * 20_000 and counts.min() >= 1  # every item occurs (a few left with short users)
    top = np.sort(counts)[::-1]
    assert top[0] > 50 * np.median(counts) and domain.meta["source"]["settings"]["seed"] == 0
    assert main(["data", "generate-log", "--store", str(root), "--name", "log", "--items", "10"]) == 2
    assert "--overwrite" in capsys.readouterr().err
