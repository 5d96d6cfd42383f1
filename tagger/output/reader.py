"""Read back tagger outputs: check their format, say which run wrote them, read their rows a row group at a time."""

from __future__ import annotations

import bisect
import json
import logging
import math
from dataclasses import dataclass
from types import TracebackType
from typing import Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tagger.contract import FORMAT_VERSION, META_FORMAT, META_TASKS, TaskSpec, tasks_from_json
from tagger.errors import TaggerError
from tagger.output import schema as s
from tagger.output.schema import RunIdentity
from tagger.storage import TRANSIENT_PATTERN, Location, arrow_source, as_location, redact

log = logging.getLogger(__name__)

# enough to tell whether a file changed since its row was written, and whether its error may be reused
KEY_COLUMNS = ("path", "bytes", "mtime", "status", "error")
_ARROW_SCHEMA_KEY = "ARROW:schema"  # pyarrow's own copy of the schema; not tagger metadata


@dataclass(frozen=True)
class OutputInfo:
    """A tagger output file, checked: its run identity, tasks and row count."""

    path: Location
    identity: RunIdentity
    tasks: tuple[TaskSpec, ...]
    num_rows: int
    metadata: Mapping[str, str]  # the file's key-value metadata, pyarrow's schema copy left out


def _text_metadata(parquet_meta: pq.FileMetaData) -> dict[str, str]:
    raw = parquet_meta.metadata or {}
    return {k.decode(): v.decode() for k, v in raw.items() if k.decode() != _ARROW_SCHEMA_KEY}


def file_metadata(path: Location) -> dict[str, str]:
    """A Parquet file's key-value metadata as text (pyarrow's own schema entry left out)."""
    source, fs = arrow_source(path)
    return _text_metadata(pq.read_metadata(source, filesystem=fs))


def read_output_info(loc: Location) -> OutputInfo:
    """Check that `loc` is a Parquet file this tagger wrote (format, metadata keys, columns); TaggerError if not."""
    path = redact(loc)  # how messages name it
    try:
        source, fs = arrow_source(loc)
        parquet_meta = pq.read_metadata(source, filesystem=fs)
        meta, num_rows = _text_metadata(parquet_meta), parquet_meta.num_rows
        schema = parquet_meta.schema.to_arrow_schema()
    except (pa.ArrowException, OSError, UnicodeDecodeError) as e:
        raise TaggerError(f"{path} is not a readable Parquet file ({' '.join(str(e).split())[:200]})") from None
    required = (META_FORMAT, META_TASKS, s.META_MODEL_SHA256, s.META_CATALOG, s.META_OPTIONS)
    missing = [k for k in required if k not in meta]
    if missing:
        raise TaggerError(f"{path} is not an output of this tagger version: its metadata lacks {', '.join(missing)}")
    try:
        fmt = json.loads(meta[META_FORMAT])
        tasks = tasks_from_json(meta[META_TASKS])
        identity = RunIdentity.from_metadata(meta)
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        raise TaggerError(f"{path} has malformed tagger metadata ({type(e).__name__}: {e})") from None
    if fmt != FORMAT_VERSION:
        raise TaggerError(f"{path} was written for tagger format {fmt}; this tagger reads format {FORMAT_VERSION}")
    if "sha256" not in schema.names:  # every output since the column was added has it
        raise TaggerError(f"{path} is of an older output format, without the sha256 column")
    if not schema.equals(s.output_schema(tasks, identity.top_k, identity.embedding_dim), check_metadata=False):
        raise TaggerError(f"{path} does not have the columns tagger writes for its tasks and options")
    return OutputInfo(as_location(loc), identity, tasks, num_rows, meta)


def _encode(column: pa.ChunkedArray, labels: pa.Array) -> pa.ChunkedArray:
    """A label column (dictionary or plain strings) re-encoded as dictionary<int32, string> over `labels`."""
    chunks = []
    for chunk in column.chunks:
        if pa.types.is_dictionary(chunk.type):
            if chunk.dictionary.equals(labels):
                chunks.append(chunk)
                continue
            codes = pc.index_in(chunk.dictionary, value_set=labels)  # [D] label index of each dictionary entry
            unknown = codes.null_count > 0
            indices = codes.take(chunk.indices)  # [n], null where the row is null
        else:
            indices = pc.index_in(chunk, value_set=labels)
            unknown = indices.null_count != chunk.null_count
        if unknown:
            raise TaggerError("an output holds labels the model does not have; its rows cannot be reused")
        chunks.append(pa.DictionaryArray.from_arrays(indices.cast(pa.int32()), labels))
    return pa.chunked_array(chunks, type=pa.dictionary(pa.int32(), pa.string()))


