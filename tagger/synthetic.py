"""Generated product-like photos, made in memory: what an export is checked on besides the caller's own photos."""

from __future__ import annotations

import io
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


def generated_photos(n: int, seed: int = 0) -> Iterator[Image.Image]:
    """Product-on-white shots: a shaded, outlined garment-like shape with a soft shadow, mixed aspect ratios, a bit
    of sensor noise, round-tripped through JPEG. Two of every twelve are pure noise to cover the extremes."""
    rng = np.random.default_rng(seed)
    sizes = [(60, 80), (240, 320), (320, 240), (200, 200), (90, 160), (400, 300)]
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        if i % 12 in (5, 11):
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        else:
            pixels = product_shot(rng, w, h, kind=i % 4)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
        buf.seek(0)
        with Image.open(buf) as decoded:
            decoded.load()
            yield decoded


def product_shot(rng: np.random.Generator, w: int, h: int, kind: int) -> np.ndarray:
    """One product of shape `kind` (0 bag, 1 box, 2 t-shirt, 3 trousers) on a light background: uint8 [h, w, 3]."""
    base = tuple(int(c) for c in rng.integers(0, 256, 3))
    bg = tuple(int(c) for c in rng.integers(235, 256, 3))
    mask = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(mask)
    cx, cy, rx, ry = w / 2, h / 2, w * rng.uniform(0.25, 0.42), h * rng.uniform(0.25, 0.42)
    if kind == 0:  # bag / ball
        draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=255)
    elif kind == 1:  # box / shoe box
        draw.rounded_rectangle((cx - rx, cy - ry, cx + rx, cy + ry), radius=min(rx, ry) * 0.3, fill=255)
    elif kind == 2:  # t-shirt silhouette
        draw.polygon(
            [
                (cx - rx * 0.5, cy - ry), (cx + rx * 0.5, cy - ry), (cx + rx, cy - ry * 0.6),
                (cx + rx * 0.8, cy - ry * 0.3), (cx + rx * 0.55, cy - ry * 0.45), (cx + rx * 0.55, cy + ry),
                (cx - rx * 0.55, cy + ry), (cx - rx * 0.55, cy - ry * 0.45), (cx - rx * 0.8, cy - ry * 0.3),
                (cx - rx, cy - ry * 0.6),
            ],
            fill=255,
        )
    else:  # trousers
        draw.polygon(
            [
                (cx - rx * 0.6, cy - ry), (cx + rx * 0.6, cy - ry), (cx + rx * 0.7, cy + ry),
                (cx + rx * 0.1, cy + ry), (cx, cy - ry * 0.2), (cx - rx * 0.1, cy + ry), (cx - rx * 0.7, cy + ry),
            ],
            fill=255,
        )
    alpha = np.asarray(mask.filter(ImageFilter.GaussianBlur(1.0)), dtype=np.float32)[..., None] / 255  # [h, w, 1]
    shadow = np.asarray(mask.filter(ImageFilter.GaussianBlur(max(w, h) / 40)), dtype=np.float32)[..., None] / 255
    shadow = np.roll(shadow, (max(1, h // 60), max(1, w // 60)), axis=(0, 1))
    # light from the top-left: the product gets brighter towards that corner
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    light = 1.15 - 0.35 * (xx / w + yy / h) / 2  # [h, w]
    product = np.clip(np.array(base, np.float32) * light[..., None], 0, 255)
    background = np.array(bg, np.float32) * (1 - 0.25 * shadow)
    img = background * (1 - alpha) + product * alpha + rng.normal(0, 3, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)
