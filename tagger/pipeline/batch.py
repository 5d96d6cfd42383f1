"""Batch stage: regroup decoded chunks into fixed-size uint8 NHWC batches, in order, prefetched by a bounded thread."""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from typing import Generator, Iterable, Iterator, TypeVar

import numpy as np

from tagger.pipeline.decode import DecodedBatch, DecodeResult, Sample
from tagger.pipeline.discover import ImageRef

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True, eq=False)
class Batch:
    """Consecutive refs with their decode results; `images` stacks the ok ones, in order.

    Holds exactly batch_size images except the last batch of a run; failures ride along with the images around
    them, so a batch may hold more refs than images (and the last may hold none).
    """

    refs: tuple[ImageRef, ...]
    results: tuple[DecodeResult, ...]  # aligned with refs
    images: np.ndarray  # uint8 [k, S, S, 3], k = number of Samples in results
    decode_seconds: float = 0.0  # decode time of the chunks that completed in this batch (worker wall time)

    def __len__(self) -> int:
        return len(self.refs)


def rebatch(decoded: Iterable[tuple[tuple[ImageRef, ...], DecodedBatch]], batch_size: int) -> Iterator[Batch]:
    """Turn (refs, DecodedBatch) chunks of any size into Batches of batch_size images, keeping the order.

    Pixels are copied into the batch as each chunk arrives (decode_stream's chunks are only valid until the
    next one), and each Sample of a Batch is a view into its `images`. The first batch's buffer starts at a chunk's
    worth and doubles up to batch_size as images arrive, so a batch_size far above the catalog costs only what
    arrives; later batches start at the size the previous one reached.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    refs: list[ImageRef] = []
    results: list[DecodeResult] = []
    buf: np.ndarray | None = None  # uint8 [capacity <= batch_size, S, S, 3]
    shape: tuple[int, ...] = (0, 0, 3)  # of one image, (S, S, 3) once a chunk came
    capacity = 0  # of the next batch's first buffer; batch_size after a full batch
    n = 0
    seconds = 0.0
    for chunk_refs, chunk in decoded:
        seconds += chunk.seconds
        shape = chunk.images.shape[1:]
        for ref, result in zip(chunk_refs, chunk.results, strict=True):
            refs.append(ref)
            if isinstance(result, Sample):
                if buf is None:
                    buf = np.empty((capacity or min(batch_size, len(chunk.results)), *shape), np.uint8)
                elif n == len(buf):
                    buf = _grown(buf, min(batch_size, 2 * n), results)
                capacity = len(buf)
                buf[n] = result.array
                result = Sample(result.index, buf[n], result.width, result.height, result.sha256)
                n += 1
            results.append(result)
            if n == batch_size:
                yield Batch(tuple(refs), tuple(results), buf, seconds)  # type: ignore[arg-type]
                refs, results, seconds = [], [], 0.0
                buf, n = None, 0
    if refs:
        images = buf[:n] if buf is not None else np.empty((0, *shape), np.uint8)
        yield Batch(tuple(refs), tuple(results), images, seconds)


def _grown(buf: np.ndarray, size: int, results: list[DecodeResult]) -> np.ndarray:
    """A buffer of `size` images holding buf's; the Samples of `results` (views into buf, in order) re-pointed."""
    new = np.empty((size, *buf.shape[1:]), buf.dtype)
    k = 0
    for i, r in enumerate(results):
        if isinstance(r, Sample):
            new[k] = buf[k]
            results[i] = Sample(r.index, new[k], r.width, r.height, r.sha256)
            k += 1
    return new


_END = object()


class _Raised:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def prefetch(items: Iterable[T], depth: int = 2) -> Generator[T, None, None]:
    """Iterate `items` in a background thread, at most `depth` items ahead of the consumer.

    Decoding (and the pool feeding) then overlaps with inference, and memory stays bounded. An exception in the
    producer is re-raised in the consumer; closing this generator early stops and closes the producer.
    """
    q: queue.Queue[object] = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        it = iter(items)
        try:
            for item in it:
                if not put(item):
                    break
        except BaseException as e:  # handed to the consumer, which re-raises it
            put(_Raised(e))
            return
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()  # a generator owning a process pool shuts it down here, in its own thread
        put(_END)

    thread = threading.Thread(target=produce, name="tagger-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _END:
                return
            if isinstance(item, _Raised):
                raise item.error
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        thread.join(timeout=30)
        if thread.is_alive():
            log.warning("prefetch thread did not stop within 30 s")
