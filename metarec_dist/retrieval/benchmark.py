"""Offline large-catalog benchmark: every searcher against raw FAISS flat and plain torch, one run.

Catalogs are synthetic item vectors with cluster structure like trained ones
(``synthetic_catalog``): items scattered around cluster centres, with
log-normal norms (popular items have larger norms in trained models). Queries
are drawn around the same centres. For each catalog size and width, in one
process, one after the other:

- ``torch``: the plain baseline, a matrix multiply and ``topk`` per chunk of
  queries and items (never a full score matrix);
- ``faiss flat``: raw ``faiss.IndexFlatIP``;
- ``exact``: this package's ``ExactSearcher``; its ids are compared with the
  flat index's (queries whose top-k differ only inside a tie count as equal);
- approximate settings (``RetrievalConfig``), recall@k against ``exact``.

Each row: build seconds, queries/s (median over ``repeats`` passes), recall@k,
resident memory the searcher added, and for the exact ones the fraction of
this machine's fp32 matrix-multiply rate (measured in the same run) they reach.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import psutil
import torch
from tqdm import tqdm

from metarec_dist.retrieval.config import RetrievalConfig
from metarec_dist.retrieval.exact import SearchResult, bf16_is_fast
from metarec_dist.retrieval.memory import check_memory
from metarec_dist.retrieval.search import build_searcher

QUERY_CHUNK = 1024


@dataclass(frozen=True)
class BenchSetting:
    """One searcher of the benchmark: a label and its config (``None``: a baseline)."""

    label: str
    config: RetrievalConfig | None = None


DEFAULT_APPROXIMATE = (
    BenchSetting("ivf_pq nprobe=16", RetrievalConfig(index="ivf_pq", nlist=4096, nprobe=16, pq_m=16, refine_factor=8)),
    BenchSetting("ivf_pq nprobe=32", RetrievalConfig(index="ivf_pq", nlist=4096, nprobe=32, pq_m=16, refine_factor=8)),
    BenchSetting("ivf_flat nprobe=32", RetrievalConfig(index="ivf_flat", nlist=4096, nprobe=32)),
    BenchSetting("hnsw ef=128", RetrievalConfig(index="hnsw", hnsw_m=16, ef_construction=100, ef_search=128)),
)


@dataclass
class BenchPlan:
    catalogs: list[tuple[int, int]]  # (items, width)
    queries: int = 4096
    k: int = 10
    repeats: int = 3
    approximate: tuple[BenchSetting, ...] = DEFAULT_APPROXIMATE
    skip_hnsw_above: int = 2_000_000  # graph building is hours on a few cores at 10M
    norm_sigma: float = 0.25  # spread of the log item norms; 0: all items of norm 1
    seed: int = 0


def synthetic_catalog(
    num_items: int, width: int, seed: int, clusters: int = 2048, norm_sigma: float = 0.25
) -> np.ndarray:
    """``[num_items, width]`` fp32 items around ``clusters`` centres, log-normal norms, built in chunks."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, width)).astype(np.float32)
    items = np.empty((num_items, width), dtype=np.float32)
    for begin in range(0, num_items, 1_000_000):
        end = min(begin + 1_000_000, num_items)
        block = centres[rng.integers(clusters, size=end - begin)]
        block += rng.normal(scale=0.7, size=block.shape).astype(np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        block *= rng.lognormal(sigma=norm_sigma, size=(end - begin, 1)).astype(np.float32)
        items[begin:end] = block
    return items


def synthetic_queries(num_queries: int, width: int, seed: int, clusters: int = 2048) -> np.ndarray:
    """Queries near the catalog's centres (the same ``seed`` draws the same centres)."""
    centres = np.random.default_rng(seed).normal(size=(clusters, width)).astype(np.float32)
    rng = np.random.default_rng(seed + 1)
    queries = centres[rng.integers(clusters, size=num_queries)] + rng.normal(scale=0.7, size=(num_queries, width))
    return queries.astype(np.float32)


def matmul_gflops(size: int = 2048, repeats: int = 3) -> float:
    """This machine's fp32 matrix-multiply rate now (median of ``repeats``), in GFLOP/s."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - started)
    return 2 * size**3 / statistics.median(times) / 1e9


def torch_top_k(items: torch.Tensor, queries: torch.Tensor, k: int, item_chunk: int = 1_000_000) -> SearchResult:
    """The plain baseline: per 1,024 queries, matmul + topk per item chunk, then topk over the chunks' winners."""
    scores, rows = [], []
    for begin in range(0, len(queries), QUERY_CHUNK):
        chunk = queries[begin : begin + QUERY_CHUNK]
        values, index = [], []
        for start in range(0, len(items), item_chunk):
            part = (chunk @ items[start : start + item_chunk].T).topk(k, dim=1)
            values.append(part.values)
            index.append(part.indices + start)
        best, pick = torch.cat(values, dim=1).topk(k, dim=1)
        scores.append(best)
        rows.append(torch.cat(index, dim=1).gather(1, pick))
    return SearchResult(torch.cat(scores).numpy(), torch.cat(rows).numpy())


def _timed_search(search: Callable[[np.ndarray], SearchResult], queries: np.ndarray, repeats: int, label: str):
    """Median seconds of ``repeats`` searches, all queries in one call (how FAISS is fastest), and the result."""
    seconds, result = [], None
    for _ in tqdm(range(repeats), desc=f"searching {label}", leave=False):
        started = time.perf_counter()
        result = search(queries)
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds), result


