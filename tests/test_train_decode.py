"""Training's decode cache gives the exact pixels of the serving decoder on awkward photos from a labelled folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import ExifTags, Image

from tagger.contract import PreprocessSpec
from tagger.pipeline.decode import Sample, decode_one, fit_and_pad
from tagger.train.data import decode_cache, load_labelled_set

SPEC = PreprocessSpec(size=64)
SPECIAL = {"exif": "1.jpg", "cmyk": "2.jpg", "rgba": "3.png", "large": "4.jpg"}


def _labelled_folder(root: Path) -> Path:
    """styles.csv + images/: the four awkward photos and eight plain ones, so the hash split has both sides."""
    images = root / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)

    # Landscape as stored, portrait as displayed (orientation 6: rotate 90° clockwise); a red block marks a corner.
    stored = np.full((80, 120, 3), 230, np.uint8)
    stored[:30, :40] = (200, 20, 20)
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    Image.fromarray(stored).save(images / SPECIAL["exif"], quality=95, exif=exif.tobytes())

    cmyk = np.zeros((90, 70, 4), np.uint8)
    cmyk[..., 0] = np.linspace(0, 255, 70, dtype=np.uint8)[None, :]
    cmyk[..., 2] = np.linspace(0, 255, 90, dtype=np.uint8)[:, None]
    Image.fromarray(cmyk, "CMYK").save(images / SPECIAL["cmyk"], quality=95)

    rgba = np.zeros((100, 100, 4), np.uint8)  # transparent black outside the disc
    yy, xx = np.mgrid[:100, :100]
    disc = (yy - 50) ** 2 + (xx - 50) ** 2 < 35**2
    rgba[disc] = (20, 40, 200, 255)
    rgba[disc & (xx > 50), 3] = 128  # half the disc half transparent
    Image.fromarray(rgba, "RGBA").save(images / SPECIAL["rgba"])

    # A full-resolution catalogue photo: the serving decoder reads it at a reduced JPEG scale.
    large = rng.integers(0, 256, (2400 // 16, 1800 // 16, 3), dtype=np.uint8).repeat(16, 0).repeat(16, 1)
    Image.fromarray(large).save(images / SPECIAL["large"], quality=90)

    lines = ["id,articleType,baseColour\n"] + [f"{name.split('.')[0]},Tshirts,Blue\n" for name in SPECIAL.values()]
    for i in range(10, 18):
        Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(images / f"{i}.jpg")
        lines.append(f"{i},Tshirts,Blue\n")
    (root / "styles.csv").write_text("".join(lines))
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _labelled_folder(tmp_path_factory.mktemp("awkward"))


@pytest.mark.parametrize("workers", [0, 2])
def test_training_cache_holds_the_serving_decoders_pixels(folder: Path, workers: int) -> None:
    data = load_labelled_set([folder], {"class": "articleType", "color": "baseColour"}, min_count=1, val_fraction=0.5)
    examples = data.train + data.val
    assert {e.ref.path for e in examples} >= {f"images/{name}" for name in SPECIAL.values()}

    images, kept = decode_cache(examples, SPEC, workers)
    assert images.shape == (len(examples), 64, 64, 3) and kept == examples
    for array, e in zip(images, kept):
        served = decode_one(e.ref.abspath, SPEC)
        assert isinstance(served, Sample)
        assert np.array_equal(array, served.array), e.ref.path

    # Where a decoder of its own (open + fit_and_pad) differs: no EXIF rotation, alpha dropped instead of composited
    # onto the pad colour, a full-scale JPEG decode instead of the reduced one.
    cached = {e.ref.path: array for array, e in zip(images, kept)}
    for name in (SPECIAL["exif"], SPECIAL["rgba"], SPECIAL["large"]):
        with Image.open(folder / "images" / name) as img:
            assert not np.array_equal(cached[f"images/{name}"], fit_and_pad(img, SPEC)), name
    # Displayed portrait: the red corner of the stored image lands top-right.
    exif = cached[f"images/{SPECIAL['exif']}"].astype(int)
    assert exif[5, 45, 0] > 150 and exif[5, 45, 1] < 80 and exif[58, 20].min() > 200
