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

import hashlib
import json
import platform
import resource
import subprocess
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
from tagger.embeddings import EMBEDDING_COLUMN, VectorIndex, load_table
from tagger.similar import DEFAULT_THRESHOLD, dupes


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synthetic_table(path: Path, rows: int, dim: int, seed: int = 0) -> None:
    """Write a table of `rows` unit vectors: clusters of ~20 with within-cluster cosine ~0.5 (products of one kind),
    every 50th row a near-copy of the row before it (cosine ~0.98), every 200th a byte-identical copy (same sha256)."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((max(1, rows // 20), dim), dtype=np.float32)
    vectors = np.empty((rows, dim), np.float16)
    chunk = 65_536
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        v = centers[rng.integers(0, len(centers), n)] + rng.standard_normal((n, dim), dtype=np.float32)
        vectors[start : start + n] = v / np.linalg.norm(v, axis=1, keepdims=True)
    near, exact = planted_rows(rows).values()
    for start in range(0, len(near), chunk):
        idx = near[start : start + chunk]
        v = vectors[idx - 1].astype(np.float32) * np.sqrt(dim) + 0.3 * rng.standard_normal((len(idx), dim), np.float32)
        vectors[idx] = v / np.linalg.norm(v, axis=1, keepdims=True)
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


def planted_rows(rows: int) -> dict[str, np.ndarray]:
    """Rows that are near-copies of the row before them, and byte-identical copies of it (off the near-copies)."""
    return {"near": np.arange(50, rows, 50), "exact": np.arange(201, rows, 200)}


@click.command("make-table")
@click.argument("path", type=click.Path(path_type=Path))
@click.argument("rows", type=int)
@click.argument("dim", type=int)
def make_table(path: Path, rows: int, dim: int) -> None:
    synthetic_table(path, rows, dim)


def _exact_neighbours(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force k nearest rows of each query, a block of rows at a time (a float32 copy of 1M rows is 5 GB)."""
    q = queries.astype(np.float32)
    best_s = np.full((len(q), 0), -np.inf, np.float32)
    best_r = np.zeros((len(q), 0), np.int64)
    for start in range(0, len(vectors), 65_536):
        sims = q @ vectors[start : start + 65_536].astype(np.float32).T
        best_s = np.concatenate([best_s, sims], axis=1)
        best_r = np.concatenate([best_r, np.broadcast_to(np.arange(start, start + sims.shape[1]), sims.shape)], 1)
        top = np.argsort(-best_s, axis=1)[:, :k]
        best_s, best_r = np.take_along_axis(best_s, top, 1), np.take_along_axis(best_r, top, 1)
    return best_s, best_r


@click.group()
def main() -> None:
    """Benchmarks of dupes and similar."""


@main.command()
@click.option("--rows", default=100_000, show_default=True, type=click.IntRange(1000))
@click.option("--dim", default=1280, show_default=True, type=click.IntRange(8))
@click.option("--library", type=click.Choice(["faiss", "usearch", "both"]), default="faiss", show_default=True)
@click.option("--queries", default=200, show_default=True, type=click.IntRange(1))
@click.option("--threshold", default=DEFAULT_THRESHOLD, show_default=True, type=float)
@click.option("--skip-dupes", is_flag=True, help="Measure the index and similar queries only (dupes at 1M takes long).")
@click.option("--nprobe", default=None, help="IVF cells per similar query to measure, comma-separated [default: tagger's, by its search budget].")
def scale(rows: int, dim: int, library: str, queries: int, threshold: float, skip_dupes: bool, nprobe: str | None) -> None:
    """dupes and similar on a synthetic table of ROWS x DIM vectors."""
    nprobes: list[int | None] = [int(x) for x in nprobe.split(",")] if nprobe else [None]
    out: dict[str, Any] = {"rows": rows, "dim": dim, "machine": f"{platform.machine()}, {_cpus()} CPUs"}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tags.parquet"
        # Written by another process, so this one's peak RSS is what dupes and similar take.
        subprocess.run([sys.executable, __file__, "make-table", str(path), str(rows), str(dim)], check=True)
        planted = planted_rows(rows)
        out["table_mb"] = round(path.stat().st_size / 1e6, 1)
        t0 = time.perf_counter()
        et = load_table(path)
        out["load_s"] = round(time.perf_counter() - t0, 2)
        vectors = et.vectors
        sample = np.random.default_rng(1).choice(rows, size=min(queries, rows), replace=False)
        truth_sims, truth_rows = _exact_neighbours(vectors, vectors[sample], 11)
        if library in ("faiss", "both"):
            t0 = time.perf_counter()
            index = VectorIndex(vectors)
            out["faiss_index"] = "exact" if index.exact else f"IVF{index.index.nlist},fp16"
            out["faiss_build_s"] = round(time.perf_counter() - t0, 2)
            if not skip_dupes:
                out.update(_dupes(et, index, planted, sample, truth_sims, truth_rows, threshold))
            out["similar_cells"] = index.search_cells
            for cells in nprobes:
                latencies, hits = [], 0
                for q, trow in zip(sample, truth_rows):
                    t0 = time.perf_counter()
                    _, got = index.search(vectors[q : q + 1], 11, cells)
                    latencies.append(time.perf_counter() - t0)
                    hits += len(set(got[0].tolist()) & set(trow.tolist()))
                tag = "" if len(nprobes) == 1 else f"_nprobe{cells}"
                out[f"similar_query_ms_p50{tag}"] = round(1000 * float(np.median(latencies)), 2)
                out[f"similar_query_ms_p95{tag}"] = round(1000 * float(np.percentile(latencies, 95)), 2)
                out[f"similar_recall_at_10{tag}"] = round(hits / (11 * len(sample)), 4)
            out["faiss_peak_rss_mb"] = round(_peak_mb())
            if "dupes_s_after_build" in out:
                out["dupes_total_s"] = round(out["load_s"] + out["faiss_build_s"] + out["dupes_s_after_build"], 1)
            del index
        if library in ("usearch", "both"):
            out.update(_usearch(vectors, sample, truth_rows))
        out["peak_rss_mb"] = round(_peak_mb())
    click.echo(json.dumps(out))


