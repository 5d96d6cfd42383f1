"""The run plan both engines execute: config, listing, model facts, identity, opening metadata and the summary."""

from __future__ import annotations

import itertools
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator, Mapping

from tagger._version import __version__
from tagger.contract import PreprocessSpec, TaskSpec
from tagger.errors import TaggerError, UsageError
from tagger.guards import check_no_input, refusing_out
from tagger.model.registry import is_shipped_name, resolve_model
from tagger.nightly.assemble import Changes
from tagger.nightly.shard import Shard, check_shard_output
from tagger.nightly.workdir import DEFAULT_COMMIT_EVERY, DEFAULT_COMMIT_SECONDS
from tagger.output import schema as s
from tagger.output.schema import RunIdentity
from tagger.output.writer import check_parquet_name
from tagger.compose import check_stage_options
from tagger.pipeline.decode import DEFAULT_DECODE_MEMORY, DEFAULT_IO_THREADS, DEFAULT_MAX_PIXELS, MAX_DECODE_MEMORY
from tagger.pipeline.discover import DEFAULT_EXTENSIONS, ImageRef, copy_of_list, discover, path_text, refs_from_list
from tagger.pipeline.session import Session
from tagger.storage import Location, absolute, as_location, check_names_file, exists, is_folder, redact

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ErrorLimit:
    """--max-errors: the most error rows an output may hold and still replace the previous one; a count, or a
    percentage of its rows. A run past it fails (exit 1): its output is not published, its work parts stay."""

    count: int | None = None  # more error rows than this fail the run
    percent: float | None = None  # ... or more than this share of the rows, 0..100

    def __post_init__(self) -> None:
        if (self.count is None) == (self.percent is None):
            raise UsageError("--max-errors takes either a count or a percentage")
        if self.count is not None and self.count < 0:
            raise UsageError(f"--max-errors must be >= 0, got {self.count}")
        if self.percent is not None and not 0 <= self.percent <= 100:  # NaN compares false
            raise UsageError(f"--max-errors must be a percentage from 0% to 100%, got {self.percent}%")

    @classmethod
    def parse(cls, text: str | int) -> ErrorLimit:
        """'10' (error rows) or '5%' / '2.5%' (of the rows)."""
        value = str(text).strip()
        try:
            if value.endswith("%"):
                return cls(percent=float(value[:-1]))
            return cls(count=int(value))
        except ValueError:
            raise UsageError(f"--max-errors takes N or P% (e.g. 100 or 5%), got {value!r}") from None

    def exceeded(self, errors: int, rows: int) -> bool:
        if self.count is not None:
            return errors > self.count
        return errors * 100 > (self.percent or 0.0) * rows

    def __str__(self) -> str:
        return str(self.count) if self.count is not None else f"{self.percent:g}%"


# Past half the rows, error rows almost always mean a failure of the system (a mount or a store gone, permissions
# changed) rather than bad photos, which a real catalog holds a few of.
DEFAULT_MAX_ERRORS = ErrorLimit(percent=50.0)


