"""Decode stage: read an image file and fit it, padded, into the model's square input as uint8 HWC."""

from __future__ import annotations

import numpy as np
from PIL import Image

from tagger.contract import PreprocessSpec

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
