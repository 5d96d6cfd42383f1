"""One chunk of files decoded by one thread into one packed uint8 array: in process, in a pool worker, in a Ray task."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence, Union

import numpy as np

from tagger.contract import PreprocessSpec
from tagger.pipeline.budget import DecodeMemory, Lease
from tagger.pipeline.fetch import DEFAULT_IO_THREADS, FetchWindow
from tagger.pipeline.image import DEFAULT_MAX_PIXELS, DecodeResult, Failure, Sample, Source, decode_one

DECODE_CHUNK = 32  # files per decode call at most: one array crosses processes per chunk

# What crosses processes per result: (index, width, height, sha256) for a Sample, (index, error, sha256) for a Failure.
Meta = Union[tuple[int, int, int, Union[str, None]], tuple[int, str, Union[str, None]]]


def decode_chunk(batch_size: int) -> int:
    """Files per decode call for batches of batch_size: chunks of a batch keep IPC to one array per chunk, and
    smaller ones keep every worker busy on small runs."""
    return max(1, min(batch_size, DECODE_CHUNK))


@dataclass(frozen=True, eq=False)
class DecodedBatch:
    """Consecutive decode results. images holds the ok ones, in order, and each Sample.array is a view into it.

    Pickles as one contiguous array plus small per-item metadata, so a worker's batch crosses processes in one copy.
    """

    images: np.ndarray  # uint8 [k, S, S, 3], k = number of Samples
    results: tuple[DecodeResult, ...]
    seconds: float = 0.0  # wall time spent decoding, for stage timing

    def __reduce__(self) -> tuple[Any, ...]:
        meta = [_meta(r) for r in self.results]
        return (unpack, (self.images, meta, self.seconds))


def _meta(r: DecodeResult) -> Meta:
    return (r.index, r.width, r.height, r.sha256) if isinstance(r, Sample) else (r.index, r.error, r.sha256)


def unpack(images: np.ndarray, meta: list[Meta], seconds: float) -> DecodedBatch:
    """The batch of `meta`, its Samples viewing the first rows of `images` (a buffer of at least that many)."""
    results: list[DecodeResult] = []
    k = 0
    for m in meta:
        if len(m) == 4:
            results.append(Sample(m[0], images[k], m[1], m[2], m[3]))
            k += 1
        else:
            results.append(Failure(m[0], m[1], m[2]))
    return DecodedBatch(images[:k], tuple(results), seconds)


def pack(buf: np.ndarray, results: Iterable[DecodeResult]) -> list[Meta]:
    """Copy the Samples' pixels in order into buf [>= their count, S, S, 3]; one Meta per result."""
    meta: list[Meta] = []
    k = 0
    for r in results:
        if isinstance(r, Sample):
            buf[k] = r.array
            k += 1
        meta.append(_meta(r))
    return meta


def decode_many(
    srcs: Sequence[Source],
    spec: PreprocessSpec,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    start: int = 0,
    memory: DecodeMemory | None = None,
    io_threads: int = DEFAULT_IO_THREADS,
) -> DecodedBatch:
    """Decode files into one contiguous uint8 [k, S, S, 3] array of the ok ones; result i has index start + i.

    memory: the budget decoding waits for (None: none, no wait).
    """
    t0 = time.perf_counter()
    s = spec.size
    buf = np.empty((len(srcs), s, s, 3), dtype=np.uint8)
    meta = decode_into(buf, srcs, spec, max_pixels, start, io_threads, memory)
    return unpack(buf, meta, time.perf_counter() - t0)


def decode_into(
    buf: np.ndarray, srcs: Sequence[Source], spec: PreprocessSpec, max_pixels: int, start: int, io_threads: int,
    memory: DecodeMemory | None,
) -> list[Meta]:
    """Decode srcs in this thread under a lease of memory (if any), packing the ok ones in order into
    buf [>= len(srcs), S, S, 3]; one Meta per source."""
    lease = Lease(memory) if memory is not None else None

    def decoded() -> Iterator[DecodeResult]:
        window = FetchWindow(srcs, io_threads, lease)
        try:
            for i, src in enumerate(srcs):
                yield decode_one(src, spec, max_pixels, start + i, window.take(i), lease)
                if lease is not None:
                    lease.release()  # the image is fitted: its full-size pixels (and its file's bytes) are gone
        finally:
            window.close()
            if lease is not None:
                lease.release()

    return pack(buf, decoded())
