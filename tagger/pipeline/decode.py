"""Decode stage: decode_stream, the front over the worker pool or this process; the stage's names for its callers.

The stage's parts, by job: image (bytes -> Sample or Failure), budget (the decode memory, held through leases),
fetch (objects read ahead of their decoding), chunk (a chunk decoded into one packed array) and pool (worker
processes, the shared-memory arena, crash isolation).
"""

from __future__ import annotations

import itertools
from typing import Iterable, Iterator

from tagger.contract import PreprocessSpec
from tagger.pipeline.budget import DEFAULT_DECODE_MEMORY, MAX_DECODE_MEMORY, DecodeMemory
from tagger.pipeline.chunk import DECODE_CHUNK, DecodedBatch, decode_chunk, decode_many
from tagger.pipeline.discover import ImageRef
from tagger.pipeline.fetch import DEFAULT_IO_THREADS
from tagger.pipeline.image import (
    DECODE_ERRORS,
    DEFAULT_MAX_PIXELS,
    DecodeResult,
    Failure,
    Sample,
    decode_one,
    fit_and_pad,
    fitted_size,
    load_image,
)
from tagger.pipeline.pool import Arena, DecoderPool, default_workers

# What the stage's callers import from it (its parts are its own business).
__all__ = [
    "DECODE_ERRORS", "DEFAULT_DECODE_MEMORY", "DEFAULT_IO_THREADS", "DEFAULT_MAX_PIXELS", "MAX_DECODE_MEMORY",
    "DecodeMemory", "DecodeResult", "DecodedBatch", "Failure", "Sample", "decode_chunk", "decode_many", "decode_one",
    "decode_stream", "default_workers", "fit_and_pad", "fitted_size", "load_image",
]  # fmt: skip


def decode_stream(
    refs: Iterable[ImageRef],
    spec: PreprocessSpec,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    workers: int | None = None,
    chunk_size: int = DECODE_CHUNK,
    decode_memory: int = DEFAULT_DECODE_MEMORY,
    io_threads: int = DEFAULT_IO_THREADS,
) -> Iterator[tuple[tuple[ImageRef, ...], DecodedBatch]]:
    """Decode refs in chunks, yielding (refs of the chunk, its DecodedBatch) in input order.

    workers <= 1 decodes in this process; otherwise a pool of worker processes decodes whole chunks into shared
    memory, with at most 2 chunks per worker submitted and not yet consumed, so memory stays bounded however slow
    the consumer is (Pool.imap would buffer every finished result). With a pool, a chunk's pixels are only valid
    until the next chunk is requested: the consumer copies what it keeps.
    decode_memory: bytes all decoders may hold at once (see DecodeMemory). A worker that dies costs no rows (see
    DecoderPool). io_threads: object-store reads in flight per decoder (see fetch.FetchWindow).
    """
    workers = default_workers() if workers is None else workers
    chunks = _chunks(refs, chunk_size)
    if workers <= 1:
        memory = DecodeMemory(decode_memory)
        start = 0
        for chunk in chunks:
            yield chunk, decode_many(chunk, spec, max_pixels, start, memory, io_threads)
            start += len(chunk)
        return
    window = 2 * workers
    pool = DecoderPool(workers, Arena(window, chunk_size, spec.size), spec, max_pixels, decode_memory, io_threads)
    done = False
    try:
        start = 0
        for chunk in chunks:
            pool.submit(chunk, start)
            start += len(chunk)
            if len(pool.pending) >= window:
                yield pool.next_result()
        while pool.pending:
            yield pool.next_result()
        done = True
    finally:
        pool.close(kill=not done)


def _chunks(refs: Iterable[ImageRef], n: int) -> Iterator[tuple[ImageRef, ...]]:
    it = iter(refs)
    while chunk := tuple(itertools.islice(it, n)):
        yield chunk
