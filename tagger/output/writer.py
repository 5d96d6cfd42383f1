"""Output writers: rows -> Parquet, in row groups, into a temp file (or a folder of part files) that becomes the
output only on success.

For an output in an object store the finished file is uploaded as one object.
"""

from __future__ import annotations

import logging
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import Mapping, NoReturn, Protocol, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq

from tagger.errors import TaggerError, UsageError, one_line
from tagger.output.schema import META_RESUMED, META_REUSED, META_TAGGED, ROW_GROUP_SIZE, closing_metadata, count_ok
from tagger.storage import (
    Location,
    as_location,
    discard,
    is_folder,
    name_of,
    open_location,
    publish,
    redact,
    reserve_temp,
    reserve_temp_dir,
)

log = logging.getLogger(__name__)

# Names of other table formats: an output named like one would be Parquet all the same. (Other suffixes, an image's
# say, are left to the checks that an output is no input.)
OTHER_FORMATS = frozenset(
    {".csv", ".tsv", ".json", ".jsonl", ".ndjson", ".xls", ".xlsx", ".feather", ".arrow", ".ipc", ".orc",
     ".avro", ".sqlite", ".db"}
)  # fmt: skip


# A whole-file compression suffix: Parquet compresses inside the file, so tags.csv.gz would be neither gzip nor CSV.
COMPRESSED = frozenset({".gz", ".bz2", ".xz", ".zst", ".zip", ".lz4", ".snappy", ".br"})


def check_parquet_name(out: Location, what: str = "--out") -> None:
    """UsageError when `out` is named like another table format (tags.csv) or a compressed file (tags.csv.gz,
    tags.parquet.gz): tagger writes Parquet only."""
    suffix = PurePosixPath(name_of(out)).suffix.lower()
    if suffix in OTHER_FORMATS or suffix in COMPRESSED:
        raise UsageError(f"{what} {redact(out)}: tagger writes Parquet only (compressed inside); name it .parquet")


ROWS_PER_PART = 1_000_000  # rows per part file when --out is a folder


def writes_folder(out: Location) -> bool:
    """--out names a single file when it ends in .parquet, else a folder of part files."""
    return not name_of(out).lower().endswith(".parquet")


def check_output(out: Location) -> None:
    """Refuse an output that cannot be written, a file or (writes_folder) a folder of parts, before any work is done
    (a URI's bucket answers when it is opened)."""
    store, key = open_location(out)
    if store.remote:
        # One finished object is uploaded; parts in a bucket would need an upload per part and a cleanup.
        if writes_folder(key):
            raise UsageError(f"an output in a bucket is one .parquet object, not {redact(out)}")
        return
    out = Path(key)
    if writes_folder(out):
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise TaggerError(f"output folder {out} exists and is not empty; name a new folder or a .parquet file")
    elif out.is_dir():
        raise TaggerError(f"output {out} is a folder; name a .parquet file")
    if not out.parent.is_dir():
        raise TaggerError(f"cannot write output {out}: no folder {out.parent}")


class OutputWriter(Protocol):
    """What the rows of a run are written to: ResultWriter (one file) or PartsWriter (a folder of parts)."""

    def write(self, table: pa.Table, origin: str = META_TAGGED) -> None: ...

    def commit(self, metadata: Mapping[str, str] | None = None) -> Location: ...

    def abort(self) -> None: ...


_W = TypeVar("_W", bound="_AbortUnlessCommitted")


class _AbortUnlessCommitted:
    """As a context manager, a writer that was not committed aborts: a failed run leaves nothing behind."""

    _done = False

    def abort(self) -> None:
        raise NotImplementedError

    def __enter__(self: _W) -> _W:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self._done:
            self.abort()


