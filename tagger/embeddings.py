"""A tagged table's `embedding` column as unit vectors, and the faiss index that searches them (exact or IVF)."""

from __future__ import annotations

import importlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tagger.contract import EMBEDDING_OUTPUT, META_TASKS, tasks_from_json
from tagger.errors import TaggerError, one_line
from tagger.output import schema as s
from tagger.storage import Location, arrow_source, open_location, publish_bytes, redact, sha256_file

log = logging.getLogger(__name__)

EMBEDDING_COLUMN = EMBEDDING_OUTPUT  # `tagger run --embeddings` writes the model's output under its own name
EXACT_LIMIT = 20_000  # rows up to which search is exact; above, an IVF index (recall measured in benchmarks/)
# IVF cells visited. A similar query scans as many cells as SEARCH_BUDGET multiply-adds allow (~10-30 ms on one
# loaded core; more cells, better recall); dupes visits NPROBE_PAIRS per row, as its pairs at cosine >= T lie in
# the same or a next cell (benchmarks/similar.py: 4 finds what 8 finds, in half the time).
SEARCH_BUDGET = 64_000_000
NPROBE_PAIRS = 4
FEW_QUERIES = 16  # searches of fewer queries run on one thread
SIMILAR_EXTRA = 'pip install "tagger[similar]"'
INDEX_SUFFIX = ".index"  # an approximate index kept beside its table
CHUNK = 16_384  # rows converted to float32, added or searched at once: bounds memory


def faiss_module() -> Any:
    """The faiss module, or a one-line TaggerError that says how to install it."""
    try:
        return importlib.import_module("faiss")
    except ImportError:
        raise TaggerError(f"dupes and similar need faiss: {SIMILAR_EXTRA}") from None


@dataclass(frozen=True)
class EmbeddingTable:
    """The rows of a tagged table that have an embedding: paths, hashes, unit vectors and tags, in table order."""

    source: str  # how messages name the table
    paths: list[str]
    sha256: list[str | None]
    vectors: np.ndarray  # float16 [n, D], unit rows
    tags: Mapping[str, list[str | None]]  # task -> label of each row
    model_sha256: str | None  # the model that made the embeddings (tagger.model_sha256)
    catalog: str | None  # the folder (or URI) the paths are relative to (tagger.output.catalog)
    rows: int  # rows in the table
    left_out: int  # rows left out: error status or no embedding

    def __len__(self) -> int:
        return len(self.paths)

    def row_of(self, path: str) -> int | None:
        try:
            return self.paths.index(path)
        except ValueError:
            return None


def load_table(loc: Location) -> EmbeddingTable:
    """Read a `tagger run --embeddings` output; TaggerError (one line) when it cannot serve dupes or similar."""
    name = redact(loc)
    try:
        source, fs = arrow_source(loc)
        table = pq.read_table(source, filesystem=fs)
    except (pa.ArrowException, OSError) as e:
        raise TaggerError(f"{name} is not a readable Parquet file ({one_line(e)})") from None
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    if EMBEDDING_COLUMN not in table.column_names:
        raise TaggerError(f"{name} has no {EMBEDDING_COLUMN} column; tag the catalog with `tagger run --embeddings`")
    missing = [c for c in ("path", "status", "sha256") if c not in table.column_names]
    if missing:
        raise TaggerError(f"{name} is not a tagger output: it lacks the column(s) {', '.join(missing)}")
    tasks = [t.name for t in tasks_from_json(meta[META_TASKS])] if META_TASKS in meta else []
    tasks = [t for t in tasks if t in table.column_names]
    emb = table.column(EMBEDDING_COLUMN)
    keep = np.asarray(table.column("status").to_numpy(zero_copy_only=False) == s.STATUS_OK) & ~np.asarray(
        emb.is_null().to_numpy(zero_copy_only=False), bool
    )
    kept = table.filter(pa.array(keep))
    vectors = unit_vectors(kept.column(EMBEDDING_COLUMN), name)
    return EmbeddingTable(
        source=name,
        paths=kept.column("path").to_pylist(),
        sha256=kept.column("sha256").to_pylist(),
        vectors=vectors,
        tags={t: kept.column(t).cast(pa.string()).to_pylist() for t in tasks},
        model_sha256=meta.get(s.META_MODEL_SHA256),
        catalog=meta.get(s.META_CATALOG),
        rows=table.num_rows,
        left_out=table.num_rows - kept.num_rows,
    )


def unit_vectors(column: pa.ChunkedArray, name: str) -> np.ndarray:
    """A fixed-size list column -> float16 [n, D] with unit rows (re-normalised: float16 storage rounds). Kept in
    float16, as the table stores it: half the memory of float32 for the same values."""
    if not pa.types.is_fixed_size_list(column.type) or not pa.types.is_floating(column.type.value_type):
        raise TaggerError(f"{name}: column {EMBEDDING_COLUMN} is {column.type}, not a fixed-size list of floats")
    d = column.type.list_size
    flat = [c.values.to_numpy(zero_copy_only=False) for c in column.chunks]  # no nulls left: values line up
    vectors = (np.concatenate(flat) if flat else np.zeros(0, np.float16)).astype(np.float16, copy=False).reshape(-1, d)
    vectors = np.array(vectors, np.float16)  # writable, owned
    for start in range(0, len(vectors), CHUNK):
        v = vectors[start : start + CHUNK].astype(np.float32)
        norms = np.linalg.norm(v, axis=1, keepdims=True)
        vectors[start : start + CHUNK] = np.divide(v, norms, out=v, where=norms > 0)
    return vectors


def as_f32(vectors: np.ndarray) -> np.ndarray:
    """float32 rows in one contiguous block, as faiss takes them."""
    return np.ascontiguousarray(vectors, np.float32)


