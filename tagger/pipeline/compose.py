"""The one composition of the stages: refs -> decoded batches -> tagged rows. Every consumer of tagged rows calls it.

discover's refs go to decode (worker processes), batch regroups them into fixed-size batches prefetched by a
thread, session infers, postprocess picks labels, and rows_to_table builds the output rows. The engines, eval,
calibrate, quantize and the benchmark all get their rows or batches here.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Generator, Iterable, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa

from tagger.contract import EMBEDDING_OUTPUT, PreprocessSpec, TaskSpec
from tagger.errors import UsageError
from tagger.output import schema as s
from tagger.pipeline.batch import Batch, prefetch, rebatch
from tagger.pipeline.decode import (
    DEFAULT_DECODE_MEMORY,
    DEFAULT_IO_THREADS,
    DEFAULT_MAX_PIXELS,
    Sample,
    decode_chunk,
    decode_stream,
    default_workers,
)
from tagger.pipeline.discover import MISSING_SIZE, ImageRef
from tagger.pipeline.postprocess import TaskPrediction, postprocess
from tagger.pipeline.session import CPU_BATCH_SIZE, Session

PREFETCH_BATCHES = 3  # decoded batches waiting for inference: enough to absorb jitter, few enough to bound memory


MAX_BATCH_SIZE = 16384  # images per inference call: at 160 px a batch of them is 1.2 GB of uint8 input
PER_CORE = 4  # --workers and --threads at most this many per core: more only trades speed for memory and switches
MAX_IO_THREADS = 256  # object reads in flight per decode worker: far more than any store's latency needs


def max_per_machine() -> int:
    """The most decode workers or inference threads a run may start on this machine."""
    return PER_CORE * (os.cpu_count() or 1)


def check_stage_options(
    batch_size: int | None, workers: int | None, threads: int | None, io_threads: int | None = None
) -> None:
    """Validate the decode/inference options every command that runs the pipeline takes: a UsageError (one line,
    exit 2) before anything starts, for a value below 1 or past a bound tied to this machine."""
    limit = max_per_machine()
    checks = (
        ("--batch-size", batch_size, 1, MAX_BATCH_SIZE),
        ("--workers", workers, 0, limit),
        ("--threads", threads, 1, limit),
        ("--io-threads", io_threads, 1, MAX_IO_THREADS),
    )
    for option, value, low, high in checks:
        if value is not None and not low <= value <= high:
            where = f" ({PER_CORE} per core on this machine)" if high == limit else ""
            raise UsageError(f"{option} must be from {low} to {high}{where}, got {value}")


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
    decode_memory: int = DEFAULT_DECODE_MEMORY,
    io_threads: int = DEFAULT_IO_THREADS,
) -> Generator[Batch, None, None]:
    """discover's refs -> fixed-size decoded Batches, in order, decoded ahead in a bounded background thread."""
    workers = default_workers() if workers is None else workers
    chunk = decode_chunk(batch_size)
    decoded = decode_stream(refs, spec, max_pixels, workers, chunk, decode_memory=decode_memory, io_threads=io_threads)
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
        table = rows_to_table(batch, preds, session.tasks, top_k, probs.get(EMBEDDING_OUTPUT))
        timer.add("postprocess", time.perf_counter() - t1)
        yield batch, table


def rows_to_table(
    batch: Batch,
    preds: Mapping[str, TaskPrediction],
    tasks: Sequence[TaskSpec],
    top_k: int = 0,
    embedding: np.ndarray | None = None,
) -> pa.Table:
    """One row per ref of the batch, in order; predictions (for the batch's Samples, in order) fill the ok rows.

    embedding: float [k, D] for the batch's Samples, or None for no `embedding` column.
    """
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
    cols["status"] = pa.array([s.STATUS_OK if o else s.STATUS_ERROR for o in ok], pa.string())
    cols["error"] = pa.array([None if isinstance(r, Sample) else r.error for r in batch.results], pa.string())
    cols["width"] = pa.array([r.width if isinstance(r, Sample) else None for r in batch.results], pa.int32())
    cols["height"] = pa.array([r.height if isinstance(r, Sample) else None for r in batch.results], pa.int32())
    cols["bytes"] = pa.array([None if s == MISSING_SIZE else s for s in sizes], pa.int64())
    cols["mtime"] = pa.array([None if math.isnan(m) else m for m in mtimes], pa.float64())
    cols["sha256"] = pa.array([r.sha256 for r in batch.results], pa.string())
    dim = 0
    if embedding is not None:
        dim = embedding.shape[1]
        values = np.zeros((n, dim), np.float16)
        values[rows] = embedding
        cols[s.EMBEDDING_COLUMN] = pa.FixedSizeListArray.from_arrays(
            pa.array(values.ravel()), type=s.embedding_type(dim), mask=pa.array(err)
        )
    return pa.Table.from_pydict(cols, schema=s.output_schema(tasks, top_k, dim))


def _topk_column(p: TaskPrediction, labels: pa.Array, ok: np.ndarray) -> pa.Array:
    assert p.topk_index is not None and p.topk_score is not None
    k = p.topk_index.shape[1]
    values = pa.StructArray.from_arrays(
        [labels.take(pa.array(p.topk_index.ravel())), pa.array(p.topk_score.ravel(), pa.float32())],
        names=["label", "score"],
    )
    # Error rows are null lists: zero-length offsets steps plus a null mask.
    offsets = np.concatenate([[0], np.cumsum(np.where(ok, k, 0))]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), values, type=s.TOPK_TYPE, mask=pa.array(~ok))


__all__ = [
    "MAX_BATCH_SIZE",
    "MAX_IO_THREADS",
    "StageTimer",
    "check_stage_options",
    "decoded_batches",
    "max_per_machine",
    "rows_to_table",
    "tag_batches",
]