@dataclass(frozen=True)
class RunConfig:
    """Everything `tagger run` needs. None means "pick the default" (documented per field)."""

    catalog: Location  # a folder, or a URI (s3://bucket/prefix, gs://..., any pyarrow.fs URI); kept as given
    out: Location  # a .parquet file, local or a URI (--engine ray: another name is a local folder of part files)
    model: Path | None = None  # None: the shipped default model; a shipped model by name, e.g. "default-int8"
    device: str = "auto"  # auto | cpu | cuda
    batch_size: int | None = None  # images per inference call; None: 64 on CPU, 256 on CUDA
    workers: int | None = None  # decode processes; None: one per core; 0 or 1: decode in this process
    threads: int | None = None  # inference intra-op threads; None: one per core (shared with the workers)
    top_k: int = 0  # > 0 adds a <task>_topk column per task
    extensions: frozenset[str] = DEFAULT_EXTENSIONS
    max_pixels: int = DEFAULT_MAX_PIXELS
    decode_memory: int = DEFAULT_DECODE_MEMORY  # bytes of decoding all decode workers may hold at once
    files_from: Location | None = None  # a list of paths (or keys, URIs) to tag instead of walking the catalog
    progress: bool | None = None  # None: a progress bar on a terminal, periodic log lines otherwise
    incremental: bool = False  # reuse the rows of `out` for unchanged files (same path, size, mtime; same model)
    retry_errors: bool = False  # incremental: tag files with an error row again even when unchanged
    keep_stale_model: bool = False  # incremental: reuse rows that another model (with the same labels) wrote
    checksum: bool = False  # incremental: also hash files of the same size and mtime; tag them again if bytes changed
    allow_other_catalog: bool = False  # incremental: reuse rows of an output written from another catalog
    resume: bool = False  # reuse rows an interrupted run committed to OUT.work/ (incremental implies it)
    commit_every: int = DEFAULT_COMMIT_EVERY  # commit tagged rows to OUT.work/ every N images; 0: not by count
    commit_seconds: float = DEFAULT_COMMIT_SECONDS  # ... or every T seconds; 0: not by time (both 0: never)
    shard: Shard | None = None  # tag only the files of this shard
    inflight: int | None = None  # batches in the session at once; None: 2 on CUDA, 1 on CPU
    io_threads: int = DEFAULT_IO_THREADS  # object-store reads in flight per decode worker (not local files)
    max_errors: ErrorLimit = DEFAULT_MAX_ERRORS  # more error rows in the output fail the run, which publishes nothing
    embeddings: bool = False  # add the `embedding` column (the model's L2-normalised pooled features, float16)

    def __post_init__(self) -> None:
        check_names_file(self.out, "--out")  # as given: '' becomes Path('.')
        check_parquet_name(self.out)
        # A URI stays the exact string (Path would collapse s3:// to s3:/), a local name becomes a Path.
        for name in ("catalog", "out", "files_from"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, as_location(value))
        check_stage_options(self.batch_size, self.workers, self.threads, self.io_threads)
        if self.inflight is not None and self.inflight < 1:
            raise UsageError(f"inflight must be at least 1, got {self.inflight}")
        if self.top_k < 0:
            raise UsageError(f"--top-k must be >= 0, got {self.top_k}")
        if self.max_pixels < 1:
            raise UsageError(f"--max-pixels must be at least 1, got {self.max_pixels}")
        if self.decode_memory < 1:
            raise UsageError(f"--decode-memory must be at least 1 byte, got {self.decode_memory}")
        if self.decode_memory > MAX_DECODE_MEMORY:
            raise UsageError(f"--decode-memory must be at most 1 EiB (2**60 bytes), got {self.decode_memory}")
        needs_incremental = {"--retry-errors": self.retry_errors, "--keep-stale-model": self.keep_stale_model,
                             "--checksum": self.checksum, "--allow-other-catalog": self.allow_other_catalog}  # fmt: skip
        flag = next((name for name, value in needs_incremental.items() if value), None)
        if flag is not None and not self.incremental:
            raise UsageError(f"{flag} only applies with --incremental")
        if self.commit_every < 0 or not 0 <= self.commit_seconds < math.inf:  # NaN compares false
            raise UsageError(f"--commit-every and --commit-seconds must be finite and >= 0, got {self.commit_every} "
                             f"and {self.commit_seconds}")
        if self.shard is not None and self.files_from is not None:
            raise UsageError("--shard splits a catalog walk; with --files-from, split the list instead")


