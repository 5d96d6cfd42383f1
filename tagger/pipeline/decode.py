"""Decode stage: read image files (in a process pool) and fit them, padded, into the model's square uint8 HWC input."""

from __future__ import annotations

import contextlib
import io
import itertools
import logging
import mmap
import multiprocessing
import os
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import warnings
import weakref
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence, Union

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from tagger.contract import PreprocessSpec
from tagger.errors import TaggerError, one_line
from tagger.pipeline.discover import ImageRef
from tagger.storage import StoreUnavailable, has_latency, read_file, redact, sha256_hex

log = logging.getLogger(__name__)

_FILTERS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


def fitted_size(w: int, h: int, size: int) -> tuple[int, int]:
    """(width, height) of a w x h image scaled to fit inside size x size, keeping its aspect ratio."""
    scale = size / max(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def fit_and_pad(img: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """Scale an RGB image to fit inside spec.size x spec.size keeping its aspect ratio, centre it on pad_color.

    Returns uint8 [size, size, 3]. Training's evaluation transform and the runtime both call this, so the model
    sees identical pixels in validation and in production.
    """
    if img.mode != "RGB":
        img = img.convert("RGB")
    s = spec.size
    w, h = img.size
    nw, nh = fitted_size(w, h, s)
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), _FILTERS[spec.interpolation])
    canvas = Image.new("RGB", (s, s), spec.pad_color)
    canvas.paste(img, ((s - nw) // 2, (s - nh) // 2))
    return np.asarray(canvas, dtype=np.uint8)


DECODE_CHUNK = 32  # files per decode call at most: one array crosses processes per chunk

DEFAULT_MAX_PIXELS = 150_000_000  # above any camera photo (a 100 MP sensor is 102M); far below a decompression bomb

DEFAULT_DECODE_MEMORY = 4 * 1024**3  # bytes of decoding all decoders of a run may hold at once (--decode-memory)
MAX_DECODE_MEMORY = 2**60  # 1 EiB: far above any machine, and the budget's shared counter is a signed 64-bit int

DEFAULT_IO_THREADS = 16  # object-store reads in flight per decoder (--io-threads): ~16 GETs of 30 ms hide the latency

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
    sha256: str | None = None  # hex SHA-256 of the file's bytes


@dataclass(frozen=True)
class Failure:
    """An image that could not be decoded; error is 'ExceptionClass: message'."""

    index: int
    error: str
    sha256: str | None = None  # hex SHA-256 of the file's bytes; None when they could not be read


DecodeResult = Union[Sample, Failure]
Source = Union[ImageRef, str, "os.PathLike[str]"]
# What crosses processes per result: (index, width, height, sha256) for a Sample, (index, error, sha256) for a Failure.
_Meta = Union[tuple[int, int, int, Union[str, None]], tuple[int, str, Union[str, None]]]


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


@contextlib.contextmanager
def _pillow_limit() -> Iterator[None]:
    """Pillow's own bomb guard lifted while load_image reads a file, its setting restored after.

    Pillow warns above Image.MAX_IMAGE_PIXELS and refuses twice that, before load_image can check the header
    against --max-pixels: its default (89M) would refuse photos that --max-pixels allows, with its own message.
    """
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = sys.maxsize  # load_image's header check is the guard meanwhile
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


class DecodeMemoryError(MemoryError):
    """An image whose decoding alone needs more than the whole --decode-memory budget."""


class DecoderCrashed(Exception):
    """A file whose decoding killed the process decoding it (a decoder crash, or the OOM killer), twice."""


def decode_bytes(img: Image.Image, w: int, h: int, transposed: bool) -> int:
    """Peak bytes load_image needs for img, opened and drafted (JPEG: img.size is the reduced DCT size), of w x h.

    Pillow holds 1, L and P in 1 byte per pixel, I;16 in 2, every other mode (RGB included) in 4. On top: the RGB
    copy (4 bytes per pixel), a transposed copy, RGBA and its alpha for transparent images, three float32 arrays
    for 16/32-bit integers, and a progressive JPEG's coefficients (2 bytes per sample of the full-size image).
    """
    mode, px = img.mode, img.size[0] * img.size[1]
    raw = px * (1 if mode in ("1", "L", "P") else 2 if mode.startswith("I;16") else 4)
    need = raw + 4 * px + (raw if transposed else 0)
    if mode in _WIDE_INT_MODES:
        need += 13 * px
    elif mode in _ALPHA_MODES or "transparency" in img.info:
        need += 5 * px
    if img.format == "JPEG" and (img.info.get("progressive") or img.info.get("progression")):
        need += 2 * w * h * len(img.getbands())
    return need


def _size(nbytes: int, up: bool) -> str:
    """nbytes in its largest unit (bytes, KiB, MiB, GiB, TiB) with one decimal at most, rounded up or down: an
    estimate rounded up next to a budget rounded down always reads as more, as it is."""
    unit, scale = next((u, s) for u, s in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10),
                                          ("bytes", 1)) if nbytes >= s or s == 1)  # fmt: skip
    tenths = -(-nbytes * 10 // scale) if up else nbytes * 10 // scale
    if nbytes == 1:
        return "1 byte"
    return f"{tenths // 10} {unit}" if tenths % 10 == 0 else f"{tenths / 10:.1f} {unit}"


class DecodeMemory:
    """The bytes of decoding that every decoder of a run (pool workers included) may hold at once.

    An image waits until its estimate (decode_bytes) fits beside the others'; one larger than the whole budget is
    refused. Crosses into spawned workers through the pool's initializer. A worker killed while holding a share
    leaks it: a pool that lost a worker is replaced with a fresh budget.
    """

    def __init__(self, limit: int) -> None:
        if not 1 <= limit <= MAX_DECODE_MEMORY:
            raise ValueError(f"decode memory must be 1 .. {MAX_DECODE_MEMORY} bytes, got {limit}")
        ctx = multiprocessing.get_context("spawn")
        self.limit = limit
        self._cond = ctx.Condition()
        self._free = ctx.RawValue("q", limit)

    def acquire(self, nbytes: int, what: str) -> None:
        if nbytes > self.limit:
            raise DecodeMemoryError(
                f"{what} needs ~{_size(nbytes, up=True)} to decode, more than --decode-memory "
                f"{_size(self.limit, up=False)}"
            )
        with self._cond:
            self._cond.wait_for(lambda: self._free.value >= nbytes)
            self._free.value -= nbytes

    def release(self, nbytes: int) -> None:
        with self._cond:
            self._free.value += nbytes
            self._cond.notify_all()

    def acquire_ahead(self, nbytes: int, stopped: threading.Event) -> bool:
        """Hold nbytes for a file read ahead of its decoding, leaving half the budget free for the decodes: files
        read ahead never hold more than half, so a decode (one of at most half the budget) always gets room. False
        (nothing held) when nbytes alone is more than that, or when `stopped` is set while waiting."""
        reserve = self.limit // 2
        if nbytes > self.limit - reserve:
            return False
        with self._cond:
            while not self._cond.wait_for(lambda: self._free.value - nbytes >= reserve, timeout=0.2):
                if stopped.is_set():
                    return False
            self._free.value -= nbytes
        return True


# This thread's DecodeMemory (.budget; a pool worker's for its life, in-process decoding's for one call) and the
# (budget, bytes) its current image holds (.held).
_decoding = threading.local()


@contextlib.contextmanager
def _decode_memory(budget: DecodeMemory | None) -> Iterator[None]:
    """Decode under budget in this thread (None: under whatever this thread already has)."""
    saved = getattr(_decoding, "budget", None)
    if budget is not None:
        _decoding.budget = budget
    try:
        yield
    finally:
        _release_decode_memory()
        _decoding.budget = saved


def _reserve_decode_memory(img: Image.Image, w: int, h: int, transposed: bool) -> None:
    """Wait for room for img's decoding in this thread's budget (none: no wait); held until the image is fitted.

    The file's bytes, when read ahead, were held since; they are released and taken again with the decoding, so
    the thread holds nothing while it waits.
    """
    budget: DecodeMemory | None = getattr(_decoding, "budget", None)
    if budget is None:
        return
    held = getattr(_decoding, "held", None)
    carried = held[1] if held is not None else 0
    _release_decode_memory()
    need = decode_bytes(img, w, h, transposed) + carried
    budget.acquire(need, f"{w}x{h}")
    _decoding.held = (budget, need)


def _release_decode_memory() -> None:
    held = getattr(_decoding, "held", None)
    if held is not None:
        _decoding.held = None
        held[0].release(held[1])


def _open(data: bytes) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        # Pillow's message names the in-memory buffer by its address; the row names the file.
        raise UnidentifiedImageError("cannot identify image file") from None


def load_image(
    src: bytes | str | os.PathLike[str], spec: PreprocessSpec, max_pixels: int
) -> tuple[Image.Image, int, int]:
    """Open (a file's bytes, or a path read through storage), check the pixel count, decode (JPEG at a reduced DCT
    scale), EXIF-rotate and convert to RGB.

    Returns (RGB image at least fitted-size on its long side, original width, original height as displayed).
    Raises what Pillow raises for a bad file, or DecompressionBombError above max_pixels.
    """
    data = src if isinstance(src, bytes) else read_file(src)
    with _pillow_limit(), _open(data) as img:
        w, h = img.size
        if w * h > max_pixels:
            raise Image.DecompressionBombError(f"{w}x{h} = {w * h} pixels exceeds the limit of {max_pixels}")
        orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
        # JPEG only: decode at 1/2, 1/4 or 1/8 scale, the smallest still at least the fitted size.
        img.draft("RGB", fitted_size(w, h, spec.size))
        _reserve_decode_memory(img, w, h, orientation in range(2, 9))
        img.load()
        out = ImageOps.exif_transpose(img) if orientation in range(2, 9) else img
        out = _to_rgb(out, spec.pad_color)  # loaded pixels stay usable after the file closes
    if orientation in _SWAPPED_ORIENTATIONS:
        w, h = h, w
    return out, w, h


def decode_one(
    src: Source,
    spec: PreprocessSpec,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    index: int = 0,
    fetched: Future[bytes] | None = None,
) -> DecodeResult:
    """Decode one file into the model's input (uint8 [S, S, 3]); a bad file becomes a Failure, never an exception.

    The bytes are read once, through storage, and hashed before decoding: a file that fails to decode keeps its sha256.
    A ref of a folder that could not be listed becomes its Failure without opening anything. fetched: the bytes,
    read ahead (see _ReadAhead); its read error is the row's error.
    """
    if isinstance(src, ImageRef) and src.unlistable is not None:
        return Failure(index, src.unlistable)
    path = src.abspath if isinstance(src, ImageRef) else src
    digest = None
    try:
        data = fetched.result() if fetched is not None else read_file(path)
        digest = sha256_hex(data)
        img, w, h = load_image(data, spec, max_pixels)
        return Sample(index, fit_and_pad(img, spec), w, h, digest)
    except DECODE_ERRORS as e:
        return Failure(index, _error_text(e, path), digest)
    except StoreUnavailable:  # the store, not this file: the run stops
        raise
    except Exception as e:  # noqa: BLE001
        # Last resort, recorded in the row: decoder plugins raise arbitrary types on malformed files (fuzzers find
        # IndexError, TypeError, ...), and one such photo must not end a run over millions.
        log.debug("unexpected decode error for %s", redact(path), exc_info=True)
        return Failure(index, _error_text(e, path), digest)


def _error_text(e: BaseException, path: str | os.PathLike[str]) -> str:
    """A row's error: one line without the file's name (the row has it), a URI's query or credentials neither."""
    text = one_line(e, path, named=True)
    shown = redact(path)
    return text if shown == os.fspath(path) else text.replace(shown, "")


class _ReadAhead:
    """Reads a chunk's objects (files with latency: storage.has_latency) in io_threads threads while the decoding
    thread decodes the ones before, so decoding never waits on the network when enough reads are in flight.

    Each object's size is held in the decode budget before its read (in order: DecodeMemory.acquire_ahead, so read-
    ahead bytes never take more than half of it) and released once its decoding is done or failed. An object larger
    than that half is not read ahead: the decoding thread reads it itself under a blocking acquire of its size, and
    the reads after it wait for that (taking their turn earlier could leave it no room). Local files are not read
    ahead: they are read in the decoding thread, as before.
    """

    def __init__(self, srcs: Sequence[Source], io_threads: int) -> None:
        self.budget: DecodeMemory | None = getattr(_decoding, "budget", None)
        self.futures: dict[int, Future[bytes]] = {}
        self.held: dict[int, int] = {}  # index in srcs -> bytes it holds in the budget
        self.refused: dict[int, ImageRef] = {}  # too large to read ahead: take() reads them in the decoding thread
        self._stopped = threading.Event()
        self._turn = 0  # position in `order` whose budget is taken next: in order, so a chunk never deadlocks
        self._cond = threading.Condition()
        self._lock = threading.Lock()
        order = [
            i for i, src in enumerate(srcs)
            if isinstance(src, ImageRef) and src.unlistable is None and has_latency(src.abspath)
        ]  # fmt: skip
        self._pool = ThreadPoolExecutor(min(io_threads, len(order))) if order else None
        for k, i in enumerate(order):
            ref = srcs[i]
            assert isinstance(ref, ImageRef)
            self.futures[i] = self._pool.submit(self._read, k, i, ref)  # type: ignore[union-attr]

    def _read(self, k: int, i: int, ref: ImageRef) -> bytes:
        with self._cond:
            self._cond.wait_for(lambda: self._turn == k or self._stopped.is_set())
        keeps_turn = False
        try:
            if self.budget is not None and ref.size > 0:
                if self.budget.acquire_ahead(ref.size, self._stopped):
                    with self._lock:
                        self.held[i] = ref.size
                elif not self._stopped.is_set():
                    with self._lock:
                        self.refused[i] = ref
                    keeps_turn = True  # until take() holds its size
                    return b""
        finally:
            if not keeps_turn:
                self._pass_turn()
        if self._stopped.is_set():
            raise OSError("decoding stopped")
        return read_file(ref.abspath)

    def _pass_turn(self) -> None:
        with self._cond:
            self._turn += 1
            self._cond.notify_all()

    def _read_here(self, ref: ImageRef) -> Future[bytes]:
        """Read a refused object in the decoding thread, its size held (blocking) as a read ahead's would be."""
        assert self.budget is not None
        done: Future[bytes] = Future()
        _release_decode_memory()  # nothing held while waiting
        try:
            try:
                self.budget.acquire(ref.size, f"a {_size(ref.size, up=True)} object")
                _decoding.held = (self.budget, ref.size)
            finally:
                self._pass_turn()
            done.set_result(read_file(ref.abspath))
        except Exception as e:  # noqa: BLE001 - the row's error, as a read ahead's
            done.set_exception(e)
        return done

    def take(self, i: int) -> Future[bytes] | None:
        """Source i's read (None: decode reads it itself); its held bytes pass to this thread's decode holding."""
        future = self.futures.get(i)
        if future is None:
            return None
        future.exception()  # wait for it, so its budget is taken and known
        with self._lock:
            nbytes = self.held.pop(i, 0)
            refused = self.refused.pop(i, None)
        if refused is not None:
            return self._read_here(refused)
        if nbytes and self.budget is not None:
            _release_decode_memory()
            _decoding.held = (self.budget, nbytes)
        return future

    def close(self) -> None:
        """Stop reading ahead; give back what reads not decoded still hold."""
        self._stopped.set()
        with self._cond:
            self._cond.notify_all()  # reads waiting for a refused object's turn
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            held, self.held = self.held, {}
        if self.budget is not None:
            for nbytes in held.values():
                self.budget.release(nbytes)


def _rebuild_batch(images: np.ndarray, meta: list[_Meta], seconds: float) -> DecodedBatch:
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
        return (_rebuild_batch, (self.images, meta, self.seconds))


def _meta(r: DecodeResult) -> _Meta:
    return (r.index, r.width, r.height, r.sha256) if isinstance(r, Sample) else (r.index, r.error, r.sha256)


def decode_many(
    srcs: Sequence[Source],
    spec: PreprocessSpec,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    start: int = 0,
    memory: DecodeMemory | None = None,
    io_threads: int = DEFAULT_IO_THREADS,
) -> DecodedBatch:
    """Decode files into one contiguous uint8 [k, S, S, 3] array of the ok ones; result i has index start + i.

    memory: the budget decoding waits for (None: the one this thread decodes under, if any).
    """
    t0 = time.perf_counter()
    s = spec.size
    buf = np.empty((len(srcs), s, s, 3), dtype=np.uint8)
    with _decode_memory(memory):
        meta = _decode_to(buf, srcs, spec, max_pixels, start, io_threads)
    return _rebuild_batch(buf, meta, time.perf_counter() - t0)


def _decode_to(
    buf: np.ndarray, srcs: Sequence[Source], spec: PreprocessSpec, max_pixels: int, start: int, io_threads: int
) -> list[_Meta]:
    """Decode srcs, packing the ok ones in order into buf [>= len(srcs), S, S, 3]; one _Meta per source."""

    def decoded() -> Iterator[DecodeResult]:
        ahead = _ReadAhead(srcs, io_threads)
        try:
            for i, src in enumerate(srcs):
                yield decode_one(src, spec, max_pixels, start + i, ahead.take(i))
                _release_decode_memory()  # the image is fitted: its full-size pixels (and its file's bytes) are gone
        finally:
            ahead.close()

    return _pack(buf, decoded())


def _pack(buf: np.ndarray, results: Iterable[DecodeResult]) -> list[_Meta]:
    """Copy the Samples' pixels in order into buf [>= their count, S, S, 3]; one _Meta per result."""
    meta: list[_Meta] = []
    k = 0
    for r in results:
        if isinstance(r, Sample):
            buf[k] = r.array
            k += 1
        meta.append(_meta(r))
    return meta


def _worker_init(memory: DecodeMemory, begun: Any = None) -> None:
    """Set up a decode process: its budget, its pool's start-up flag (see _Decoders), an exit with its parent."""
    # Ctrl-C reaches the whole process group; only the parent should react (it terminates the pool).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _decoding.budget = memory
    _decoding.begun = begun
    threading.Thread(target=_exit_with_parent, name="tagger-parent-watch", daemon=True).start()


def _exit_with_parent() -> None:
    """Exit as soon as the parent process is gone, however it ended (SIGKILL included): a killed run leaves no
    workers behind, and with them gone multiprocessing's resource tracker (whose pipe they hold) exits too.
    A spawned child's parent sentinel is a pipe whose other end only the parent holds: it reads EOF then."""
    parent = multiprocessing.parent_process()
    if parent is not None:
        parent.join()
        os._exit(1)


class _Started:
    """What _startup_error's probe is handed once spawn's start-up is done: it runs nothing and exits 0."""

    def _bootstrap(self, parent_sentinel: int | None = None) -> int:
        return 0


def _startup_error() -> str:
    """Why a spawned decode process dies before it runs anything, in its own words: the last line of the stderr of a
    probe started exactly as spawn starts a worker (same interpreter, flags, path and main module, which spawn
    imports again, as with `python - < script.py`); '' when the probe starts fine."""
    if os.name != "posix":
        return ""
    from multiprocessing import reduction, spawn

    r, w = os.pipe()
    try:
        proc = subprocess.Popen(
            spawn.get_command_line(pipe_handle=r), pass_fds=(r,), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
    finally:
        os.close(r)
    data = spawn.get_preparation_data("tagger-probe")
    data["authkey"] = bytes(data["authkey"])  # pickled only while spawning otherwise; the child wraps it again
    with open(w, "wb") as f, contextlib.suppress(BrokenPipeError):
        reduction.dump(data, f)
        reduction.dump(_Started(), f)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return ""
    lines = [line.strip() for line in err.decode("utf-8", "replace").splitlines() if line.strip()]
    return lines[-1] if proc.returncode and lines else ""


def cannot_start(what: str) -> TaggerError:
    """The error of a decode pool whose processes die before decoding anything: a failure of the system, not of
    any file. Names the processes' own error when a probe reproduces it."""
    why = _startup_error()
    return TaggerError(
        f"decode workers cannot start: {what} before decoding anything"
        + (f" ({' '.join(why.split())[:300]})" if why else "")
        + "; --workers 0 decodes in this process"
    )


def default_workers() -> int:
    return os.cpu_count() or 1


def decode_chunk(batch_size: int) -> int:
    """Files per decode call for batches of batch_size: chunks of a batch keep IPC to one array per chunk, and
    smaller ones keep every worker busy on small runs."""
    return max(1, min(batch_size, DECODE_CHUNK))


class _Arena:
    """A file-backed shared-memory block of `slots` chunk-sized pixel buffers that pool workers decode into.

    Pickling a chunk's pixels back through the pool's pipe cost the parent 65-80 us of CPU per thumbnail (64 KiB
    pipe reads and their context switches) against 30-45 us through the arena, where only a few bytes of metadata
    cross the pipe; on 2 cores that doubled the decode rate of 60x80 JPEGs. Lives in /dev/shm (RAM) where there is one.
    """

    def __init__(self, slots: int, chunk_size: int, size: int) -> None:
        self.shape = (chunk_size, size, size, 3)
        self._count = chunk_size * size * size * 3
        # Slot offsets must be multiples of the mmap granularity for the workers' partial maps.
        self.slot_bytes = -(-self._count // mmap.ALLOCATIONGRANULARITY) * mmap.ALLOCATIONGRANULARITY
        self.path, self._map = _shared_file(slots * self.slot_bytes)
        self.free = deque(range(slots))

    def view(self, slot: int) -> np.ndarray:
        """uint8 [chunk_size, S, S, 3] over one slot."""
        return np.frombuffer(self._map, np.uint8, self._count, slot * self.slot_bytes).reshape(self.shape)

    def close(self) -> None:
        try:
            self._map.close()
        except BufferError:
            log.debug("decode arena still has views; left to the garbage collector")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def _shared_file(nbytes: int) -> tuple[str, mmap.mmap]:
    """A file of nbytes mapped into memory: in /dev/shm when it has room, else in the temp folder (page cache)."""
    dirs = [d for d in ("/dev/shm",) if os.path.isdir(d) and os.access(d, os.W_OK)] + [tempfile.gettempdir()]
    for d in dirs:
        fd, path = tempfile.mkstemp(prefix="tagger-decode-", dir=d)
        try:
            # Reserve the space now: a full tmpfs would otherwise kill a worker with SIGBUS at its first write.
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(fd, 0, nbytes)
            else:
                os.ftruncate(fd, nbytes)
            return path, mmap.mmap(fd, nbytes)
        except OSError as e:
            os.unlink(path)
            log.debug("no room for %d bytes of decode buffers in %s: %s", nbytes, d, e)
        finally:
            os.close(fd)
    raise TaggerError(f"no room for {nbytes >> 20} MiB of decode buffers in {' or '.join(dirs)}")


def _decode_into(
    arena: str, offset: int, shape: tuple[int, int, int, int], srcs: Sequence[Source], spec: PreprocessSpec,
    max_pixels: int, start: int, io_threads: int = DEFAULT_IO_THREADS,
) -> tuple[list[_Meta], float]:
    """Worker side of decode_stream: decode srcs straight into one arena slot; return only the metadata."""
    t0 = time.perf_counter()
    begun = getattr(_decoding, "begun", None)
    if begun is not None:
        begun.value = 1  # this pool started: a worker dying from now on may be a file's fault
    n = shape[0] * shape[1] * shape[2] * shape[3]
    with open(arena, "r+b") as f, mmap.mmap(f.fileno(), n, offset=offset) as m:
        buf = np.frombuffer(m, np.uint8, n).reshape(shape)
        meta = _decode_to(buf, srcs, spec, max_pixels, start, io_threads)
        del buf  # the map cannot close while a view of it exists
    return meta, time.perf_counter() - t0


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
    _Decoders). io_threads: object-store reads in flight per decoder (see _ReadAhead).
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
    decoders = _Decoders(workers, _Arena(window, chunk_size, spec.size), spec, max_pixels, decode_memory, io_threads)
    done = False
    try:
        start = 0
        for chunk in chunks:
            decoders.submit(chunk, start)
            start += len(chunk)
            if len(decoders.pending) >= window:
                yield decoders.next_result()
        while decoders.pending:
            yield decoders.next_result()
        done = True
    finally:
        decoders.close(kill=not done)


@dataclass(eq=False)
class _Job:
    """A chunk in flight: its arena slot (held until the consumer has it) and how often a dying worker lost it."""

    chunk: tuple[ImageRef, ...]
    start: int  # index of its first file
    slot: int
    future: Future[Any] | None = None  # None: not (re)submitted yet
    lost: int = 0  # pools that broke while it was in flight
    isolate: bool = False  # lost twice: decode it in processes of its own to find the file that kills them


def _sources(chunk: Sequence[ImageRef]) -> list[Source]:
    """What workers decode: a name crosses the pipe more cheaply than a ref; an unlistable folder's ref carries its
    error, an object's ref its size (read ahead, see _ReadAhead)."""
    return [r.abspath if r.unlistable is None and not has_latency(r.abspath) else r for r in chunk]


_LIVE_DECODERS: weakref.WeakSet[_Decoders] = weakref.WeakSet()


def stop_decoders() -> None:
    """Kill the workers of every decode pool of this process: for a run told to stop (SIGTERM), whose pools may be
    waiting on store reads that never answer."""
    for decoders in list(_LIVE_DECODERS):
        decoders.stop()


class _Decoders:
    """decode_stream's pool of workers, its arena, and the chunks in flight, in input order.

    A worker that dies (OOM killer, decoder crash) breaks the whole pool and every chunk in flight with it: the pool
    is replaced (with a fresh memory budget, as the dead worker's share is lost) and those chunks sent again, each
    to the same slot (the old workers are all gone by then). A chunk lost twice is split in processes of its own
    (halves, down to single files) when its turn comes; the file that still kills its process gets a
    DecoderCrashed row, every other file its real one.
    """

    def __init__(
        self, workers: int, arena: _Arena, spec: PreprocessSpec, max_pixels: int, decode_memory: int, io_threads: int
    ) -> None:
        self.arena, self.spec, self.max_pixels, self.decode_memory = arena, spec, max_pixels, decode_memory
        self.io_threads = io_threads
        self.workers = workers
        self.pending: deque[_Job] = deque()
        # spawn: safe next to the inference threads of this process, and the same on every OS. An executor rather
        # than multiprocessing.Pool: a worker killed mid-task raises BrokenProcessPool instead of hanging the run.
        self._ctx = multiprocessing.get_context("spawn")
        self._pool = self._new_pool()
        self._stopping = False
        _LIVE_DECODERS.add(self)

    def stop(self) -> None:
        """Kill the workers and never restart them: the chunk being waited for ends (BrokenProcessPool), and
        _restart raises, instead of a wait on store reads that may never answer."""
        self._stopping = True
        # Python < 3.14 has no public terminate_workers(); what the workers decode now is abandoned anyway.
        for proc in list((self._pool._processes or {}).values()):
            proc.kill()

    def _new_pool(self) -> ProcessPoolExecutor:
        memory = DecodeMemory(self.decode_memory)
        self._begun = self._ctx.RawValue("b", 0)  # set by the first chunk any worker of this pool begins
        return ProcessPoolExecutor(self.workers, self._ctx, initializer=_worker_init, initargs=(memory, self._begun))

    def submit(self, chunk: tuple[ImageRef, ...], start: int) -> None:
        job = _Job(chunk, start, self.arena.free.popleft())
        self.pending.append(job)
        self._send(job)

    def _send(self, job: _Job) -> None:
        args = (
            self.arena.path, job.slot * self.arena.slot_bytes, (len(job.chunk), *self.arena.shape[1:]),
            _sources(job.chunk), self.spec, self.max_pixels, job.start, self.io_threads,
        )  # fmt: skip
        try:
            job.future = self._pool.submit(_decode_into, *args)
        except BrokenProcessPool:
            job.future = None  # sent again once the pool is replaced

    def next_result(self) -> tuple[tuple[ImageRef, ...], DecodedBatch]:
        """The oldest chunk's (refs, batch); its slot is refilled only after the consumer asks for the next one."""
        job = self.pending[0]
        while True:
            if job.isolate:
                meta, seconds = self._isolated(job)
                break
            if job.future is not None:
                try:
                    meta, seconds = job.future.result()
                    break
                except BrokenProcessPool:
                    pass
            self._restart()
        self.pending.popleft()
        self.arena.free.append(job.slot)
        return job.chunk, _rebuild_batch(self.arena.view(job.slot), meta, seconds)

    def _restart(self) -> None:
        """Replace a broken pool; send its lost chunks again, or mark those lost twice for isolation.

        TaggerError when no worker of the broken pool began a chunk: the pool cannot start (a main module spawn
        cannot import again, a missing library, no memory for a process), which no file is to blame for.
        """
        self._pool.shutdown(wait=True, cancel_futures=True)  # a broken pool has terminated and joined its workers
        if self._stopping:
            raise TaggerError("decoding stopped: the run is stopping")
        if not self._begun.value:
            raise cannot_start("its workers died")
        self._pool = self._new_pool()
        resent = isolated = 0
        for job in self.pending:
            f = job.future
            if job.isolate or (f is not None and f.done() and not f.cancelled() and f.exception() is None):
                continue  # decoded before the break, or waiting for its turn to be isolated
            if f is not None and not f.cancelled():
                job.lost += 1
            job.isolate = job.lost >= 2
            if job.isolate:
                isolated += 1
            else:
                self._send(job)
                resent += 1
        log.warning(
            "a decode worker died (out of memory, or a decoder crash): %d chunks sent again to a fresh pool, "
            "%d lost twice to be split in processes of their own", resent, isolated,
        )  # fmt: skip

    def _isolated(self, job: _Job) -> tuple[list[_Meta], float]:
        """Decode job's chunk in processes of its own, halving what kills them down to the file; pack its slot.

        The pool is idle meanwhile (the chunks after this one are waited for first), so each process gets the
        whole memory budget and the run stays within it.
        """
        t0 = time.perf_counter()
        for other in itertools.islice(self.pending, 1, None):
            if other.future is not None:
                with contextlib.suppress(BrokenProcessPool):
                    other.future.exception()
        paths = _sources(job.chunk)
        results: list[DecodeResult] = []
        todo = [(0, len(paths))]  # pieces of the chunk still to decode, the next one last
        while todo:
            i, j = todo.pop()
            done = self._alone(paths[i:j], job.start + i)
            if isinstance(done, DecodedBatch):
                results += done.results
            elif j - i == 1:
                log.warning("%s kills the decoder (%s): error row", job.chunk[i].path, done)
                error = DecoderCrashed(f"decoding this file killed its process twice ({done})")
                results.append(Failure(job.start + i, one_line(error, named=True)))
            else:
                m = (i + j) // 2
                todo += [(m, j), (i, m)]
        meta = _pack(self.arena.view(job.slot), results)
        return meta, time.perf_counter() - t0

    def _alone(self, paths: list[Source], start: int) -> DecodedBatch | str:
        """paths decoded in a process of its own, or how that process ended when it died ('SIGSEGV', 'exit code 3')."""
        receive, send = self._ctx.Pipe(duplex=False)
        memory = DecodeMemory(self.decode_memory)  # referenced here until the child has it: start() drops its args
        proc = self._ctx.Process(
            target=_decode_alone, args=(send, memory, paths, self.spec, self.max_pixels, start, self.io_threads)
        )
        proc.start()
        send.close()
        started = False
        try:
            started = receive.recv()  # sent before it decodes
            batch: DecodedBatch = receive.recv()
            return batch
        except EOFError:
            proc.join()
            code = proc.exitcode or 0
            how = signal.Signals(-code).name if code < 0 else f"exit code {code}"
            if not started:
                raise cannot_start(f"a decode process ended ({how})") from None
            return how
        finally:
            receive.close()
            proc.join(5)  # it exits once the batch is sent; killed when this ends otherwise (Ctrl-C)
            if proc.is_alive():
                proc.kill()
                proc.join()

    def close(self, kill: bool = False) -> None:
        """Stop the pool; kill: a stream closed before its end (an error, a consumer that stopped) ends its workers
        at once instead of letting them finish chunks nobody will read."""
        if kill:
            self.stop()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.arena.close()


def _decode_alone(
    send: Any, memory: DecodeMemory, paths: list[Source], spec: PreprocessSpec, max_pixels: int, start: int,
    io_threads: int,
) -> None:
    """_Decoders._alone's process: decode paths and send the batch back."""
    _worker_init(memory)
    send.send(True)
    send.send(decode_many(paths, spec, max_pixels, start, io_threads=io_threads))
    send.close()


def _chunks(refs: Iterable[ImageRef], n: int) -> Iterator[tuple[ImageRef, ...]]:
    it = iter(refs)
    while chunk := tuple(itertools.islice(it, n)):
        yield chunk
