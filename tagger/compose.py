"""The one composition of the stages, above them: refs -> decoded batches -> tagged rows. Every consumer calls it.

discover's refs go to decode (worker processes), batch regroups them into fixed-size batches prefetched by a
thread, session infers, postprocess picks labels, and output.rows builds the output rows. The engines, eval,
calibrate, quantize, heads-only training and the benchmark all get their rows or batches here.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Generator, Iterable, Iterator

import pyarrow as pa

from tagger.contract import EMBEDDING_OUTPUT, PreprocessSpec
from tagger.errors import UsageError
from tagger.output.rows import rows_to_table
from tagger.pipeline.batch import Batch, prefetch, rebatch
from tagger.pipeline.decode import (
    DEFAULT_DECODE_MEMORY,
    DEFAULT_IO_THREADS,
    DEFAULT_MAX_PIXELS,
    decode_chunk,
    decode_stream,
    default_workers,
)
from tagger.pipeline.discover import ImageRef
from tagger.pipeline.postprocess import postprocess
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


__all__ = [
    "MAX_BATCH_SIZE",
    "MAX_IO_THREADS",
    "StageTimer",
    "check_stage_options",
    "decoded_batches",
    "max_per_machine",
    "tag_batches",
]