@dataclass(frozen=True)
class RunSummary:
    """What a run did; line() is the one line `tagger run` prints."""

    out: Location
    files: int
    ok: int
    errors: int
    elapsed_s: float
    provider: str
    stage_seconds: Mapping[str, float] = field(default_factory=dict)
    tagged: int | None = None  # files decoded and inferred by this run; None: all of them
    reused: int = 0  # rows copied from the previous output
    resumed: int = 0  # rows taken from an interrupted run's committed parts
    changes: Changes | None = None  # what an incremental run found
    unlistable: int = 0  # folders that could not be listed (one error row each)

    @property
    def images_tagged(self) -> int:
        return self.files if self.tagged is None else self.tagged

    @property
    def images_per_s(self) -> float:
        """Tagged images per second (reused rows cost next to nothing and are not counted)."""
        return self.images_tagged / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def line(self) -> str:
        text = f"{self.files} files, {self.ok} ok, {self.errors} errors"
        if self.changes is not None:
            text += f" ({self.changes.line()})"
        if self.tagged is not None:
            text += f"; tagged {self.tagged}, reused {self.reused}, resumed {self.resumed}"
        if self.unlistable:
            text += f"; {self.unlistable} folder{'s' if self.unlistable > 1 else ''} could not be listed"
        rate = f"{self.images_per_s:.1f} img/s, " if self.images_tagged else ""
        return f"{text}, {rate}{self.elapsed_s:.1f} s on {self.provider} -> {redact(self.out)}"


@dataclass(frozen=True)
class ModelFacts:
    """What a run needs from the model, as the session that tags sees it (its provider included)."""

    tasks: tuple[TaskSpec, ...]
    spec: PreprocessSpec
    provider: str
    sha256: str
    metadata: Mapping[str, str]  # the model's tagger.* keys, copied into the output
    embedding_dim: int = 0  # D of the `embedding` column; 0: none (no --embeddings)

    @classmethod
    def of(cls, session: Session) -> ModelFacts:
        return cls(
            session.tasks, session.spec, session.provider, session.info.sha256, dict(session.metadata),
            session.embedding_dim,
        )  # fmt: skip


def list_refs(config: RunConfig, list_copy: BinaryIO | None = None) -> Iterator[ImageRef]:
    """The files of the run in discovery order (a walk or the --files-from list, then the shard's share; an
    incremental shard also gets every folder that could not be listed, see Assembler). list_copy: the list's
    copy_of_list, read instead of it.

    TaggerError when the catalog holds no file to tag at all, before any model is loaded.
    """
    if not exists(config.catalog):
        raise TaggerError(f"catalog {redact(config.catalog)} does not exist")
    if config.files_from is not None:
        refs = refs_from_list(config.catalog, config.files_from, list_copy)
    else:
        refs = refusing_out(discover(config.catalog, config.extensions), config.catalog, config.out)
    first = next(refs, None)
    if first is None:
        what = f"listed in {redact(config.files_from)}" if config.files_from else "with extension " + ",".join(
            sorted(config.extensions)
        )
        raise TaggerError(f"no image files {what} in {redact(config.catalog)}")
    listed = itertools.chain([first], refs)
    shard = config.shard
    if shard is None:
        return listed
    # An incremental shard also gets the other shards' unlistable folders: its own rows beneath one may hash to it,
    # and its Assembler keeps them (only the folder's owner writes the folder's error row).
    keep = config.incremental
    return (r for r in listed if shard.holds(r.path) or (keep and r.unlistable is not None))


def check_out_is_no_input(config: RunConfig, list_copy: BinaryIO | None = None) -> None:
    """TaggerError when --out names a file the run reads: the model, the --files-from list (list_copy: its
    copy_of_list), or a file the run tags (listed, or walked: inside the catalog with a tagged extension, refused
    with --files-from too: the catalog's photos are inputs of its walks, the next nightly run)."""
    try:
        model: Path | None = resolve_model(config.model)
    except TaggerError:  # a shipped model that is not installed: opening the session says so
        model = None
    check_no_input(
        config.out,
        sources={"model": model, "--files-from list": config.files_from},
        catalog=config.catalog,
        walked=is_folder(config.catalog),
        extensions=config.extensions,
        files_from=config.files_from,
        list_copy=list_copy,
    )


