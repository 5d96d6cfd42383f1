"""Write stage: rows -> Parquet, in row groups, into a temp file that replaces the output only on success."""

from __future__ import annotations

import logging
import math
import os
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Mapping, NoReturn, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tagger.contract import TaskSpec
from tagger.errors import TaggerError
from tagger.pipeline.batch import Batch
from tagger.pipeline.decode import Sample
from tagger.pipeline.discover import MISSING_SIZE
from tagger.pipeline.postprocess import TaskPrediction

log = logging.getLogger(__name__)

STATUS_OK = "ok"
STATUS_ERROR = "error"
ROW_GROUP_SIZE = 65_536  # rows buffered before a row group is written: ~10 MB, whatever the run's size

# File key-value metadata written besides the model's own tagger.* keys (copied verbatim).
META_MODEL_SHA256 = "tagger.model_sha256"
META_TOOL_VERSION = "tagger.run.tool_version"
META_PROVIDER = "tagger.run.provider"
META_STARTED = "tagger.run.started"  # ISO 8601, UTC
META_FINISHED = "tagger.run.finished"
META_FILES = "tagger.run.files"
META_OK = "tagger.run.ok"
META_ERRORS = "tagger.run.errors"
META_TAGGED = "tagger.run.tagged"  # rows decoded and inferred by this run (the rest were reused)
META_REUSED = "tagger.run.reused"  # rows copied from the previous output (--incremental)
META_RESUMED = "tagger.run.resumed"  # rows taken from an interrupted run's committed parts
META_CHANGES = "tagger.run.changes"  # JSON: new, changed, unchanged, removed, retried, failed (--incremental)
# What the rows mean besides the model: a rerun may reuse rows only when these agree (tagger.pipeline.output).
META_CATALOG = "tagger.output.catalog"  # absolute catalog folder
META_OPTIONS = "tagger.output.options"  # JSON: top_k, max_pixels, extensions, files_from
META_SHARD = "tagger.output.shard"  # "I/N"; absent when the whole catalog was tagged

TOPK_TYPE = pa.list_(pa.struct([("label", pa.string()), ("score", pa.float32())]))


def output_schema(tasks: Sequence[TaskSpec], top_k: int = 0) -> pa.Schema:
    """path | per task: <task> (dictionary label), <task>_score, [<task>_topk] | status, error, width, height, bytes, mtime.

    <task>_topk (only with top_k > 0): list of {label, score}, best first. width/height: the full-resolution image
    as displayed (after EXIF rotation), null on error. bytes: file size, null when the file is missing. mtime:
    float64 seconds since the epoch, exactly os.stat's st_mtime, so a rerun can compare it with ==.
    """
    fields: list[pa.Field] = [pa.field("path", pa.string(), nullable=False)]
    for t in tasks:
        fields.append(pa.field(t.name, pa.dictionary(pa.int32(), pa.string())))
        fields.append(pa.field(f"{t.name}_score", pa.float32()))
        if top_k:
            fields.append(pa.field(f"{t.name}_topk", TOPK_TYPE))
    fields += [
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("bytes", pa.int64()),
        pa.field("mtime", pa.float64()),
    ]
    return pa.schema(fields)


def rows_to_table(
    batch: Batch, preds: Mapping[str, TaskPrediction], tasks: Sequence[TaskSpec], top_k: int = 0
) -> pa.Table:
    """One row per ref of the batch, in order; predictions (for the batch's Samples, in order) fill the ok rows."""
    n = len(batch.refs)
    ok = np.array([isinstance(r, Sample) for r in batch.results], dtype=bool)  # [n]
    err = ~ok
    rows = np.flatnonzero(ok)  # [k] row of each prediction
    cols: dict[str, pa.Array] = {"path": pa.array([r.path for r in batch.refs], pa.string())}
    for t in tasks:
        p = preds[t.name]
        labels = pa.array(t.labels, pa.string())
        idx = np.zeros(n, np.int32)
        idx[rows] = p.index
        score = np.zeros(n, np.float32)
        score[rows] = p.score
        cols[t.name] = pa.DictionaryArray.from_arrays(pa.array(idx, mask=err), labels)
        cols[f"{t.name}_score"] = pa.array(score, mask=err)
        if top_k:
            cols[f"{t.name}_topk"] = _topk_column(p, labels, ok)
    sizes = [r.size for r in batch.refs]
    mtimes = [r.mtime for r in batch.refs]
    cols["status"] = pa.array([STATUS_OK if o else STATUS_ERROR for o in ok], pa.string())
    cols["error"] = pa.array([None if isinstance(r, Sample) else r.error for r in batch.results], pa.string())
    cols["width"] = pa.array([r.width if isinstance(r, Sample) else None for r in batch.results], pa.int32())
    cols["height"] = pa.array([r.height if isinstance(r, Sample) else None for r in batch.results], pa.int32())
    cols["bytes"] = pa.array([None if s == MISSING_SIZE else s for s in sizes], pa.int64())
    cols["mtime"] = pa.array([None if math.isnan(m) else m for m in mtimes], pa.float64())
    return pa.Table.from_pydict(cols, schema=output_schema(tasks, top_k))


