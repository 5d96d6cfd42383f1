"""Duplicates and similar products over a tagged table's `embedding` column: exact by sha256, near by cosine."""

from __future__ import annotations

import io
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tagger.embeddings import (
    EMBEDDING_COLUMN, EmbeddingTable, VectorIndex, as_f32, load_table, open_index, unit_vectors,
)
from tagger.errors import TaggerError, UsageError
from tagger.guards import check_no_input, check_not_input
from tagger.output import schema as s
from tagger.output.writer import check_parquet_name
from tagger.storage import Location, publish_bytes, same_file

# Cosine at or above which two photos are near-duplicates; measured by benchmarks/similar.py (README).
DEFAULT_THRESHOLD = 0.95
DEFAULT_K = 10
DISAGREE_TASKS = ("class", "color")  # a group whose members differ in one of these is flagged

KIND_EXACT, KIND_NEAR, KIND_BOTH = "exact", "near", "both"
GROUP_COLUMNS = ("group", "kind", "disagree", "path", "sha256", "similarity")  # then one column per task


def _with_rows(table: Location | EmbeddingTable) -> EmbeddingTable:
    """The table, loaded; TaggerError when it has no row with an embedding to work on."""
    et = table if isinstance(table, EmbeddingTable) else load_table(table)
    if not et.rows:
        raise TaggerError(f"{et.source} has no rows")
    if not len(et):
        raise TaggerError(f"{et.source} has no rows with an embedding: all {et.rows} are error rows or without one")
    return et


def _components(n: int, edges_i: np.ndarray, edges_j: np.ndarray) -> np.ndarray:
    """Connected components of n nodes: root [n], the smallest node of each component."""
    parent = np.arange(n)

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in zip(edges_i.tolist(), edges_j.tolist()):
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return np.array([find(x) for x in range(n)], dtype=np.int64)


@dataclass(frozen=True)
class DupesResult:
    """Groups of duplicate photos: one row per member (GROUPS.parquet) and the counts of the summary line."""

    groups: pa.Table  # group, kind, disagree, path, sha256, similarity, <task>...; grouped, in table order
    threshold: float
    source: str  # the table, as messages name it
    catalog: str | None  # the folder the paths are relative to
    rows: int  # rows in the table
    left_out: int  # error rows and rows without an embedding
    seconds: float

    @property
    def n_groups(self) -> int:
        return len(set(self.groups.column("group").to_pylist()))

    def count_groups(self, column: str, value: Any) -> int:
        mask = np.asarray(self.groups.column(column).to_numpy(zero_copy_only=False) == value)
        return len(set(np.asarray(self.groups.column("group").to_numpy())[mask].tolist()))

    def line(self) -> str:
        kinds = ", ".join(f"{self.count_groups('kind', k)} {k}" for k in (KIND_EXACT, KIND_NEAR, KIND_BOTH))
        return (
            f"{self.n_groups} groups ({kinds}), {self.groups.num_rows} photos in groups, "
            f"{self.count_groups('disagree', True)} groups whose tags disagree; cosine >= {self.threshold:g}; "
            f"{self.rows} rows, {self.left_out} left out (error or no embedding); {self.seconds:.1f} s"
        )