class RowReader:
    """The rows of tagger Parquet files with one schema, read as one sequence, a row group at a time.

    Rows come back as output_schema(tasks, top_k, embedding_dim) tables with the label columns encoded over the
    model's labels, so a reused row is written exactly like a freshly tagged one. Sequential reads load each row
    group once.
    """

    def __init__(
        self, paths: Sequence[Location], tasks: Sequence[TaskSpec], top_k: int, embedding_dim: int = 0
    ) -> None:
        self.schema = s.output_schema(tasks, top_k, embedding_dim)
        self._labels = {t.name: pa.array(t.labels, pa.string()) for t in tasks}
        self._files: list[pq.ParquetFile] = []
        self._starts: list[int] = []  # first row of each row group, over all files
        self._groups: list[tuple[int, int]] = []  # (file, row group in file)
        self._cached: tuple[int, pa.Table] | None = None
        n = 0
        try:
            for path in paths:
                source, fs = arrow_source(path)
                f = pq.ParquetFile(source, filesystem=fs)
                self._files.append(f)
                for g in range(f.num_row_groups):
                    self._starts.append(n)
                    self._groups.append((len(self._files) - 1, g))
                    n += f.metadata.row_group(g).num_rows
        except (pa.ArrowException, OSError) as e:
            self.close()
            raise TaggerError(f"cannot read {redact(path)}: {' '.join(str(e).split())[:200]}") from None
        self.num_rows = n

    def keys(self, columns: Sequence[str] = KEY_COLUMNS) -> pa.Table:
        """These columns (default: KEY_COLUMNS) of every row, in order."""
        tables = [f.read(columns=list(columns)) for f in self._files]
        if not tables:
            return self.schema.empty_table().select(list(columns))
        return pa.concat_tables(t.replace_schema_metadata() for t in tables)

    def read(self, start: int, count: int) -> pa.Table:
        """Rows start .. start + count - 1."""
        pieces = []
        while count > 0:
            g = bisect.bisect_right(self._starts, start) - 1
            if start < 0 or start + count > self.num_rows:
                raise IndexError(f"rows {start}..{start + count - 1} are out of range ({self.num_rows} rows)")
            table = self._group(g)
            offset = start - self._starts[g]
            k = min(count, table.num_rows - offset)
            pieces.append(table.slice(offset, k))
            start, count = start + k, count - k
        return pieces[0] if len(pieces) == 1 else pa.concat_tables(pieces)

    def _group(self, g: int) -> pa.Table:
        if self._cached is None or self._cached[0] != g:
            f, rg = self._groups[g]
            raw = self._files[f].read_row_group(rg)
            columns = [
                _encode(raw.column(field.name), self._labels[field.name])
                if field.name in self._labels
                else raw.column(field.name)
                for field in self.schema
            ]
            self._cached = (g, pa.Table.from_arrays(columns, schema=self.schema))
        return self._cached[1]

    def close(self) -> None:
        for f in self._files:
            f.close()
        self._files = []
        self._cached = None

    def __enter__(self) -> RowReader:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class RowIndex:
    """path -> first row of a RowReader with that path, and each row's size, mtime, status and (checksums) sha256."""

    def __init__(self, reader: RowReader, checksums: bool = False) -> None:
        keys = reader.keys(KEY_COLUMNS + ("sha256",) if checksums else KEY_COLUMNS)
        paths = keys.column("path").to_pylist()
        self._row: dict[str, int] = {}
        for i, p in enumerate(paths):
            self._row.setdefault(p, i)
        self.first = np.fromiter((self._row[p] for p in paths), np.int64, len(paths))  # [n] first row of its path
        self.size = keys.column("bytes").fill_null(-1).to_numpy()  # int64 [n]; -1: the file was missing
        self.mtime = keys.column("mtime").fill_null(math.nan).to_numpy()  # float64 [n]; NaN never compares equal
        self.ok = pc.equal(keys.column("status"), s.STATUS_OK).to_numpy()  # bool [n]
        # bool [n]: an error the store may not give again (timeout, 5xx, ...): such a row is never reused
        transient = pc.match_substring_regex(keys.column("error"), TRANSIENT_PATTERN, ignore_case=True)
        self.transient = pc.fill_null(transient, False).to_numpy(zero_copy_only=False)
        # Read only when asked: ~70 bytes a row that plain reuse does not need.
        self._sha256 = keys.column("sha256").combine_chunks() if checksums else None
        self.num_rows = len(paths)

    def find(self, path: str) -> int | None:
        return self._row.get(path)

    def same_file(self, row: int, size: int, mtime: float) -> bool:
        """A file of this size and mtime is the one `row` was written for (a missing file, size < 0, never is)."""
        return size >= 0 and self.size[row] == size and self.mtime[row] == mtime

    def sha256(self, row: int) -> str | None:
        """The sha256 `row` recorded (None: its file could not be read); needs checksums=True."""
        if self._sha256 is None:
            raise RuntimeError("RowIndex built without checksums")
        value: str | None = self._sha256[row].as_py()
        return value


__all__ = ["KEY_COLUMNS", "OutputInfo", "RowIndex", "RowReader", "RunIdentity", "file_metadata", "read_output_info"]