def _dupes(
    et: Any, index: VectorIndex, planted: dict[str, Any], sample: np.ndarray, truth_sims: np.ndarray,
    truth_rows: np.ndarray, threshold: float,
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    result = dupes(et, threshold, index=index)
    out["dupes_s_after_build"] = round(time.perf_counter() - t0, 2)
    out["dupes_groups"] = result.n_groups
    grouped = dict(zip(result.groups.column("path").to_pylist(), result.groups.column("group").to_pylist()))
    near = planted["near"]
    cos = np.einsum("ij,ij->i", et.vectors[near].astype(np.float32), et.vectors[near - 1].astype(np.float32))
    due = near[cos >= threshold]  # planted near-copies that exact search puts at or above the threshold
    found = [grouped.get(et.paths[i]) is not None and grouped.get(et.paths[i]) == grouped.get(et.paths[i - 1])
             for i in due]  # fmt: skip
    out["dupes_planted_near_at_threshold"] = len(due)
    out["dupes_recall_planted_near"] = round(float(np.mean(found)), 4)
    ei, ej, _ = index.pairs(et.vectors, threshold)
    approx = set(zip(ei.tolist(), ej.tolist()))
    exact_pairs = {(min(int(q), int(r)), max(int(q), int(r)))
                   for q, srow, rrow in zip(sample, truth_sims, truth_rows)
                   for sv, r in zip(srow, rrow) if r != q and sv >= threshold}  # fmt: skip
    out["dupes_pairs_exact_sampled"] = len(exact_pairs)
    out["dupes_recall_vs_exact"] = round(len(exact_pairs & approx) / max(1, len(exact_pairs)), 4)
    return out


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


main.add_command(make_table)

THRESHOLDS = (0.80, 0.85, 0.88, 0.90, 0.92, 0.94, 0.95, 0.96, 0.97, 0.98)
VARIANTS = ("half", "q60", "crop5", "border")


def near_copy(src: Path, dst: Path, variant: str) -> None:
    """One near-copy of a photo: half size, JPEG quality 60, 5% cut off its right side, or a white border of 5%."""
    from PIL import Image, ImageOps

    with Image.open(src) as im:
        im = im.convert("RGB")
        if variant == "half":
            im = im.resize((im.width // 2, im.height // 2), Image.Resampling.LANCZOS)
        elif variant == "crop5":
            im = im.crop((0, 0, im.width - im.width // 20, im.height))
        elif variant == "border":
            im = ImageOps.expand(im, border=max(1, im.width // 20), fill=(255, 255, 255))
        im.save(dst, format="JPEG", quality=60 if variant == "q60" else 90)


def embedding_model(model: Path, tmp: Path) -> Path:
    """`model` if it has the embedding output; else a copy with one (its pooled features, L2-normalised, as the
    contract defines the output) so the threshold can be measured before the shipped model carries it."""
    import onnx
    from onnx import helper

    m = onnx.load(str(model))
    if any(o.name == EMBEDDING_COLUMN for o in m.graph.output):
        return model
    heads = [n for n in m.graph.node if n.op_type == "Gemm"]
    pooled = heads[0].input[0]  # [N, D]: what every task head reads
    m.graph.node.extend(
        [
            helper.make_node("ReduceL2", [pooled, "embedding_axes"], ["embedding_norm"], keepdims=1),
            helper.make_node("Div", [pooled, "embedding_norm"], [EMBEDDING_COLUMN]),
        ]
    )
    m.graph.initializer.append(onnx.numpy_helper.from_array(np.array([1], np.int64), "embedding_axes"))
    m.graph.output.append(helper.make_tensor_value_info(EMBEDDING_COLUMN, onnx.TensorProto.FLOAT, ["N", None]))
    out = tmp / "with-embedding.onnx"
    onnx.save(m, str(out))
    return out


def embed_folder(folder: Path, model: Path, labels: dict[str, tuple[str, str]]) -> pa.Table:
    """Tag every photo under `folder` through the serving decoder (compose.decoded_batches) and an ORT session
    asking for the embedding output; a table in the layout of `tagger run --embeddings` (class/color: catalog)."""
    import onnxruntime as ort

    from tagger.model.info import read_model_metadata
    from tagger.compose import decoded_batches
    from tagger.pipeline.decode import Sample
    from tagger.pipeline.discover import discover

    spec = read_model_metadata(model).preprocess
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    paths, shas, vectors = [], [], []
    for batch in decoded_batches(discover(folder), spec):
        if len(batch.images):
            vectors.append(session.run([EMBEDDING_COLUMN], {session.get_inputs()[0].name: batch.images})[0])
        for ref, res in zip(batch.refs, batch.results):
            assert isinstance(res, Sample), f"{ref.path} did not decode"
            paths.append(ref.path)
            shas.append(res.sha256)
    v = np.concatenate(vectors).astype(np.float16)
    ids = [Path(p).name.split("_")[0].split(".")[0] for p in paths]
    return pa.table(
        {
            "path": pa.array(paths),
            "class": pa.array([labels.get(i, ("", ""))[0] for i in ids]),
            "color": pa.array([labels.get(i, ("", ""))[1] for i in ids]),
            "status": pa.array(["ok"] * len(paths)),
            "sha256": pa.array(shas),
            EMBEDDING_COLUMN: pa.FixedSizeListArray.from_arrays(pa.array(v.ravel()), v.shape[1]),
        }
    ).replace_schema_metadata({META_TASKS: json.dumps({"class": [], "color": []}), s.META_MODEL_SHA256: "-"})


def catalog_labels(data: Path) -> dict[str, tuple[str, str]]:
    """id -> (articleType, baseColour) from a styles.csv (via the labelled-folder loader)."""
    from tagger.labelled import read_styles

    styles = read_styles(data / "styles.csv")
    return {str(r["id"]): (str(r["articleType"]), str(r["baseColour"])) for r in styles}


@main.command()
@click.option("--data", type=click.Path(path_type=Path), required=True, help="The shared data folder.")
@click.option("--model", type=click.Path(path_type=Path), default=None, help="[default: the shipped default model]")
@click.option("--photos", default=500, show_default=True, type=click.IntRange(1))
@click.option("--distinct", default=2000, show_default=True, type=click.IntRange(2))
@click.option("--exact-copies/--no-exact-copies", default=True, help="Also find the byte-identical copies of all of fashion-small.")
def threshold(data: Path, model: Path | None, photos: int, distinct: int, exact_copies: bool) -> None:
    """Recall of near-copies and false pairs among distinct photos at each candidate threshold."""
    from tagger.model.registry import resolve_model

    rng = np.random.default_rng(0)
    out: dict[str, Any] = {"machine": f"{platform.machine()}, {_cpus()} CPUs"}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        onnx_model = embedding_model(resolve_model(model), tmp)
        out["model"] = resolve_model(model).name + ("" if onnx_model == resolve_model(model) else " + embedding output")
        # Near-copies of real-size photos, each beside its original.
        src = sorted((data / "fashion-photos" / "images").glob("*.jpg"))
        picked = [src[i] for i in np.sort(rng.choice(len(src), size=min(photos, len(src)), replace=False))]
        near_dir = tmp / "near"
        near_dir.mkdir()
        for p in picked:
            (near_dir / p.name).write_bytes(p.read_bytes())
            for variant in VARIANTS:
                near_copy(p, near_dir / f"{p.stem}_{variant}.jpg", variant)
        # Distinct thumbnails: distinct ids and distinct sha256, none of the picked products.
        small = data / "fashion-small"
        picked_ids = {p.stem for p in picked}
        seen: set[str] = set()
        distinct_dir = tmp / "distinct"
        distinct_dir.mkdir()
        candidates = sorted((small / "images").glob("*.jpg"))
        for i in rng.permutation(len(candidates)):
            p = candidates[i]
            content = p.read_bytes()
            digest = hashlib.sha256(content).hexdigest()
            if p.stem in picked_ids or digest in seen:
                continue
            seen.add(digest)
            (distinct_dir / p.name).write_bytes(content)
            if len(seen) == distinct:
                break
        labels = catalog_labels(small)
        t0 = time.perf_counter()
        near = embed_folder(near_dir, onnx_model, labels)
        dist = embed_folder(distinct_dir, onnx_model, labels)
        out["embed_s"] = round(time.perf_counter() - t0, 1)
        out["photos"], out["near_copies"], out["distinct"] = len(picked), len(picked) * len(VARIANTS), dist.num_rows
        rows = []
        for t in THRESHOLDS:
            both = pa.concat_tables([near, dist])
            result = dupes(_table_file(both, tmp / "both.parquet"), threshold=t)
            group = dict(zip(result.groups.column("path").to_pylist(), result.groups.column("group").to_pylist()))
            hits = {v: 0 for v in VARIANTS}
            for p in picked:
                g = group.get(p.name)
                for v in VARIANTS:
                    hits[v] += g is not None and group.get(f"{p.stem}_{v}.jpg") == g
            ei, ej, sims = VectorIndex(load_table(_table_file(dist, tmp / "d.parquet")).vectors).pairs(
                load_table(tmp / "d.parquet").vectors, t
            )
            merged = sum(1 for path in group if not path.split(".")[0].split("_")[0] in picked_ids)
            rows.append({
                "threshold": t,
                "near_recall": round(sum(hits.values()) / (len(picked) * len(VARIANTS)), 4),
                **{f"recall_{v}": round(hits[v] / len(picked), 4) for v in VARIANTS},
                "distinct_pairs": len(ei),
                "distinct_photos_in_groups": merged,
            })
            click.echo(json.dumps(rows[-1]), err=True)
        out["by_threshold"] = rows
        pairs = VectorIndex(load_table(tmp / "d.parquet").vectors).pairs(load_table(tmp / "d.parquet").vectors, DEFAULT_THRESHOLD)
        d_paths = dist.column("path").to_pylist()
        out["distinct_pairs_at_default"] = [
            (d_paths[i], d_paths[j], round(float(sv), 4)) for i, j, sv in zip(*[a.tolist() for a in pairs])
        ]
        if exact_copies:
            out.update(_exact_copies(small, onnx_model, labels))
    click.echo(json.dumps(out, indent=1))


def _table_file(table: pa.Table, path: Path) -> Path:
    pq.write_table(table, path)
    return path


def _exact_copies(small: Path, model: Path, labels: dict[str, tuple[str, str]]) -> dict[str, Any]:
    """dupes over all of fashion-small: every set of byte-identical files must be one group (or inside one)."""
    t0 = time.perf_counter()
    table = embed_folder(small / "images", model, labels)
    embed_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        result = dupes(_table_file(table, Path(tmp) / "small.parquet"))
    by_sha: dict[str, list[str]] = {}
    for path, digest in zip(table.column("path").to_pylist(), table.column("sha256").to_pylist()):
        by_sha.setdefault(digest, []).append(path)
    copies = [paths for paths in by_sha.values() if len(paths) > 1]
    group = dict(zip(result.groups.column("path").to_pylist(), result.groups.column("group").to_pylist()))
    found = sum(1 for paths in copies if len({group.get(p) for p in paths}) == 1 and group.get(paths[0]) is not None)
    conflicting = sum(1 for paths in copies if len({labels.get(Path(p).stem) for p in paths}) > 1)
    return {
        "small_rows": table.num_rows,
        "small_embed_s": round(embed_s, 1),
        "byte_identical_sets": len(copies),
        "byte_identical_files": sum(len(c) for c in copies),
        "byte_identical_sets_found_whole": found,
        "byte_identical_sets_with_conflicting_labels": conflicting,
        "small_dupes_line": result.line(),
    }

if __name__ == "__main__":
    sys.exit(main())
