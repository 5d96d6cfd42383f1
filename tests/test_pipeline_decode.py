"""decode: mode policy, EXIF rotation, reduced JPEG decode, pixel limit, batches across processes."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import png_header, quadrant_image
from PIL import Image

from tagger.contract import PreprocessSpec
from tagger.pipeline.decode import (
    DecodedBatch,
    Failure,
    Sample,
    decode_many,
    decode_one,
    decode_stream,
    fit_and_pad,
    load_image,
)
from tagger.pipeline.discover import discover

SPEC = PreprocessSpec(size=32)
WHITE = (255, 255, 255)


def ok(result: Sample | Failure) -> Sample:
    assert isinstance(result, Sample), result
    return result


def failed(result: Sample | Failure) -> str:
    assert isinstance(result, Failure), result
    return result.error


def test_good_images_fit_and_pad_to_uint8_square(catalog: tuple[Path, dict[str, str]]) -> None:
    root, _ = catalog
    s = ok(decode_one(root / "good/photo.jpg", SPEC, index=7))
    assert s.index == 7 and (s.width, s.height) == (64, 48)
    assert s.array.dtype == np.uint8 and s.array.shape == (32, 32, 3)
    assert tuple(s.array[0, 16]) == WHITE  # a landscape image is padded above and below
    assert np.abs(s.array[8, 2].astype(int) - (200, 30, 30)).max() < 12  # top-left quadrant: red (JPEG-lossy)


@pytest.mark.parametrize(
    ("rel", "left", "right"),
    [
        ("modes/cmyk.jpg", (255, 0, 0), (255, 0, 0)),  # CMYK -> RGB
        ("modes/gray16.png", (128, 128, 128), (128, 128, 128)),  # 16-bit 0x8080 scaled to 128, not clipped to 255
        ("modes/rgba.png", WHITE, (0, 0, 255)),  # transparent half composited onto the white pad colour
        ("modes/palette.gif", WHITE, (255, 0, 0)),  # palette transparency, same
        ("modes/animated.gif", (255, 0, 0), (255, 0, 0)),  # first frame only (red; later frames green, blue)
    ],
)
def test_mode_policy(catalog: tuple[Path, dict[str, str]], rel: str, left: tuple[int, ...], right: tuple[int, ...]) -> None:
    root, _ = catalog
    a = ok(decode_one(root / rel, SPEC)).array.astype(int)
    assert np.abs(a[16, 2] - left).max() <= 3
    assert np.abs(a[16, 29] - right).max() <= 3


def test_exif_orientation_is_applied_and_size_is_as_displayed(catalog: tuple[Path, dict[str, str]]) -> None:
    root, _ = catalog
    upright = ok(decode_one(root / "exif/upright.jpg", SPEC))
    rotated = ok(decode_one(root / "exif/rotated.jpg", SPEC))
    raw = ok(decode_one(root / "exif/rotated_noexif.jpg", SPEC))
    assert (rotated.width, rotated.height) == (upright.width, upright.height) == (48, 64)
    assert (raw.width, raw.height) == (64, 48)
    assert np.abs(rotated.array.astype(int) - upright.array).max() <= 8
    assert np.abs(raw.array.astype(int) - upright.array).max() > 100


@pytest.mark.parametrize(
    ("rel", "error"),
    [
        ("broken/empty.jpg", "UnidentifiedImageError: "),
        ("broken/text.jpg", "UnidentifiedImageError: "),
        ("broken/truncated.jpg", "OSError: "),
        ("broken/bomb.png", "DecompressionBombError: 100000x100000"),
        ("gone/missing.jpg", "FileNotFoundError: No such file or directory"),
    ],
)
def test_bad_files_become_failures_with_a_short_message(
    catalog: tuple[Path, dict[str, str]], rel: str, error: str
) -> None:
    root, _ = catalog
    message = failed(decode_one(root / rel, SPEC, index=3))
    assert message.startswith(error)
    assert str(root) not in message and "\n" not in message


def test_pixel_limit_is_checked_on_the_header_before_pillow_does(tmp_path: Path) -> None:
    small = tmp_path / "small.png"
    quadrant_image(40, 30).save(small)
    assert failed(decode_one(small, SPEC, max_pixels=1000)).startswith("DecompressionBombError: 40x30 = 1200")
    # 400 MP is over twice Pillow's own default limit, so Pillow alone would refuse it at open. With a higher
    # limit of ours it gets past the header check and fails later only because the file holds no pixels.
    big = tmp_path / "big.png"
    big.write_bytes(png_header(20_000, 20_000))
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        message = failed(decode_one(big, SPEC, max_pixels=10**9))
    assert not message.startswith("DecompressionBombError")


def test_jpeg_decodes_at_reduced_scale_close_to_a_full_decode(tmp_path: Path) -> None:
    path = tmp_path / "large.jpg"
    rng = np.random.default_rng(0)
    base = np.kron(rng.integers(0, 255, (12, 16, 3)), np.ones((100, 100, 1))).astype(np.uint8)  # 1200x1600 blocks
    Image.fromarray(base).save(path, quality=95)
    img, w, h = load_image(path, SPEC, max_pixels=10**8)
    assert (w, h) == (1600, 1200)
    assert img.size == (200, 150)  # 1/8 scale: the smallest DCT scale whose long side is still >= 32
    with Image.open(path) as full:
        reference = fit_and_pad(full.convert("RGB"), SPEC)
    reduced = fit_and_pad(img, SPEC)
    assert np.abs(reduced.astype(int) - reference).mean() < 3


def test_decode_many_returns_one_contiguous_array_of_the_ok_images(catalog: tuple[Path, dict[str, str]]) -> None:
    root, _ = catalog
    paths = [root / "good/photo.jpg", root / "broken/empty.jpg", root / "good/photo.png"]
    batch = decode_many(paths, SPEC, start=10)
    assert batch.images.shape == (2, 32, 32, 3) and batch.images.flags.c_contiguous
    assert [r.index for r in batch.results] == [10, 11, 12]
    assert [type(r) for r in batch.results] == [Sample, Failure, Sample]
    assert np.array_equal(ok(batch.results[2]).array, batch.images[1])
    assert np.array_equal(ok(batch.results[0]).array, ok(decode_one(paths[0], SPEC)).array)
    again: DecodedBatch = pickle.loads(pickle.dumps(batch))
    assert np.array_equal(again.images, batch.images)
    assert [(type(a), a.index) for a in again.results] == [(type(b), b.index) for b in batch.results]
    assert np.shares_memory(ok(again.results[2]).array, again.images)  # views, not pickled copies


def test_decode_stream_keeps_order_with_a_process_pool(catalog: tuple[Path, dict[str, str]]) -> None:
    root, _ = catalog
    refs = list(discover(root))

    def flatten(workers: int) -> list[tuple[str, str, bytes]]:
        rows = []
        for chunk_refs, chunk in decode_stream(refs, SPEC, workers=workers, chunk_size=3):
            assert len(chunk_refs) == len(chunk.results)
            for ref, r in zip(chunk_refs, chunk.results):
                rows.append((ref.path, type(r).__name__, r.array.tobytes() if isinstance(r, Sample) else r.error))
        return rows

    in_process = flatten(0)
    assert [p for p, _, _ in in_process] == [r.path for r in refs]
    assert flatten(2) == in_process


def _arena_files() -> set[str]:
    import glob
    import tempfile

    return {p for d in ("/dev/shm", tempfile.gettempdir()) for p in glob.glob(f"{d}/tagger-decode-*")}


def test_decode_stream_reuses_shared_slots_without_mixing_chunks(tmp_path: Path) -> None:
    # 30 distinct photos through 2 workers, 2-image chunks and 4 slots (2 per worker): every slot is refilled.
    for i in range(30):
        Image.new("RGB", (40 + i, 30), (i * 8, 255 - i * 8, 100)).save(tmp_path / f"{i:02d}.jpg", quality=95)
    (tmp_path / "99.jpg").write_bytes(b"not a jpeg")
    refs = list(discover(tmp_path))
    before = _arena_files()

    def pixels(workers: int) -> list[bytes | str]:
        out: list[bytes | str] = []
        for _, chunk in decode_stream(refs, SPEC, workers=workers, chunk_size=2):
            out += [r.array.tobytes() if isinstance(r, Sample) else r.error for r in chunk.results]
        return out

    in_process = pixels(0)
    assert len(set(in_process)) == 31
    assert pixels(2) == in_process
    assert _arena_files() == before  # the shared buffers are removed with the stream


def test_decode_stream_closed_early_removes_its_shared_buffers(tmp_path: Path) -> None:
    for i in range(8):
        Image.new("RGB", (20, 20), (i * 30, 0, 0)).save(tmp_path / f"{i}.png")
    before = _arena_files()
    stream = decode_stream(list(discover(tmp_path)), SPEC, workers=2, chunk_size=1)
    next(stream)
    assert len(_arena_files() - before) == 1
    stream.close()
    assert _arena_files() == before


@pytest.mark.parametrize("ext", ["avif", "jfif"])
def test_default_extensions_include_modern_and_alias_formats(tmp_path: Path, ext: str) -> None:
    from PIL import features

    if ext == "avif" and not features.check("avif"):
        pytest.skip("this Pillow has no AVIF support")
    quadrant_image(48, 64).save(tmp_path / f"photo.{ext}", format="AVIF" if ext == "avif" else "JPEG", quality=95)
    (ref,) = discover(tmp_path)
    sample = ok(decode_one(ref, SPEC))
    assert (sample.width, sample.height) == (48, 64)
    reference = fit_and_pad(quadrant_image(48, 64), SPEC)
    assert np.abs(sample.array.astype(int) - reference).mean() < 6  # lossy, but the same picture
