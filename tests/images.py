"""Test images drawn with Pillow: structured scenes (so a mirrored copy stays the same scene to
a vision model), their files in PNG, JPEG and WebP, and ``data:`` URLs of them."""

from __future__ import annotations

import base64
import io
import random
from typing import Any

from PIL import Image, ImageDraw, ImageOps


def scene(seed: int, size: tuple[int, int] = (320, 240)) -> Image.Image:
    """A landscape: sky gradient, a sun, hills, trees; asymmetric, different per seed."""
    rng = random.Random(seed)
    width, height = size
    image = Image.new("RGB", size)
    draw = ImageDraw.Draw(image)
    top = (rng.randrange(40, 120), rng.randrange(100, 180), rng.randrange(200, 256))
    for y in range(height):
        t = y / height
        draw.line([(0, y), (width, y)], fill=tuple(int(c * (1 - t) + 255 * t * 0.8) for c in top))
    sx, sy, r = rng.randrange(20, width // 2), rng.randrange(15, height // 3), rng.randrange(15, 30)
    draw.ellipse([sx - r, sy - r, sx + r, sy + r], fill=(255, 220, rng.randrange(0, 120)))
    for _ in range(3):
        base = rng.randrange(height // 2, height)
        points = [(0, height), (0, base)]
        for x in range(0, width + 40, 40):
            points.append((x, base - rng.randrange(0, 60)))
        points.append((width, height))
        green = (rng.randrange(20, 80), rng.randrange(100, 200), rng.randrange(20, 80))
        draw.polygon(points, fill=green)
    for _ in range(rng.randrange(3, 7)):
        x, y = rng.randrange(0, width), rng.randrange(height // 2, height - 10)
        draw.rectangle([x - 3, y, x + 3, y + 25], fill=(90, 60, 30))
        draw.ellipse([x - 14, y - 24, x + 14, y + 4], fill=(20, rng.randrange(90, 150), 30))
    return image


def pattern(seed: int, size: tuple[int, int] = (256, 256)) -> Image.Image:
    """An unrelated image: stripes and a checkerboard of saturated colours."""
    rng = random.Random(seed)
    image = Image.new("RGB", size)
    draw = ImageDraw.Draw(image)
    step = rng.randrange(12, 32)
    colours = [tuple(rng.randrange(0, 256) for _ in range(3)) for _ in range(2)]
    for i in range(0, size[0], step):
        for j in range(0, size[1], step):
            colour = colours[((i // step) + (j // step)) % 2]
            draw.rectangle([i, j, i + step, j + step], fill=colour)  # type: ignore[arg-type]
    return image


def mirrored(image: Image.Image) -> Image.Image:
    return ImageOps.mirror(image)


def encode(image: Image.Image, fmt: str = "PNG", **save: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **save)
    return out.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"