def dupes(
    table: Location | EmbeddingTable, threshold: float = DEFAULT_THRESHOLD, index: VectorIndex | None = None
) -> DupesResult:
    """Group a table's photos: byte-identical ones by sha256, near ones by cosine >= threshold, as connected
    components. Rows with an error status or no embedding are left out (counted)."""
    if not 0 < threshold <= 1:
        raise UsageError(f"--threshold must be in (0, 1], got {threshold}")
    t0 = time.perf_counter()
    et = _with_rows(table)
    n = len(et)
    if index is None:
        index = VectorIndex(et.vectors) if isinstance(table, EmbeddingTable) else open_index(et, table)
    ei, ej, _ = index.pairs(et.vectors, threshold)
    # Byte-identical rows: link each to the first row of its sha256.
    first: dict[str, int] = {}
    xi, xj = [], []
    for row, digest in enumerate(et.sha256):
        if digest is not None:
            head = first.setdefault(digest, row)
            if head != row:
                xi.append(head)
                xj.append(row)
    root = _components(n, np.concatenate([ei, np.array(xi, np.int64)]), np.concatenate([ej, np.array(xj, np.int64)]))
    sizes = np.bincount(root, minlength=n)
    members = np.flatnonzero(sizes[root] > 1)  # rows in a group of two or more, in table order
    roots = root[members]
    group_id = {r: g for g, r in enumerate(dict.fromkeys(roots.tolist()))}  # numbered by their first member
    gid = np.array([group_id[r] for r in roots.tolist()], np.int32)
    sims = np.einsum("ij,ij->i", as_f32(et.vectors[members]), as_f32(et.vectors[roots])) if len(members) else np.zeros(0)
    kind: dict[int, str] = {}
    disagree: dict[int, bool] = {}
    flag_tasks = [t for t in DISAGREE_TASKS if t in et.tags] or list(et.tags)
    for g, rows in _split_by(gid, members).items():
        digests = [et.sha256[r] for r in rows]
        distinct = len(set(digests))
        kind[g] = KIND_EXACT if distinct == 1 else KIND_NEAR if distinct == len(rows) else KIND_BOTH
        disagree[g] = any(len({et.tags[t][r] for r in rows}) > 1 for t in flag_tasks)
    cols: dict[str, pa.Array] = {
        "group": pa.array(gid, pa.int32()),
        "kind": pa.array([kind[g] for g in gid.tolist()], pa.string()),
        "disagree": pa.array([disagree[g] for g in gid.tolist()], pa.bool_()),
        "path": pa.array([et.paths[r] for r in members.tolist()], pa.string()),
        "sha256": pa.array([et.sha256[r] for r in members.tolist()], pa.string()),
        "similarity": pa.array(np.minimum(sims, 1.0), pa.float32()),
    }
    for t, labels in et.tags.items():
        cols[t] = pa.array([labels[r] for r in members.tolist()], pa.string())
    groups = pa.table(cols)
    # Table order within a group; groups by their first member.
    groups = groups.take(pa.array(np.lexsort((members, gid))))
    return DupesResult(groups, threshold, et.source, et.catalog, et.rows, et.left_out, time.perf_counter() - t0)


def _split_by(gid: np.ndarray, members: np.ndarray) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for g, r in zip(gid.tolist(), members.tolist()):
        out.setdefault(g, []).append(r)
    return out


def check_dupes_outputs(table: Location, out: Location, report: Location | None, catalog: str | None) -> None:
    """TaggerError when the groups file or the report would overwrite an input: the table, each other, or a photo
    of the catalog the table was tagged from (a file its walk lists)."""
    for path in (out, report):
        if path is not None:
            check_no_input(path, sources={"table": table}, catalog=catalog, reader="the table was tagged from")
    if report is not None and same_file(report, out):
        raise UsageError(f"--report {report} is the groups file -o; choose another name")


def write_groups(result: DupesResult, out: Location, table: Location) -> None:
    """Publish the groups as Parquet (atomically); never over the table they came from, nor under another format's
    name."""
    check_parquet_name(out, "-o")
    check_not_input(out, table, "table")
    buf = io.BytesIO()
    meta = {b"tagger.dupes.threshold": str(result.threshold).encode()}
    pq.write_table(result.groups.replace_schema_metadata(meta), buf)
    publish_bytes(out, buf.getvalue())


@dataclass(frozen=True)
class Neighbour:
    path: str
    similarity: float
    sha256: str | None
    tags: Mapping[str, str | None]

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "similarity": round(self.similarity, 6), "sha256": self.sha256, **self.tags}


@dataclass(frozen=True)
class QueryResult:
    query: str
    source: str  # "table": a row of the table; "image": a file embedded on the fly
    neighbours: tuple[Neighbour, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"query": self.query, "source": self.source, "neighbours": [n.to_dict() for n in self.neighbours]}

    def lines(self) -> list[str]:
        out = [f"{self.query} ({'in the table' if self.source == 'table' else 'embedded'}):"]
        for n in self.neighbours:
            tags = " ".join(f"{t}={v}" for t, v in n.tags.items())
            out.append(f"  {n.similarity:.4f}  {n.path}  {tags}")
        return out


