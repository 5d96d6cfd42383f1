"""Benchmarks of `tagger dupes` and `tagger similar`: scale on synthetic tables, and the default threshold on photos.

    python benchmarks/similar.py scale --rows 100000 [--dim 1280] [--library faiss|usearch|both]
    python benchmarks/similar.py threshold --data ../shared/data [--photos 500] [--distinct 2000]

scale: writes a synthetic table in the layout of `tagger run --embeddings` (clustered unit vectors, float16, with
planted near-copies and byte-identical rows), then measures in this process: loading, building the index, dupes
(time, recall of the planted near-copies and of every pair >= T around 1,000 sampled rows, against exact search),
and one-at-a-time similar queries against the loaded index (latency, recall@10 against exact). Peak RSS is the
process's. --library usearch or both also measures a usearch HNSW index on the same vectors.

threshold: tags photos of the developer data with `tagger run --embeddings` and measures, per candidate threshold,
how many near-copies (half size, JPEG q60, 5% crop on one side, white border) fall into their original's group,
how many pairs among distinct photos pass, and the byte-identical groups of fashion-small.
"""

from __future__ import annotations

import json
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tagger.contract import META_TASKS
from tagger.output import schema as s
from tagger.similar import DEFAULT_THRESHOLD, EMBEDDING_COLUMN, VectorIndex, dupes, load_table


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synthetic_table(path: Path, rows: int, dim: int, seed: int = 0) -> dict[str, Any]:
    """Write a table of `rows` unit vectors: clusters of ~20 with within-cluster cosine ~0.5 (products of one kind),
    every 50th row a near-copy of the row before it (cosine ~0.98), every 200th a byte-identical copy (same sha256).
    Returns the planted pairs."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((max(1, rows // 20), dim), dtype=np.float32)
    vectors = np.empty((rows, dim), np.float16)
    chunk = 65_536
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        v = centers[rng.integers(0, len(centers), n)] + rng.standard_normal((n, dim), dtype=np.float32)
        vectors[start : start + n] = v / np.linalg.norm(v, axis=1, keepdims=True)
    near = np.arange(50, rows, 50)
    for start in range(0, len(near), chunk):
        idx = near[start : start + chunk]
        v = vectors[idx - 1].astype(np.float32) * np.sqrt(dim) + 0.3 * rng.standard_normal((len(idx), dim), np.float32)
        vectors[idx] = v / np.linalg.norm(v, axis=1, keepdims=True)
    exact = np.arange(201, rows, 200)  # (50 divides 200: start at 201, off the near-copies)
    vectors[exact] = vectors[exact - 1]
    sha = np.array([f"{i:064x}" for i in range(rows)], dtype=object)
    sha[exact] = sha[exact - 1]
    table = pa.table(
        {
            "path": pa.array([f"images/{i:07d}.jpg" for i in range(rows)]),
            "class": pa.array(np.array(["Tshirts", "Watches"])[np.arange(rows) % 2]).dictionary_encode(),
            "status": pa.array(["ok"] * rows),
            "sha256": pa.array(sha, pa.string()),
            EMBEDDING_COLUMN: pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), dim),
        }
    )
    meta = {META_TASKS: json.dumps({"class": ["Tshirts", "Watches"]}), s.META_MODEL_SHA256: "0" * 64}
    pq.write_table(table.replace_schema_metadata(meta), path)
    return {"near": near, "exact": exact}


def _exact_neighbours(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    return VectorIndex(vectors, exact=True).search(queries, k)


@click.group()
def main() -> None:
    """Benchmarks of dupes and similar."""


@main.command()
@click.option("--rows", default=100_000, show_default=True, type=click.IntRange(1000))
@click.option("--dim", default=1280, show_default=True, type=click.IntRange(8))
@click.option("--library", type=click.Choice(["faiss", "usearch", "both"]), default="faiss", show_default=True)
@click.option("--queries", default=200, show_default=True, type=click.IntRange(1))
@click.option("--threshold", default=DEFAULT_THRESHOLD, show_default=True, type=float)
def scale(rows: int, dim: int, library: str, queries: int, threshold: float) -> None:
    """dupes and similar on a synthetic table of ROWS x DIM vectors."""
    out: dict[str, Any] = {"rows": rows, "dim": dim, "machine": f"{platform.machine()}, {_cpus()} CPUs"}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tags.parquet"
        planted = synthetic_table(path, rows, dim)
        out["table_mb"] = round(path.stat().st_size / 1e6, 1)
        base_rss = _peak_mb()
        t0 = time.perf_counter()
        et = load_table(path)
        out["load_s"] = round(time.perf_counter() - t0, 2)
        vectors = et.vectors
        sample = np.random.default_rng(1).choice(rows, size=min(queries, rows), replace=False)
        truth_sims, truth_rows = _exact_neighbours(vectors, vectors[sample], 11)
        if library in ("faiss", "both"):
            t0 = time.perf_counter()
            index = VectorIndex(vectors)
            out["faiss_index"] = "exact" if index.exact else f"IVF{index.index.nlist},fp16 nprobe {index.index.nprobe}"
            out["faiss_build_s"] = round(time.perf_counter() - t0, 2)
            t0 = time.perf_counter()
            result = dupes(et, threshold, index=index)
            out["dupes_s_after_build"] = round(time.perf_counter() - t0, 2)
            out["dupes_groups"] = result.n_groups
            grouped = dict(zip(result.groups.column("path").to_pylist(), result.groups.column("group").to_pylist()))
            found = [grouped.get(et.paths[i]) is not None and grouped.get(et.paths[i]) == grouped.get(et.paths[i - 1])
                     for i in planted["near"]]
            out["dupes_recall_planted_near"] = round(float(np.mean(found)), 4)
            ei, ej, _ = index.pairs(vectors, threshold)
            approx = set(zip(ei.tolist(), ej.tolist()))
            exact_pairs = {(min(int(q), int(r)), max(int(q), int(r)))
                           for q, srow, rrow in zip(sample, truth_sims, truth_rows)
                           for sv, r in zip(srow, rrow) if r != q and sv >= threshold}  # fmt: skip
            out["dupes_pairs_exact_sampled"] = len(exact_pairs)
            out["dupes_recall_vs_exact"] = round(len(exact_pairs & approx) / max(1, len(exact_pairs)), 4)
            latencies, hits = [], 0
            for q, trow in zip(sample, truth_rows):
                t0 = time.perf_counter()
                _, got = index.search(vectors[q : q + 1], 11)
                latencies.append(time.perf_counter() - t0)
                hits += len(set(got[0].tolist()) & set(trow.tolist()))
            out["similar_query_ms_p50"] = round(1000 * float(np.median(latencies)), 2)
            out["similar_query_ms_p95"] = round(1000 * float(np.percentile(latencies, 95)), 2)
            out["similar_recall_at_10"] = round(hits / (11 * len(sample)), 4)
            out["faiss_peak_rss_mb_over_base"] = round(_peak_mb() - base_rss)
            del index
        if library in ("usearch", "both"):
            out.update(_usearch(vectors, sample, truth_rows))
        out["peak_rss_mb"] = round(_peak_mb())
    click.echo(json.dumps(out))


def _usearch(vectors: np.ndarray, sample: np.ndarray, truth_rows: np.ndarray) -> dict[str, Any]:
    from usearch.index import Index

    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    index = Index(ndim=vectors.shape[1], metric="cos", dtype="f16")
    index.add(np.arange(len(vectors)), vectors, threads=0)
    out["usearch_build_s"] = round(time.perf_counter() - t0, 2)
    latencies, hits = [], 0
    for q, trow in zip(sample, truth_rows):
        t0 = time.perf_counter()
        got = index.search(vectors[q], 11)
        latencies.append(time.perf_counter() - t0)
        hits += len(set(np.asarray(got.keys).tolist()) & set(trow.tolist()))
    out["usearch_query_ms_p50"] = round(1000 * float(np.median(latencies)), 2)
    out["usearch_recall_at_10"] = round(hits / (11 * len(sample)), 4)
    t0 = time.perf_counter()
    index.search(vectors, 16, threads=0)  # what dupes would run: every row's 16 nearest
    out["usearch_all_rows_knn16_s"] = round(time.perf_counter() - t0, 2)
    out["usearch_memory_mb"] = round(index.memory_usage / 1e6)
    return out


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


if __name__ == "__main__":
    sys.exit(main())