class VectorIndex:
    """Cosine search over unit vectors with faiss: exact (flat inner product) up to EXACT_LIMIT rows, else an IVF
    index holding the vectors in float16 (as the table does), whose recall benchmarks/similar.py measures."""

    def __init__(self, vectors: np.ndarray, exact: bool | None = None) -> None:
        faiss = faiss_module()
        n, d = vectors.shape
        self.exact = n <= EXACT_LIMIT if exact is None else exact
        t0 = time.perf_counter()
        if self.exact:
            index = faiss.IndexFlatIP(d)
        else:
            # ~sqrt(n) cells, k-means on at most 64 vectors per cell.
            nlist = max(1, min(n // 39, int(np.sqrt(n))))
            self._quantizer = faiss.IndexFlatIP(d)  # the IVF index refers to it without owning it
            index = faiss.IndexIVFScalarQuantizer(
                self._quantizer, d, nlist, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT
            )
            index.cp.niter = 10
            sample = np.sort(np.random.default_rng(0).permutation(n)[: 64 * nlist])
            index.train(as_f32(vectors[sample]))
        for start in range(0, n, CHUNK):
            index.add(as_f32(vectors[start : start + CHUNK]))
        self.index: Any = index  # a faiss.Index
        self.build_seconds = time.perf_counter() - t0
        log.info("%s index of %d x %d built in %.1f s", "exact" if self.exact else "IVF", n, d, self.build_seconds)

    @classmethod
    def from_bytes(cls, data: bytes) -> VectorIndex:
        """An index saved by to_bytes."""
        self = cls.__new__(cls)
        self.index = faiss_module().deserialize_index(np.frombuffer(data, np.uint8))
        self.exact = not hasattr(self.index, "nlist")
        self.build_seconds = 0.0
        return self

    def to_bytes(self) -> bytes:
        return bytes(faiss_module().serialize_index(self.index))

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def _params(self, nprobe: int) -> Any:
        """Search parameters: IVF cells to visit (None for the exact index)."""
        return None if self.exact else faiss_module().SearchParametersIVF(nprobe=min(nprobe, self.index.nlist))

    @property
    def search_cells(self) -> int:
        """IVF cells a similar query visits: SEARCH_BUDGET over the cost of one cell (0 for the exact index)."""
        if self.exact:
            return 0
        cell_cost = max(1, len(self) // self.index.nlist) * self.index.d
        return int(min(self.index.nlist, max(NPROBE_PAIRS, SEARCH_BUDGET // cell_cost)))

    def search(self, queries: np.ndarray, k: int, cells: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Cosine [q, k] and row [q, k] of each query's k nearest rows, best first (row -1: fewer than k).
        cells: IVF cells to visit [default: search_cells]."""
        faiss = faiss_module()
        # A few queries run on one thread: OpenMP's start and barriers would cost more than they save.
        threads = faiss.omp_get_max_threads()
        if len(queries) < FEW_QUERIES:
            faiss.omp_set_num_threads(1)
        try:
            params = self._params(self.search_cells if cells is None else cells)
            sims, rows = self.index.search(as_f32(queries), min(k, len(self)), params=params)
        finally:
            faiss.omp_set_num_threads(threads)
        return sims, rows

    def pairs(self, vectors: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every pair i < j of indexed rows (vectors: the indexed ones, in order) with cosine >= threshold."""
        found_i, found_j, found_s = [], [], []
        for start in range(0, len(vectors), CHUNK):
            chunk = as_f32(vectors[start : start + CHUNK])
            # faiss keeps similarities strictly above the radius; nextafter makes it >= threshold.
            radius = float(np.nextafter(np.float32(threshold), -1))
            lims, sims, rows = self.index.range_search(chunk, radius, params=self._params(NPROBE_PAIRS))
            qi = np.repeat(np.arange(start, start + len(chunk)), np.diff(lims).astype(np.int64))
            mine = qi < rows  # each pair once, never a row with itself
            found_i.append(qi[mine])
            found_j.append(rows[mine])
            found_s.append(sims[mine])
        if not found_i:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
        return np.concatenate(found_i), np.concatenate(found_j).astype(np.int64), np.concatenate(found_s)


def open_index(et: EmbeddingTable, table: Location) -> VectorIndex:
    """The index of a table's vectors. An approximate one (a large table) is kept beside a local table as
    TABLE.index, under the table file's sha256: a changed table gets a new index, never a stale one."""
    if len(et) <= EXACT_LIMIT or open_location(table)[0].remote:
        return VectorIndex(et.vectors)
    cache = Path(f"{table}{INDEX_SUFFIX}")
    header = json.dumps({"table_sha256": sha256_file(table), "rows": len(et), "faiss": faiss_module().__version__}).encode()
    try:
        with open(cache, "rb") as f:
            if f.readline().rstrip(b"\n") == header:
                log.info("index reused: %s", cache)
                return VectorIndex.from_bytes(f.read())
    except (OSError, RuntimeError) as e:  # RuntimeError: faiss cannot read it; built again below
        if not isinstance(e, FileNotFoundError):
            log.warning("index %s not reused: %s", cache, one_line(e))
    index = VectorIndex(et.vectors)
    try:
        publish_bytes(cache, header + b"\n" + index.to_bytes())
    except TaggerError as e:  # a read-only folder: the next call builds it again
        log.warning("index not kept beside the table: %s", e)
    return index


__all__ = [
    "EMBEDDING_COLUMN",
    "EmbeddingTable",
    "VectorIndex",
    "as_f32",
    "faiss_module",
    "load_table",
    "open_index",
    "unit_vectors",
]