def similar(
    table: Location | EmbeddingTable,
    queries: Sequence[str | os.PathLike[str]],
    k: int = DEFAULT_K,
    model: str | os.PathLike[str] | None = None,
    index: VectorIndex | None = None,
) -> list[QueryResult]:
    """The k nearest photos of each query: a path of the table (itself left out), or an image file embedded on the
    fly with the model the table was made with (`model`, else the shipped model of that sha256)."""
    if k < 1:
        raise UsageError(f"-k must be at least 1, got {k}")
    if not queries:
        raise UsageError("give at least one QUERY")
    et = _with_rows(table)
    rows: list[int | None] = [et.row_of(os.fspath(q)) for q in queries]
    files = [Path(q) for q, r in zip(queries, rows) if r is None]
    for f in files:
        if not f.is_file():
            raise UsageError(f"query {f} is neither a path in {et.source} nor an image file")
    embedded = iter(embed_images(files, et, model)) if files else iter(())
    vectors = np.stack([et.vectors[r] if r is not None else next(embedded) for r in rows])
    if index is None:
        index = VectorIndex(et.vectors) if isinstance(table, EmbeddingTable) else open_index(et, table)
    sims, found = index.search(vectors, k + 1)  # one more: a table row finds itself
    results = []
    for q, row, qs, qr in zip(queries, rows, sims, found):
        keep = [(float(sv), int(r)) for sv, r in zip(qs, qr) if r >= 0 and r != row][:k]
        neighbours = tuple(
            Neighbour(et.paths[r], min(sv, 1.0), et.sha256[r], {t: et.tags[t][r] for t in et.tags}) for sv, r in keep
        )
        results.append(QueryResult(os.fspath(q), "table" if row is not None else "image", neighbours))
    return results


def query_model(et: EmbeddingTable, model: str | os.PathLike[str] | None) -> Path:
    """The model to embed queries with: `model` if given, else the shipped model the table was made with; either
    way its sha256 must be the table's (else the vectors are not comparable)."""
    from tagger.model.info import model_sha256
    from tagger.model.registry import SHIPPED_MODELS, resolve_model

    if et.model_sha256 is None:
        raise TaggerError(f"{et.source} does not record its model ({s.META_MODEL_SHA256}); cannot embed a query image")
    if model is not None:
        path = resolve_model(model)
        if not path.is_file():
            raise UsageError(f"--model {model}: no such file")
        if model_sha256(path) != et.model_sha256:
            raise TaggerError(
                f"model {path.name} is not the one {et.source} was made with (sha256 {et.model_sha256[:12]}...); "
                "its embeddings are not comparable"
            )
        return path
    for name in SHIPPED_MODELS:
        try:
            path = resolve_model(name)
        except TaggerError:
            continue
        if model_sha256(path) == et.model_sha256:
            return path
    raise TaggerError(
        f"{et.source} was made with a model that is not shipped (sha256 {et.model_sha256[:12]}...); "
        "pass it with --model to embed a query image"
    )


def embed_images(files: Sequence[Path], et: EmbeddingTable, model: str | os.PathLike[str] | None) -> np.ndarray:
    """Embed image files with the table's model through `tagger run` (the serving decoder and session): float32
    [len(files), D], unit rows. A file that cannot be tagged is a UsageError naming it."""
    from tagger import RunConfig, run
    from tagger.engines.plan import ErrorLimit

    path = query_model(et, model)
    with tempfile.TemporaryDirectory(prefix="tagger-similar-") as tmp:
        listing = Path(tmp) / "queries.txt"
        listing.write_bytes(b"".join(os.fsencode(f.resolve()) + b"\n" for f in files))
        out = Path(tmp) / "queries.parquet"
        catalog = Path(tmp) / "catalog"  # files_from lists absolute paths; the catalog is only their base
        catalog.mkdir()
        everything = ErrorLimit(percent=100)  # a query that cannot be read is named below, not counted
        run(RunConfig(catalog=catalog, out=out, model=path, files_from=listing, workers=0, progress=False,
                      max_errors=everything, embeddings=True))  # fmt: skip
        tagged = pq.read_table(out, columns=["path", "status", "error", EMBEDDING_COLUMN])
    for f, status, error in zip(files, tagged.column("status").to_pylist(), tagged.column("error").to_pylist()):
        if status != s.STATUS_OK:
            raise UsageError(f"query {f} cannot be embedded: {error}")
    vectors = unit_vectors(tagged.column(EMBEDDING_COLUMN), "query")
    if vectors.shape[1] != et.vectors.shape[1]:
        raise TaggerError(f"query embeddings have {vectors.shape[1]} dimensions, {et.source} has {et.vectors.shape[1]}")
    return vectors


__all__ = [
    "DEFAULT_THRESHOLD",
    "DupesResult",
    "Neighbour",
    "QueryResult",
    "dupes",
    "embed_images",
    "similar",
    "write_groups",
]
