"""`tagger run`: wire discover -> decode -> batch -> session -> postprocess -> write, and time each stage.

Incremental runs, resume and shards decide which files reach decode and where each written row comes from
(tagger.pipeline.incremental, .resume, .shard); the stages themselves do not know about them.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Generator, Iterable, Iterator, Mapping

import pyarrow as pa
from tqdm import tqdm

from tagger import __version__
from tagger.contract import PreprocessSpec
from tagger.errors import TaggerError
from tagger.pipeline import write as w
from tagger.pipeline.batch import Batch, prefetch, rebatch
from tagger.pipeline.decode import DEFAULT_MAX_PIXELS, decode_stream, default_workers
from tagger.pipeline.discover import DEFAULT_EXTENSIONS, ImageRef, discover, refs_from_list
from tagger.pipeline.incremental import Assembler, Changes, load_previous
from tagger.pipeline.output import RunIdentity
from tagger.pipeline.postprocess import postprocess
from tagger.pipeline.resume import DEFAULT_COMMIT_EVERY, DEFAULT_COMMIT_SECONDS, WorkDir
from tagger.pipeline.session import (
    CPU_BATCH_SIZE,
    Session,
    default_batch_size,
    default_inflight,
    default_threads,
    open_session,
)
from tagger.pipeline.shard import Shard

log = logging.getLogger(__name__)

PREFETCH_BATCHES = 3  # decoded batches waiting for inference: enough to absorb jitter, few enough to bound memory
LOG_EVERY_S = 30.0


def check_stage_options(batch_size: int | None, workers: int | None, threads: int | None) -> None:
    """Validate the decode/inference options every command that runs the pipeline takes."""
    if batch_size is not None and batch_size < 1:
        raise TaggerError(f"--batch-size must be at least 1, got {batch_size}")
    if workers is not None and workers < 0:
        raise TaggerError(f"--workers must be >= 0, got {workers}")
    if threads is not None and threads < 1:
        raise TaggerError(f"--threads must be at least 1, got {threads}")


@dataclass(frozen=True)
class RunConfig:
    """Everything `tagger run` needs. None means "pick the default" (documented per field)."""

    catalog: Path
    out: Path
    model: Path | None = None  # None: the shipped default model; a shipped model by name, e.g. "default-int8"
    device: str = "auto"  # auto | cpu | cuda
    batch_size: int | None = None  # images per inference call; None: 64 on CPU, 256 on CUDA
    workers: int | None = None  # decode processes; None: one per core; 0 or 1: decode in this process
    threads: int | None = None  # inference intra-op threads; None: one per core (shared with the workers)
    top_k: int = 0  # > 0 adds a <task>_topk column per task
    extensions: frozenset[str] = DEFAULT_EXTENSIONS
    max_pixels: int = DEFAULT_MAX_PIXELS
    files_from: Path | None = None  # a list of paths to tag instead of walking the catalog
    progress: bool | None = None  # None: a progress bar on a terminal, periodic log lines otherwise
    incremental: bool = False  # reuse the rows of `out` for unchanged files (same path, size, mtime; same model)
    retry_errors: bool = False  # incremental: tag files with an error row again even when unchanged
    keep_stale_model: bool = False  # incremental: reuse rows that another model (with the same labels) wrote
    resume: bool = False  # reuse rows an interrupted run committed to OUT.work/ (incremental implies it)
    commit_every: int = DEFAULT_COMMIT_EVERY  # commit tagged rows to OUT.work/ every N images; 0: not by count
    commit_seconds: float = DEFAULT_COMMIT_SECONDS  # ... or every T seconds; 0: not by time (both 0: never)
    shard: Shard | None = None  # tag only the files of this shard
    inflight: int | None = None  # batches in the session at once; None: 2 on CUDA, 1 on CPU

    def __post_init__(self) -> None:
        check_stage_options(self.batch_size, self.workers, self.threads)
        if self.inflight is not None and self.inflight < 1:
            raise TaggerError(f"inflight must be at least 1, got {self.inflight}")
        if self.top_k < 0:
            raise TaggerError(f"--top-k must be >= 0, got {self.top_k}")
        if self.max_pixels < 1:
            raise TaggerError(f"--max-pixels must be at least 1, got {self.max_pixels}")
        if (self.retry_errors or self.keep_stale_model) and not self.incremental:
            flag = "--retry-errors" if self.retry_errors else "--keep-stale-model"
            raise TaggerError(f"{flag} only applies with --incremental")
        if self.commit_every < 0 or self.commit_seconds < 0:
            raise TaggerError("--commit-every and --commit-seconds must be >= 0")
        if self.shard is not None and self.files_from is not None:
            raise TaggerError("--shard splits a catalog walk; with --files-from, split the list instead")


@dataclass(frozen=True)
class RunSummary:
    out: Path
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
        return f"{text}, {self.images_per_s:.1f} img/s, {self.elapsed_s:.1f} s on {self.provider} -> {self.out}"


@dataclass
class StageTimer:
    """Seconds per stage. decode: summed worker time (workers run in parallel); wait: inference starved of input;
    postprocess: top-k and building the Arrow rows."""

    seconds: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(("decode", "wait", "infer", "postprocess", "write"), 0.0)
    )

    def add(self, stage: str, s: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + s


def decoded_batches(
    refs: Iterable[ImageRef],
    spec: PreprocessSpec,
    batch_size: int = CPU_BATCH_SIZE,
    workers: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Generator[Batch, None, None]:
    """discover's refs -> fixed-size decoded Batches, in order, decoded ahead in a bounded background thread."""
    workers = default_workers() if workers is None else workers
    # Chunks of a batch keep IPC to one array per task; smaller ones keep every worker busy on small runs.
    chunk = max(1, min(batch_size, 32))
    decoded = decode_stream(refs, spec, max_pixels, workers, chunk)
    return prefetch(rebatch(decoded, batch_size), depth=PREFETCH_BATCHES)