class ResultWriter(_AbortUnlessCommitted):
    """Incremental Parquet writer: a temp file beside `out` (or in `tmp_dir`, same file system), renamed over `out`
    by commit(), removed otherwise. An output in a bucket is written to a local temp file and uploaded whole by
    commit(): readers never see a half-written object, and a failed run never starts an upload.

    A crash, an error or a full disk therefore never leaves a truncated output, nor clobbers an existing one. Rows
    are buffered and written in row groups of `row_group_size`, so memory stays bounded on runs of millions.
    """

    def __init__(
        self,
        out: Location,
        schema: pa.Schema,
        metadata: Mapping[str, str] | None = None,
        row_group_size: int = ROW_GROUP_SIZE,
        tmp_dir: Location | None = None,
    ) -> None:
        self.out = as_location(out)
        self.schema = schema.with_metadata(dict(metadata or {}))
        self.row_group_size = row_group_size
        self.rows = 0
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        if is_folder(self.out):
            raise TaggerError(f"output {redact(self.out)} is a folder; name a .parquet file")
        self._tmp = reserve_temp(self.out, tmp_dir)
        try:
            self._writer: pq.ParquetWriter | None = pq.ParquetWriter(self._tmp, self.schema, compression="zstd")
        except (OSError, pa.ArrowException) as e:
            discard(self._tmp)
            raise TaggerError(f"cannot write output {redact(self.out)}: {one_line(e)}") from None
        self._done = False

    def write(self, table: pa.Table, origin: str = META_TAGGED) -> None:
        """Buffer rows, written a row group at a time. origin: the closing count the rows add to (META_TAGGED,
        META_REUSED or META_RESUMED); the caller's closing metadata has the file's, only PartsWriter needs it."""
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
        raise TaggerError(f"cannot write output {redact(self.out)}: {one_line(e)}") from None

    def commit(self, metadata: Mapping[str, str] | None = None) -> Location:
        """Flush, add final key-value metadata (counts, end time), and atomically move the file into place.

        Published with tagger.storage.publish: after a power loss `out` is either the previous file or the new one.
        """
        assert self._writer is not None, "writer already closed"
        self._flush()
        if metadata:
            self._writer.add_key_value_metadata(dict(metadata))
        writer, self._writer = self._writer, None
        try:
            writer.close()
        except OSError as e:
            self._fail(e)
        publish(self._tmp, self.out)
        self._done = True
        log.debug("wrote %d rows to %s", self.rows, redact(self.out))
        return self.out

    def abort(self) -> None:
        """Drop the temp file; the output (and any previous one) is left as it was."""
        if self._writer is not None:
            writer, self._writer = self._writer, None
            try:
                writer.close()
            except OSError as e:  # closing flushes; on a full disk that fails too, and the file goes anyway
                log.debug("closing the temp output %s: %s", self._tmp, e)
        discard(self._tmp)


class PartsWriter(_AbortUnlessCommitted):
    """A folder of part-NNNNN.parquet files in order, each a complete output file of its rows with their own counts.

    Parts go into a hidden folder beside `out` that becomes `out` on commit(), so a failed run leaves nothing behind.
    """

    def __init__(
        self, out: Path, schema: pa.Schema, metadata: Mapping[str, str], rows_per_part: int = ROWS_PER_PART
    ) -> None:
        if rows_per_part < 1:
            raise UsageError(f"rows_per_part must be at least 1, got {rows_per_part}")
        check_output(out)
        self.out, self.schema, self.metadata, self.rows_per_part = out, schema, metadata, rows_per_part
        self._stage = reserve_temp_dir(out)
        self._part: ResultWriter | None = None
        self._parts = 0
        self._rows = self._ok = 0
        self._origins = dict.fromkeys((META_TAGGED, META_REUSED, META_RESUMED), 0)
        self._done = False

    def write(self, table: pa.Table, origin: str = META_TAGGED) -> None:
        while table.num_rows:
            if self._part is None:
                path = self._stage / f"part-{self._parts:05d}.parquet"
                self._part = ResultWriter(path, self.schema, self.metadata)
                self._parts += 1
            head = table.slice(0, self.rows_per_part - self._rows)
            table = table.slice(head.num_rows)
            self._part.write(head)
            self._rows += head.num_rows
            self._ok += count_ok(head)
            self._origins[origin] += head.num_rows
            if self._rows == self.rows_per_part:
                self._close_part()

    def _close_part(self) -> None:
        assert self._part is not None
        o = self._origins
        self._part.commit(closing_metadata(self._rows, self._ok, o[META_TAGGED], o[META_REUSED], o[META_RESUMED]))
        self._part, self._rows, self._ok = None, 0, 0
        self._origins = dict.fromkeys(o, 0)

    def commit(self, metadata: Mapping[str, str] | None = None) -> Location:
        """Close the last part and move the folder into place; `metadata` (the run's closing keys) is not needed:
        each part carries its own counts."""
        if self._part is not None:
            self._close_part()
        publish(self._stage, self.out)  # an existing self.out was checked empty
        self._done = True
        return self.out

    def abort(self) -> None:
        if self._part is not None:
            self._part.abort()
            self._part = None
        discard(self._stage)


__all__ = [
    "ROWS_PER_PART",
    "OutputWriter",
    "PartsWriter",
    "ResultWriter",
    "check_output",
    "check_parquet_name",
    "writes_folder",
]
