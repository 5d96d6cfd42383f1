"""batch: fixed-size regrouping in order with failures riding along; bounded, closable prefetch thread."""

from __future__ import annotations

import threading
import time
from typing import Iterator

import numpy as np
import pytest

from tagger.pipeline.batch import prefetch, rebatch
from tagger.pipeline.decode import DecodedBatch, DecodeResult, Failure, Sample
from tagger.pipeline.discover import ImageRef


def _chunk(start: int, pattern: str) -> tuple[tuple[ImageRef, ...], DecodedBatch]:
    """A decoded chunk; pattern 'o' = ok, 'x' = failure. Each ok image is filled with its index."""
    refs = tuple(ImageRef(f"{start + i:03d}.jpg", f"/c/{start + i:03d}.jpg", 1, 0.0) for i in range(len(pattern)))
    oks = [start + i for i, c in enumerate(pattern) if c == "o"]
    images = np.stack([np.full((4, 4, 3), i, np.uint8) for i in oks]) if oks else np.empty((0, 4, 4, 3), np.uint8)
    results: list[DecodeResult] = []
    k = 0
    for i, c in enumerate(pattern):
        if c == "o":
            results.append(Sample(start + i, images[k], 4, 4))
            k += 1
        else:
            results.append(Failure(start + i, "OSError: bad"))
    return refs, DecodedBatch(images, tuple(results), 0.5)


def test_rebatch_fixed_size_in_order_with_failures_riding_along() -> None:
    chunks = [_chunk(0, "oxoo"), _chunk(4, "o"), _chunk(5, "xxoooo"), _chunk(11, "ox")]
    batches = list(rebatch(chunks, 3))
    assert [len(b.images) for b in batches] == [3, 3, 3, 0]  # 9 ok images, then a last failure on its own
    refs = [r.path for b in batches for r in b.refs]
    assert refs == [f"{i:03d}.jpg" for i in range(13)]
    for b in batches:
        assert len(b.refs) == len(b.results)
        oks = [r.index for r in b.results if isinstance(r, Sample)]
        assert [int(img[0, 0, 0]) for img in b.images] == oks  # images stay aligned with their rows
    assert [r.path for r in batches[-1].refs] == ["012.jpg"]  # a trailing failure is not dropped
    assert sum(b.decode_seconds for b in batches) == pytest.approx(2.0)


def test_rebatch_emits_a_batch_of_failures_only() -> None:
    batches = list(rebatch([_chunk(0, "xx")], 8))
    assert len(batches) == 1 and batches[0].images.shape == (0, 4, 4, 3) and len(batches[0]) == 2


def test_rebatch_grows_its_buffer_with_what_arrives() -> None:
    # A batch_size far above the stream: the buffer holds what came (doubling from a chunk's worth), not batch_size.
    (only,) = rebatch([_chunk(0, "oxoo"), _chunk(4, "oo")], 10**9)
    assert only.images.base is not None and only.images.base.shape[0] == 8  # 4 -> 8
    assert [int(img[0, 0, 0]) for img in only.images] == [0, 2, 3, 4, 5]
    # Growing mid-batch keeps each Sample a view into its batch's images, and batches exactly batch_size images.
    batches = list(rebatch([_chunk(3 * i, "ooo") for i in range(7)], 10))
    assert [len(b.images) for b in batches] == [10, 10, 1]
    for b in batches:
        samples = [r for r in b.results if isinstance(r, Sample)]
        assert all(np.shares_memory(s.array, b.images) for s in samples)
        assert [int(s.array[0, 0, 0]) for s in samples] == [s.index for s in samples]
    assert batches[1].images.base is None  # the second batch starts at the full size: no copy


def test_prefetch_keeps_order_and_stays_bounded() -> None:
    produced = []

    def source() -> Iterator[int]:
        for i in range(50):
            produced.append(i)
            yield i

    seen = []
    for item in prefetch(source(), depth=2):
        time.sleep(0.002)
        assert len(produced) - len(seen) <= 4  # queue depth + one being put + one in the consumer's hands
        seen.append(item)
    assert seen == list(range(50))


def test_prefetch_reraises_producer_errors() -> None:
    def source() -> Iterator[int]:
        yield 1
        raise ValueError("decode blew up")

    it = prefetch(source(), depth=1)
    assert next(it) == 1
    with pytest.raises(ValueError, match="blew up"):
        next(it)


def test_closing_prefetch_closes_the_producer() -> None:
    closed = threading.Event()

    def source() -> Iterator[int]:
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            closed.set()

    it = prefetch(source(), depth=2)
    assert next(it) == 0
    it.close()
    assert closed.wait(5)