def run_identity(config: RunConfig, model_sha256: str, embedding_dim: int = 0) -> RunIdentity:
    """What the rows depend on besides each file: model, catalog and row-shaping options (embedding_dim: D of the
    model's embedding with --embeddings, else 0)."""
    listed = config.files_from is not None
    return RunIdentity(
        model_sha256=model_sha256,
        catalog=path_text(absolute(config.catalog)),  # metadata is UTF-8 text; a URI without its credentials
        top_k=config.top_k,
        max_pixels=config.max_pixels,
        extensions=None if listed else tuple(sorted(config.extensions)),
        files_from=path_text(absolute(config.files_from)) if config.files_from is not None else None,
        shard=str(config.shard) if config.shard is not None else None,
        embedding_dim=embedding_dim,
    )


class RunPlan:
    """One run from start to summary, whichever engine executes it: check the output, list the files, then (once
    the engine has the model's facts) the identity and the output's opening metadata, and at the end the summary."""

    def __init__(self, config: RunConfig) -> None:
        self.t_start = time.perf_counter()
        self.started = s.now()
        self.config = config
        # A list that cannot be read twice (a pipe) is copied once; the guard and the listing both read the copy.
        list_copy = copy_of_list(config.files_from) if config.files_from is not None else None
        check_out_is_no_input(config, list_copy)
        check_shard_output(config.out, config.shard)
        self.refs = list_refs(config, list_copy)

    def identity(self, facts: ModelFacts) -> RunIdentity:
        return run_identity(self.config, facts.sha256, facts.embedding_dim)

    def metadata(self, facts: ModelFacts) -> dict[str, str]:
        """The output's opening key-value metadata: the model's keys, the identity, the tool and provider."""
        return {
            **facts.metadata,
            **self.identity(facts).metadata(),
            s.META_TOOL_VERSION: __version__,
            s.META_PROVIDER: facts.provider,
            s.META_STARTED: self.started,
        }

    def check_errors(self, rows: int, errors: int) -> None:
        """TaggerError, before the output is published, when its error rows pass --max-errors."""
        limit = self.config.max_errors
        if limit.exceeded(errors, rows):
            raise TaggerError(
                f"{errors} of {rows} rows are errors, more than --max-errors {limit}; {redact(self.config.out)} was "
                "not replaced"
            )

    def summary(
        self,
        provider: str,
        files: int,
        ok: int,
        stage_seconds: Mapping[str, float] | None = None,
        tagged: int | None = None,
        reused: int = 0,
        resumed: int = 0,
        changes: Changes | None = None,
        unlistable: int = 0,
    ) -> RunSummary:
        """The run's summary; the stage times go to the INFO log."""
        elapsed = time.perf_counter() - self.t_start
        summary = RunSummary(
            self.config.out, files, ok, files - ok, elapsed, provider, dict(stage_seconds or {}), tagged, reused,
            resumed, changes, unlistable,
        )  # fmt: skip
        if summary.stage_seconds:
            log.info("stage seconds: %s", ", ".join(f"{k} {v:.2f}" for k, v in summary.stage_seconds.items()))
        return summary


def model_argument(model: str | os.PathLike[str] | None) -> str | None:
    """--model as it travels to other processes: a shipped model's name as is (each worker finds it in its own
    install), a path made absolute."""
    if model is None or is_shipped_name(model):
        return None if model is None else os.fspath(model)
    return os.path.abspath(model)


__all__ = [
    "DEFAULT_MAX_ERRORS",
    "ErrorLimit",
    "ModelFacts",
    "RunConfig",
    "RunPlan",
    "RunSummary",
    "check_out_is_no_input",
    "list_refs",
    "model_argument",
    "run_identity",
]
