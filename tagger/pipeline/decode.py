"""Decode stage: read image files (in a process pool) and fit them, padded, into the model's square uint8 HWC input."""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import os
import signal
import struct
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence, Union

import numpy as np
from PIL import ExifTags, Image, ImageOps

from tagger.contract import PreprocessSpec
from tagger.errors import TaggerError
from tagger.pipeline.discover import ImageRef

log = logging.getLogger(__name__)

_FILTERS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


def fit_and_pad(img: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """Scale an RGB image to fit inside spec.size x spec.size keeping its aspect ratio, centre it on pad_color.

    Returns uint8 [size, size, 3]. Training's evaluation transform and the runtime both call this, so the model
    sees identical pixels in validation and in production.
    """
    if img.mode != "RGB":
        img = img.convert("RGB")
    s = spec.size
    w, h = img.size
    scale = s / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), _FILTERS[spec.interpolation])
    canvas = Image.new("RGB", (s, s), spec.pad_color)
    canvas.paste(img, ((s - nw) // 2, (s - nh) // 2))
    return np.asarray(canvas, dtype=np.uint8)


DEFAULT_MAX_PIXELS = 150_000_000  # above any camera photo (a 100 MP sensor is 102M); far below a decompression bomb

# What a bad file raises from Pillow's readers: unreadable/truncated (OSError incl. UnidentifiedImageError),
# malformed headers (SyntaxError, ValueError, struct.error), short frames (EOFError), our own pixel limit.
DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    struct.error,
    Image.DecompressionBombError,
    MemoryError,
)

# EXIF orientations 5..8 swap width and height.
_SWAPPED_ORIENTATIONS = frozenset({5, 6, 7, 8})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_WIDE_INT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


@dataclass(frozen=True, eq=False)
class Sample:
    """A decoded image. width/height: the full-resolution size as displayed (after EXIF rotation)."""

    index: int
    array: np.ndarray  # uint8 [S, S, 3]
    width: int
    height: int


@dataclass(frozen=True)
class Failure:
    """An image that could not be decoded; error is 'ExceptionClass: message'."""

    index: int
    error: str


DecodeResult = Union[Sample, Failure]
Source = Union[ImageRef, str, "os.PathLike[str]"]


def _describe(e: BaseException, path: str | os.PathLike[str]) -> str:
    """'ExceptionClass: message' on one line, without the file's absolute path (the row holds it, relative)."""
    msg = e.strerror if isinstance(e, OSError) and e.strerror and e.filename else str(e)
    p = os.fspath(path)
    msg = " ".join(str(msg).replace(f" {p!r}", "").replace(p, "").split())[:500]
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def _fitted_size(w: int, h: int, size: int) -> tuple[int, int]:
    scale = size / max(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def _to_rgb(img: Image.Image, pad_color: tuple[int, int, int]) -> Image.Image:
    """Mode policy: alpha/transparency composited onto pad_color, 16/32-bit integer scaled (not clipped) to 8 bit."""
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode in _WIDE_INT_MODES:
        a = np.asarray(img).astype(np.float32)  # [H, W]
        a = np.clip(a, 0, 65535) * (255.0 / 65535.0) + 0.5
        return Image.fromarray(a.astype(np.uint8), "L").convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        out = Image.new("RGB", img.size, pad_color)
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return img.convert("RGB")  # CMYK, L, P, 1, YCbCr, ...


def load_image(path: str | os.PathLike[str], spec: PreprocessSpec, max_pixels: int) -> tuple[Image.Image, int, int]:
    """Open, check the pixel count, decode (JPEG at a reduced DCT scale), EXIF-rotate and convert to RGB.

    Returns (RGB image at least fitted-size on its long side, original width, original height as displayed).
    Raises what Pillow raises for a bad file, or DecompressionBombError above max_pixels.
    """
    # Our own header check below replaces Pillow's, which would warn under our limit or refuse above its own.
    Image.MAX_IMAGE_PIXELS = None
    with Image.open(path) as img:
        w, h = img.size
        if w * h > max_pixels:
            raise Image.DecompressionBombError(f"{w}x{h} = {w * h} pixels exceeds the limit of {max_pixels}")
        orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
        # JPEG only: decode at 1/2, 1/4 or 1/8 scale, the smallest still at least the fitted size.
        img.draft("RGB", _fitted_size(w, h, spec.size))
        img.load()
        out = ImageOps.exif_transpose(img) if orientation in range(2, 9) else img
        out = _to_rgb(out, spec.pad_color)  # loaded pixels stay usable after the file closes
    if orientation in _SWAPPED_ORIENTATIONS:
        w, h = h, w
    return out, w, h


def decode_one(
    src: Source, spec: PreprocessSpec, max_pixels: int = DEFAULT_MAX_PIXELS, index: int = 0
) -> DecodeResult:
    """Decode one file into the model's input (uint8 [S, S, 3]); a bad file becomes a Failure, never an exception."""
    path = src.abspath if isinstance(src, ImageRef) else src
    try:
        img, w, h = load_image(path, spec, max_pixels)
        return Sample(index, fit_and_pad(img, spec), w, h)
    except DECODE_ERRORS as e:
        return Failure(index, _describe(e, path))
    except Exception as e:  # noqa: BLE001
        # Last resort, recorded in the row: decoder plugins raise arbitrary types on malformed files (fuzzers find
        # IndexError, TypeError, ...), and one such photo must not end a run over millions.
        log.debug("unexpected decode error for %s", path, exc_info=True)
        return Failure(index, _describe(e, path))


def _rebuild_batch(images: np.ndarray, meta: list[tuple[int, int, int] | tuple[int, str]], seconds: float) -> DecodedBatch:
    results: list[DecodeResult] = []
    k = 0
    for m in meta:
        if len(m) == 3:
            results.append(Sample(m[0], images[k], m[1], m[2]))  # type: ignore[arg-type]
            k += 1
        else:
            results.append(Failure(m[0], m[1]))  # type: ignore[arg-type]
    return DecodedBatch(images, tuple(results), seconds)


@dataclass(frozen=True, eq=False)
class DecodedBatch:
    """Consecutive decode results. images holds the ok ones, in order, and each Sample.array is a view into it.

    Pickles as one contiguous array plus small per-item metadata, so a worker's batch crosses processes in one copy.
    """

    images: np.ndarray  # uint8 [k, S, S, 3], k = number of Samples
    results: tuple[DecodeResult, ...]
    seconds: float = 0.0  # wall time spent decoding, for stage timing

    def __reduce__(self) -> tuple[Any, ...]:
        meta = [(r.index, r.width, r.height) if isinstance(r, Sample) else (r.index, r.error) for r in self.results]
        return (_rebuild_batch, (self.images, meta, self.seconds))


def decode_many(
    srcs: Sequence[Source], spec: PreprocessSpec, max_pixels: int = DEFAULT_MAX_PIXELS, start: int = 0
) -> DecodedBatch:
    """Decode files into one contiguous uint8 [k, S, S, 3] array of the ok ones; result i has index start + i."""
    t0 = time.perf_counter()
    s = spec.size
    buf = np.empty((len(srcs), s, s, 3), dtype=np.uint8)
    meta: list[tuple[int, int, int] | tuple[int, str]] = []
    k = 0
    for i, src in enumerate(srcs):
        r = decode_one(src, spec, max_pixels, start + i)
        if isinstance(r, Sample):
            buf[k] = r.array
            meta.append((r.index, r.width, r.height))
            k += 1
        else:
            meta.append((r.index, r.error))
    return _rebuild_batch(buf[:k], meta, time.perf_counter() - t0)


def _worker_init() -> None:
    # Ctrl-C reaches the whole process group; only the parent should react (it terminates the pool).
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def default_workers() -> int:
    return os.cpu_count() or 1


def decode_stream(
    refs: Iterable[ImageRef],
    spec: PreprocessSpec,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    workers: int | None = None,
    chunk_size: int = 32,
    max_pending: int | None = None,
) -> Iterator[tuple[tuple[ImageRef, ...], DecodedBatch]]:
    """Decode refs in chunks, yielding (refs of the chunk, its DecodedBatch) in input order.

    workers <= 1 decodes in this process; otherwise a pool of worker processes decodes whole chunks (one array back
    per chunk), with at most `max_pending` chunks (default 2 per worker) submitted and not yet consumed, so memory
    stays bounded however slow the consumer is (Pool.imap would buffer every finished result).
    """
    workers = default_workers() if workers is None else workers
    chunks = _chunks(refs, chunk_size)
    if workers <= 1:
        start = 0
        for chunk in chunks:
            yield chunk, decode_many(chunk, spec, max_pixels, start)
            start += len(chunk)
        return
    window = max_pending or 2 * workers
    # spawn: safe next to the inference threads of this process, and the same on every OS. An executor rather than
    # multiprocessing.Pool: a worker killed mid-task (OOM killer, decoder crash) raises BrokenProcessPool instead of
    # leaving the run waiting forever.
    ctx = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init)
    try:
        pending: deque[tuple[tuple[ImageRef, ...], Future[DecodedBatch]]] = deque()
        start = 0
        for chunk in chunks:
            paths = [r.abspath for r in chunk]
            pending.append((chunk, pool.submit(decode_many, paths, spec, max_pixels, start)))
            start += len(chunk)
            if len(pending) >= window:
                yield _result(*pending.popleft())
        while pending:
            yield _result(*pending.popleft())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _result(
    chunk: tuple[ImageRef, ...], future: Future[DecodedBatch]
) -> tuple[tuple[ImageRef, ...], DecodedBatch]:
    try:
        return chunk, future.result()
    except BrokenProcessPool:
        raise TaggerError(
            f"a decode worker died (out of memory, or a decoder crash) near {chunk[0].path}; "
            "rerun with --workers 0 to find the file"
        ) from None


def _chunks(refs: Iterable[ImageRef], n: int) -> Iterator[tuple[ImageRef, ...]]:
    it = iter(refs)
    while chunk := tuple(itertools.islice(it, n)):
        yield chunk