def tag_batches(
    batches: Iterable[Batch], session: Session, top_k: int = 0, timer: StageTimer | None = None, inflight: int = 1
) -> Iterator[tuple[Batch, pa.Table]]:
    """Infer and postprocess each batch; yield it with its output rows (one per ref, in order).

    inflight: batches in the session at once (default_inflight gives the provider's best).
    """
    timer = timer or StageTimer()

    def arriving() -> Iterator[Batch]:
        it = iter(batches)
        while True:
            t0 = time.perf_counter()
            batch = next(it, None)
            timer.add("wait", time.perf_counter() - t0)
            if batch is None:
                return
            timer.add("decode", batch.decode_seconds)
            yield batch

    predicted = session.predict_each(arriving(), lambda b: b.images, inflight)
    while True:
        t0, waited = time.perf_counter(), timer.seconds["wait"]
        item = next(predicted, None)
        t1 = time.perf_counter()
        if item is None:
            return
        batch, probs = item
        timer.add("infer", t1 - t0 - (timer.seconds["wait"] - waited))  # minus the time it waited for input
        preds = postprocess(probs, session.tasks, top_k)
        table = w.rows_to_table(batch, preds, session.tasks, top_k)
        timer.add("postprocess", time.perf_counter() - t1)
        yield batch, table


def list_refs(config: RunConfig) -> Iterator[ImageRef]:
    """The catalog's files in discovery order: a walk, or the --files-from list (shared by every engine)."""
    if not config.catalog.exists():
        raise TaggerError(f"catalog {config.catalog} does not exist")
    if config.files_from is not None:
        return refs_from_list(config.catalog, config.files_from)
    return discover(config.catalog, config.extensions)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def run_identity(config: RunConfig, model_sha256: str) -> RunIdentity:
    """What the rows depend on besides each file: model, catalog and row-shaping options."""
    listed = config.files_from is not None
    return RunIdentity(
        model_sha256=model_sha256,
        catalog=str(config.catalog.resolve()),
        top_k=config.top_k,
        max_pixels=config.max_pixels,
        extensions=None if listed else tuple(sorted(config.extensions)),
        files_from=str(Path(config.files_from).resolve()) if config.files_from is not None else None,
        shard=str(config.shard) if config.shard is not None else None,
    )