def _topk_column(p: TaskPrediction, labels: pa.Array, ok: np.ndarray) -> pa.Array:
    assert p.topk_index is not None and p.topk_score is not None
    k = p.topk_index.shape[1]
    values = pa.StructArray.from_arrays(
        [labels.take(pa.array(p.topk_index.ravel())), pa.array(p.topk_score.ravel(), pa.float32())],
        names=["label", "score"],
    )
    # Error rows are null lists: zero-length offsets steps plus a null mask.
    offsets = np.concatenate([[0], np.cumsum(np.where(ok, k, 0))]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), values, type=TOPK_TYPE, mask=pa.array(~ok))


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename in `path` durable: without this a power loss can undo it, or keep the name but not the data."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _oserror_text(e: OSError) -> str:
    return " ".join((e.strerror or str(e)).split())


class ResultWriter:
    """Incremental Parquet writer: a temp file beside `out` (or in `tmp_dir`, same file system), renamed over `out`
    by commit(), removed otherwise.

    A crash, an error or a full disk therefore never leaves a truncated output, nor clobbers an existing one. Rows
    are buffered and written in row groups of `row_group_size`, so memory stays bounded on runs of millions.
    """

    def __init__(
        self,
        out: str | os.PathLike[str],
        schema: pa.Schema,
        metadata: Mapping[str, str] | None = None,
        row_group_size: int = ROW_GROUP_SIZE,
        tmp_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.out = Path(out)
        self.schema = schema.with_metadata(dict(metadata or {}))
        self.row_group_size = row_group_size
        self.rows = 0
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        if self.out.is_dir():
            raise TaggerError(f"output {self.out} is a folder; name a .parquet file")
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{self.out.name}.", suffix=".tmp", dir=tmp_dir or self.out.parent)
        except OSError as e:
            raise TaggerError(f"cannot write output {self.out}: {e.strerror or e}") from None
        os.close(fd)
        self._tmp = Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self._tmp, 0o666 & ~umask)  # mkstemp's 0600 would otherwise become the output's mode
        self._writer: pq.ParquetWriter | None = pq.ParquetWriter(self._tmp, self.schema, compression="zstd")
        self._done = False

    def write(self, table: pa.Table) -> None:
        self._pending.append(table)
        self._pending_rows += table.num_rows
        self.rows += table.num_rows
        if self._pending_rows >= self.row_group_size:
            self._flush()

    def _flush(self) -> None:
        if self._pending and self._writer is not None:
            table = pa.concat_tables(self._pending)
            try:
                self._writer.write_table(table, row_group_size=max(self.row_group_size, table.num_rows))
            except OSError as e:  # a full disk, mostly
                self._fail(e)
        self._pending, self._pending_rows = [], 0

    def _fail(self, e: OSError) -> NoReturn:
        self.abort()
        raise TaggerError(f"cannot write output {self.out}: {_oserror_text(e)}") from None

    def commit(self, metadata: Mapping[str, str] | None = None) -> Path:
        """Flush, add final key-value metadata (counts, end time), and atomically move the file into place.

        The temp file is fsynced before the rename and the folder after it, so after a power loss `out` is either
        the previous file or the complete new one.
        """
        assert self._writer is not None, "writer already closed"
        self._flush()
        if metadata:
            self._writer.add_key_value_metadata(dict(metadata))
        writer, self._writer = self._writer, None
        try:
            writer.close()
            with open(self._tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(self._tmp, self.out)
            fsync_dir(self.out.parent)
        except OSError as e:
            self._fail(e)
        self._done = True
        log.debug("wrote %d rows to %s", self.rows, self.out)
        return self.out

    def abort(self) -> None:
        """Drop the temp file; the output (and any previous one) is left as it was."""
        if self._writer is not None:
            writer, self._writer = self._writer, None
            try:
                writer.close()
            except OSError as e:  # closing flushes; on a full disk that fails too, and the file goes anyway
                log.debug("closing the temp output %s: %s", self._tmp, e)
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> ResultWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self._done:
            self.abort()
