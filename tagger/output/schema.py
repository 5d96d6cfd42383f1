"""The output format: columns, status values, every metadata key, the run identity and the closing metadata."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa

from tagger.contract import EMBEDDING_OUTPUT, TaskSpec

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
META_CHANGES = "tagger.run.changes"  # JSON: new, changed, unchanged, removed, retried, failed, ... (--incremental)
META_UNLISTABLE = "tagger.run.unlistable"  # folders that could not be listed (each has an error row 'sub/')
# What the rows mean besides the model: a rerun may reuse rows only when these agree (tagger.output.reader).
META_CATALOG = "tagger.output.catalog"  # absolute catalog folder, or its URI without credentials
META_OPTIONS = "tagger.output.options"  # JSON: top_k, max_pixels, extensions, files_from, embedding_dim
META_SHARD = "tagger.output.shard"  # "I/N"; absent when the whole catalog was tagged

TOPK_TYPE = pa.list_(pa.struct([("label", pa.string()), ("score", pa.float32())]))
EMBEDDING_COLUMN = EMBEDDING_OUTPUT


def embedding_type(dim: int) -> pa.DataType:
    """The `embedding` column: a fixed-size list of `dim` float16 (half the bytes of float32; cosines of unit
    vectors keep ~3 decimals)."""
    return pa.list_(pa.float16(), dim)


def output_schema(tasks: Sequence[TaskSpec], top_k: int = 0, embedding_dim: int = 0) -> pa.Schema:
    """path | per task: <task> (dictionary label), <task>_score, [<task>_topk] | status, error, width, height, bytes,
    mtime, sha256 | [embedding].

    <task>_topk (only with top_k > 0): list of {label, score}, best first. width/height: the full-resolution image
    as displayed (after EXIF rotation), null on error. bytes: file size, null when the file is missing. mtime:
    float64 seconds since the epoch, exactly os.stat's st_mtime, so a rerun can compare it with ==. sha256: hex
    SHA-256 of the file's bytes as read for decoding, null when they could not be read (an image that then fails to
    decode keeps it). embedding (only with embedding_dim > 0, `--embeddings`): the model's L2-normalised pooled
    features, embedding_type(embedding_dim), null on error rows.
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
        pa.field("sha256", pa.string()),
    ]
    if embedding_dim:
        fields.append(pa.field(EMBEDDING_COLUMN, embedding_type(embedding_dim)))
    return pa.schema(fields)


@dataclass(frozen=True)
class RunIdentity:
    """What an output's rows mean: the model, the catalog, and the options that decide which rows and their values.

    Rows of two runs with the same model, top_k, max_pixels and embedding_dim are interchangeable file by file.
    """

    model_sha256: str
    catalog: str  # absolute path of the catalog folder, or its URI without credentials (storage.redact)
    top_k: int
    max_pixels: int
    extensions: tuple[str, ...] | None  # sorted; None when the files came from a list
    files_from: str | None  # absolute path of that list
    shard: str | None = None  # "I/N"
    embedding_dim: int = 0  # D of the `embedding` column; 0: no such column (run without --embeddings)

    def metadata(self) -> dict[str, str]:
        options = {
            "top_k": self.top_k,
            "max_pixels": self.max_pixels,
            "extensions": list(self.extensions) if self.extensions is not None else None,
            "files_from": self.files_from,
            "embedding_dim": self.embedding_dim,
        }
        meta = {
            META_MODEL_SHA256: self.model_sha256,
            META_CATALOG: self.catalog,
            META_OPTIONS: json.dumps(options, sort_keys=True),
        }
        if self.shard is not None:
            meta[META_SHARD] = self.shard
        return meta

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str]) -> RunIdentity:
        """Raises KeyError, ValueError or TypeError when the keys are missing or malformed."""
        options: dict[str, Any] = json.loads(meta[META_OPTIONS])
        exts = options["extensions"]
        files_from = options["files_from"]
        return cls(
            model_sha256=str(meta[META_MODEL_SHA256]),
            catalog=str(meta[META_CATALOG]),
            top_k=int(options["top_k"]),
            max_pixels=int(options["max_pixels"]),
            extensions=tuple(str(e) for e in exts) if exts is not None else None,
            files_from=str(files_from) if files_from is not None else None,
            shard=meta.get(META_SHARD),
            embedding_dim=int(options.get("embedding_dim", 0)),  # outputs from before the column have none
        )

    def same_options(self, other: RunIdentity) -> bool:
        """Whether the row-shaping options agree (top_k, max_pixels, embedding_dim)."""
        return (self.top_k, self.max_pixels, self.embedding_dim) == (other.top_k, other.max_pixels, other.embedding_dim)

    def same_values(self, other: RunIdentity) -> bool:
        """Whether a file gets the same row from both runs (what it is listed under does not matter)."""
        return self.model_sha256 == other.model_sha256 and self.same_options(other)


def now() -> str:
    """The current time as the output's timestamps write it: ISO 8601, UTC, seconds."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def count_ok(table: pa.Table) -> int:
    """Rows of an output table whose status is ok."""
    return int(np.count_nonzero(table.column("status").to_numpy(zero_copy_only=False) == STATUS_OK))


def closing_metadata(
    files: int,
    ok: int,
    tagged: int,
    reused: int = 0,
    resumed: int = 0,
    changes: Mapping[str, int] | None = None,
    unlistable: int = 0,
) -> dict[str, str]:
    """The keys written when an output is complete: end time and what its rows are and where they came from."""
    meta = {
        META_FINISHED: now(),
        META_FILES: str(files),
        META_OK: str(ok),
        META_ERRORS: str(files - ok),
        META_TAGGED: str(tagged),
        META_REUSED: str(reused),
        META_RESUMED: str(resumed),
        META_UNLISTABLE: str(unlistable),
    }
    if changes is not None:
        meta[META_CHANGES] = json.dumps(dict(changes))
    return meta