def run(config: RunConfig) -> RunSummary:
    """Tag every image of config.catalog into config.out (Parquet); one row per file, errors included.

    The previous config.out is replaced only when the new output is complete; whatever fails (model, disk, a
    crash), it stays as it was. Freshly tagged rows are also committed to OUT.work/ as the run goes, so that
    config.resume (or config.incremental) after a crash tags only the rest.
    """
    t_start = time.perf_counter()
    started = _now()
    refs = list_refs(config)
    first = next(refs, None)
    if first is None:
        what = "listed in " + str(config.files_from) if config.files_from else "with extension " + ",".join(
            sorted(config.extensions)
        )
        raise TaggerError(f"no image files {what} in {config.catalog}")
    workers = default_workers() if config.workers is None else config.workers
    threads = config.threads if config.threads is not None else default_threads()
    session = open_session(config.model, config.device, threads)
    batch_size = config.batch_size or default_batch_size(session.provider)
    tasks, top_k = session.tasks, config.top_k
    identity = run_identity(config, session.info.sha256)
    metadata = {
        **session.metadata,
        **identity.metadata(),
        w.META_TOOL_VERSION: __version__,
        w.META_PROVIDER: session.provider,
        w.META_STARTED: started,
    }
    log.info(
        "tagging %s%s with %s on %s: batch %d, %d decode workers, %d threads",
        config.catalog, f" (shard {config.shard})" if config.shard else "", session.path.name, session.provider,
        batch_size, workers, threads,
    )  # fmt: skip
    timer = StageTimer()
    show_bar = config.progress if config.progress is not None else sys.stderr.isatty()
    with contextlib.ExitStack() as stack:
        previous = load_previous(config.out, identity, tasks, config.keep_stale_model) if config.incremental else None
        if previous is not None:
            stack.callback(previous.close)
        work = stack.enter_context(
            WorkDir(
                config.out,
                {**identity.metadata(), w.META_TOOL_VERSION: __version__},
                tasks,
                top_k,
                resume=config.resume or config.incremental,
                commit_every=config.commit_every,
                commit_seconds=config.commit_seconds,
            )
        )
        writer = stack.enter_context(
            w.ResultWriter(config.out, w.output_schema(tasks, top_k), metadata, tmp_dir=work.path)
        )
        parts = (work.rows, work.index) if work.rows is not None and work.index is not None else None
        assembler = Assembler(writer, previous, parts, config.retry_errors, incremental=config.incremental)
        refs_all: Iterator[ImageRef] = itertools.chain([first], refs)
        shard = config.shard
        if shard is not None:
            refs_all = filter(lambda r: shard.holds(r.path), refs_all)
        batches = stack.enter_context(
            contextlib.closing(
                decoded_batches(assembler.plan(refs_all), session.spec, batch_size, workers, config.max_pixels)
            )
        )
        bar = stack.enter_context(tqdm(unit="img", disable=not show_bar, dynamic_ncols=True, file=sys.stderr))
        last_log = time.perf_counter()
        inflight = config.inflight or default_inflight(session.provider)
        for batch, table in tag_batches(batches, session, top_k, timer, inflight):
            t0 = time.perf_counter()
            work.add(table)
            assembler.write_tagged(table)
            timer.add("write", time.perf_counter() - t0)
            bar.update(len(batch))
            if not show_bar and time.perf_counter() - last_log >= LOG_EVERY_S:
                last_log = time.perf_counter()
                log.info(
                    "%d files tagged, %d written (%d errors), %.1f img/s",
                    assembler.tagged, assembler.files, assembler.errors, assembler.tagged / (last_log - t_start),
                )  # fmt: skip
        t0 = time.perf_counter()
        assembler.finish()
        if previous is not None:
            previous.close()  # before its file is replaced
        a, changes = assembler, assembler.changes
        final = {
            w.META_FINISHED: _now(),
            w.META_FILES: str(a.files),
            w.META_OK: str(a.files - a.errors),
            w.META_ERRORS: str(a.errors),
            w.META_TAGGED: str(a.tagged),
            w.META_REUSED: str(a.reused),
            w.META_RESUMED: str(a.resumed),
        }
        if changes is not None:
            final[w.META_CHANGES] = json.dumps(changes.as_dict())
        writer.commit(final)
        work.finish()
        timer.add("write", time.perf_counter() - t0)
    if previous is not None and previous.stale_model:
        log.warning("%d rows of %s come from another model (--keep-stale-model)", a.reused, config.out)
    summary = RunSummary(
        config.out, a.files, a.files - a.errors, a.errors, time.perf_counter() - t_start, session.provider,
        dict(timer.seconds), tagged=a.tagged, reused=a.reused, resumed=a.resumed, changes=changes,
    )  # fmt: skip
    log.info("done: %s", summary.line())
    log.info("stage seconds: %s", ", ".join(f"{k} {v:.2f}" for k, v in summary.stage_seconds.items()))
    return summary


__all__ = [
    "RunConfig",
    "RunSummary",
    "StageTimer",
    "check_stage_options",
    "decoded_batches",
    "list_refs",
    "run",
    "run_identity",
    "tag_batches",
]
