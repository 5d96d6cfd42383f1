"""Pixels: one file's bytes -> a Sample fitted, padded, into the model's square uint8 input, or a Failure."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import struct
import sys
import warnings
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Iterator, Union

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from tagger.contract import PreprocessSpec
from tagger.errors import one_line
from tagger.pipeline.budget import Lease
from tagger.pipeline.discover import ImageRef
from tagger.storage import StoreUnavailable, read_file, redact, sha256_hex

log = logging.getLogger(__name__)

_FILTERS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}

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
    sha256: str | None = None  # hex SHA-256 of the file's bytes


@dataclass(frozen=True)
class Failure:
    """An image that could not be decoded; error is 'ExceptionClass: message'."""

    index: int
    error: str
    sha256: str | None = None  # hex SHA-256 of the file's bytes; None when they could not be read


DecodeResult = Union[Sample, Failure]
Source = Union[ImageRef, str, "os.PathLike[str]"]


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


def _open(data: bytes) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        # Pillow's message names the in-memory buffer by its address; the row names the file.
        raise UnidentifiedImageError("cannot identify image file") from None


def load_image(
    src: bytes | str | os.PathLike[str], spec: PreprocessSpec, max_pixels: int, lease: Lease | None = None
) -> tuple[Image.Image, int, int]:
    """Open (a file's bytes, or a path read through storage), check the pixel count, decode (JPEG at a reduced DCT
    scale), EXIF-rotate and convert to RGB.

    lease: where the decoding's memory is held (decode_bytes, added to what the lease holds already) before the
    pixels are loaded, waiting for room; None: decoded without waiting. The caller releases it once done.
    Returns (RGB image at least fitted-size on its long side, original width, original height as displayed).
    Raises what Pillow raises for a bad file, DecompressionBombError above max_pixels, DecodeMemoryError when the
    lease's whole budget is too small.
    """
    data = src if isinstance(src, bytes) else read_file(src)
    with _pillow_limit(), _open(data) as img:
        w, h = img.size
        if w * h > max_pixels:
            raise Image.DecompressionBombError(f"{w}x{h} = {w * h} pixels exceeds the limit of {max_pixels}")
        orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
        transposed = orientation in range(2, 9)
        # JPEG only: decode at 1/2, 1/4 or 1/8 scale, the smallest still at least the fitted size.
        img.draft("RGB", fitted_size(w, h, spec.size))
        if lease is not None:
            lease.add(decode_bytes(img, w, h, transposed), f"{w}x{h}")
        img.load()
        out = ImageOps.exif_transpose(img) if transposed else img
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
    lease: Lease | None = None,
) -> DecodeResult:
    """Decode one file into the model's input (uint8 [S, S, 3]); a bad file becomes a Failure, never an exception.

    The bytes are read once, through storage, and hashed before decoding: a file that fails to decode keeps its sha256.
    A ref of a folder that could not be listed becomes its Failure without opening anything. fetched: the bytes,
    read ahead (see fetch.FetchWindow); its read error is the row's error. lease: see load_image.
    """
    if isinstance(src, ImageRef) and src.unlistable is not None:
        return Failure(index, src.unlistable)
    path = src.abspath if isinstance(src, ImageRef) else src
    digest = None
    try:
        data = fetched.result() if fetched is not None else read_file(path)
        digest = sha256_hex(data)
        img, w, h = load_image(data, spec, max_pixels, lease)
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
