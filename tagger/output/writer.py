"""Output writer: rows -> Parquet, in row groups, into a temp file that becomes the output only on success.

For an output in an object store the finished file is uploaded as one object.
"""

from __future__ import annotations

import logging
from types import TracebackType
from typing import Mapping, NoReturn

import pyarrow as pa
import pyarrow.parquet as pq

from tagger.errors import TaggerError, UsageError, one_line
from tagger.output.schema import ROW_GROUP_SIZE
from tagger.storage import Location, as_location, discard, is_folder, name_of, publish, redact, reserve_temp

log = logging.getLogger(__name__)

# Names of other table formats: an output named like one would be Parquet all the same. (Other suffixes, an image's
# say, are left to the checks that an output is no input.)
OTHER_FORMATS = frozenset(
    {".csv", ".tsv", ".json", ".jsonl", ".ndjson", ".xls", ".xlsx", ".feather", ".arrow", ".ipc", ".orc",
     ".avro", ".sqlite", ".db"}
)  # fmt: skip


def check_parquet_name(out: Location, what: str = "--out") -> None:
    """UsageError when `out` is named like another table format (tags.csv): tagger writes Parquet only."""
    name = name_of(out)
    suffix = name[name.rfind(".") :].lower() if "." in name else ""
    if suffix in OTHER_FORMATS:
        raise UsageError(f"{what} {redact(out)}: tagger writes Parquet only; name it .parquet")


class ResultWriter:
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

    def __enter__(self) -> ResultWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self._done:
            self.abort()