def _recall(found: np.ndarray, exact: np.ndarray) -> float:
    hits = [len(np.intersect1d(a, b)) for a, b in zip(found, exact, strict=True)]
    return float(np.sum(hits) / exact.size)


def _same_ids(result: SearchResult, reference: SearchResult) -> dict[str, float]:
    """Fraction of queries with identical ids, and of the rest, how many differ only within equal scores."""
    identical = np.all(result.rows == reference.rows, axis=1)
    tie_only = np.array([
        np.allclose(np.sort(result.scores[q]), np.sort(reference.scores[q]), rtol=1e-6, atol=1e-6)
        for q in np.flatnonzero(~identical)
    ], dtype=bool)
    return {"identical_ids": float(identical.mean()), "differing_only_in_ties": int(tie_only.sum()),
            "differing": int((~identical).sum())}


def run_retrieval_benchmark(plan: BenchPlan, progress: Callable[[dict], None] | None = None) -> dict:
    """Measure every searcher on every catalog of ``plan``; ``progress(row)`` after each row."""
    process = psutil.Process()
    peak = matmul_gflops()
    rows: list[dict] = []
    results = {"matmul_fp32_gflops": peak, "bf16_fast": bf16_is_fast("cpu"), "rows": rows}
    for num_items, width in plan.catalogs:
        check_memory(3 * num_items * width * 4, f"the {num_items:,} x {width} benchmark catalog")
        started = time.perf_counter()
        items = synthetic_catalog(num_items, width, plan.seed, norm_sigma=plan.norm_sigma)
        queries = synthetic_queries(plan.queries, width, plan.seed)
        print(f"catalog {num_items:,} x {width}: generated in {time.perf_counter() - started:.1f} s", flush=True)
        flops_per_query = 2 * num_items * width

        def row(label: str, build: float, seconds: float, memory: int, num_items=num_items, width=width,
                queries=queries, **extra) -> dict:
            entry = {"items": num_items, "width": width, "norm_sigma": plan.norm_sigma, "queries": len(queries),
                     "k": plan.k, "searcher": label, "build_s": round(build, 3),
                     "queries_per_s": len(queries) / seconds, "memory_mb": round(memory / 2**20, 1), **extra}
            rows.append(entry)
            if progress is not None:
                progress(entry)
            return entry

        exact_rows = {}
        for label, config in (("faiss IndexFlatIP", RetrievalConfig(index="flat")), ("exact", RetrievalConfig())):
            before = process.memory_info().rss
            started = time.perf_counter()
            searcher = build_searcher(items, config, progress=True)
            build = time.perf_counter() - started
            memory = process.memory_info().rss - before
            seconds, found = _timed_search(lambda q, s=searcher: s.search(q, plan.k), queries, plan.repeats, label)
            exact_rows[label] = found
            extra = {"matmul_peak_fraction": len(queries) * flops_per_query / seconds / 1e9 / peak}
            if label == "exact":
                extra.update(precision=searcher.precision, **_same_ids(found, exact_rows["faiss IndexFlatIP"]))
            row(label, build, seconds, memory, **extra)
            del searcher
            gc.collect()
        reference = exact_rows["exact"].rows
        flat_row, exact_row = rows[-2], rows[-1]
        flat_row["recall"] = _recall(exact_rows["faiss IndexFlatIP"].rows, reference)
        exact_row["recall"] = 1.0  # the reference
        exact_row["speedup_vs_flat"] = exact_row["queries_per_s"] / flat_row["queries_per_s"]

        items_t = torch.from_numpy(items)
        seconds, found = _timed_search(lambda q, m=items_t: torch_top_k(m, torch.from_numpy(q), plan.k),
                                       queries, plan.repeats, "torch")
        row("torch matmul+topk", 0.0, seconds, 0, recall=_recall(found.rows, reference),
            matmul_peak_fraction=len(queries) * flops_per_query / seconds / 1e9 / peak)

        for setting in plan.approximate:
            config = setting.config
            if config.index == "hnsw" and num_items > plan.skip_hnsw_above:
                continue
            before = process.memory_info().rss
            started = time.perf_counter()
            # About 256 items per cell at most, so small catalogs still train their cells.
            cells = min(config.nlist, max(1, num_items // 256))
            searcher = build_searcher(items, config.model_copy(update={"nlist": cells}), progress=True)
            build = time.perf_counter() - started
            memory = process.memory_info().rss - before
            seconds, found = _timed_search(lambda q, s=searcher: s.search(q, plan.k), queries, plan.repeats,
                                           setting.label)
            row(setting.label, build, seconds, memory, recall=_recall(found.rows, reference))
            del searcher
            gc.collect()
        del items, items_t, exact_rows, found
        gc.collect()
    return results


__all__ = ["BenchPlan", "BenchSetting", "matmul_gflops", "run_retrieval_benchmark", "synthetic_catalog",
           "synthetic_queries", "torch_top_k"]
