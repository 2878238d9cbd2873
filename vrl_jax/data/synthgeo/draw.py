"""PIL drawing helpers shared by the families: canvas, labels, shapes, arcs, figure fitting.

Geometry is computed in "figure" coordinates (y up, any scale) and mapped into the image by
`fit_points`; angles are counter-clockwise degrees in that frame. Labels are never rotated, so
they stay readable at 112 px.
"""
from __future__ import annotations

import functools
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

WHITE = (255, 255, 255)
BLACK = (0, 0, 0)
GREY = (200, 200, 200)
# Saturated, far apart in hue, so a tiny vision tower separates them at a glance.
COLORS = {"red": (220, 30, 30), "blue": (30, 80, 220), "green": (20, 150, 40)}
LABEL_SIZE = 11


@functools.lru_cache(maxsize=16)
def font(size: int = LABEL_SIZE) -> ImageFont.FreeTypeFont:
    """Pillow's bundled scalable font: no font file on disk is needed, so the data is offline."""
    return ImageFont.load_default(size=size)


def canvas(size: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.new("RGB", (size, size), WHITE)
    return image, ImageDraw.Draw(image)


def label(draw: ImageDraw.ImageDraw, text: str, center, size: int = LABEL_SIZE, fill=BLACK,
          halo: bool = True) -> None:
    """Draws `text` centred on `center`; a white box behind it keeps it legible over lines."""
    x, y = float(center[0]), float(center[1])
    if halo:
        left, top, right, bottom = draw.textbbox((x, y), text, font=font(size), anchor="mm")
        draw.rectangle((left - 1, top - 1, right + 1, bottom + 1), fill=WHITE)
    draw.text((x, y), text, font=font(size), fill=fill, anchor="mm")


def clamp_to_canvas(point, size: int, margin: int = 8) -> tuple[float, float]:
    """Keeps a label anchor at least `margin` pixels inside the image."""
    return (min(max(float(point[0]), margin), size - margin),
            min(max(float(point[1]), margin), size - margin))


def rotate(points: np.ndarray, degrees: float) -> np.ndarray:
    """Rotates figure points [N, 2] counter-clockwise about the origin."""
    t = math.radians(degrees)
    matrix = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
    return np.asarray(points, dtype=np.float64) @ matrix.T


def fit_points(points: np.ndarray, size: int, margin: float) -> np.ndarray:
    """Maps figure points [N, 2] (y up) to image pixels [N, 2] (y down), uniformly scaled and
    centred so that the bounding box fills the image minus `margin` on every side."""
    points = np.asarray(points, dtype=np.float64)
    low, high = points.min(axis=0), points.max(axis=0)
    extent = np.maximum(high - low, 1e-9)
    scale = (size - 2 * margin) / extent.max()
    centred = (points - (low + high) / 2) * scale
    return np.stack([size / 2 + centred[:, 0], size / 2 - centred[:, 1]], axis=1)


def unit(vector) -> np.ndarray:
    vector = np.asarray(vector, dtype=np.float64)
    return vector / max(np.linalg.norm(vector), 1e-12)


def direction(degrees: float) -> np.ndarray:
    """Unit vector in image coordinates (y down) for a counter-clockwise figure angle."""
    t = math.radians(degrees)
    return np.array([math.cos(t), -math.sin(t)])


def arc(draw: ImageDraw.ImageDraw, center, radius: float, start: float, end: float,
        width: int = 1, fill=BLACK) -> None:
    """Arc from figure angle `start` to `end` (counter-clockwise, degrees) around `center`."""
    x, y = float(center[0]), float(center[1])
    # PIL measures clockwise in image coordinates, so the sweep is mirrored.
    draw.arc((x - radius, y - radius, x + radius, y + radius), -end, -start, fill=fill, width=width)


def right_angle_mark(draw: ImageDraw.ImageDraw, corner, toward_a, toward_b, size: float = 7,
                     width: int = 1) -> None:
    """The small square drawn in a right angle at `corner`, whose legs run toward the two points."""
    corner = np.asarray(corner, dtype=np.float64)
    u, v = unit(np.asarray(toward_a) - corner) * size, unit(np.asarray(toward_b) - corner) * size
    draw.line([tuple(corner + u), tuple(corner + u + v), tuple(corner + v)], fill=BLACK, width=width)


def shape(draw: ImageDraw.ImageDraw, kind: str, center, size: float, fill) -> None:
    """A filled circle, square or upward triangle of side (or diameter) `size`, outlined in black."""
    x, y, h = float(center[0]), float(center[1]), size / 2
    if kind == "circle":
        draw.ellipse((x - h, y - h, x + h, y + h), fill=fill, outline=BLACK)
    elif kind == "square":
        draw.rectangle((x - h, y - h, x + h, y + h), fill=fill, outline=BLACK)
    elif kind == "triangle":
        draw.polygon([(x, y - h), (x + h, y + h), (x - h, y + h)], fill=fill, outline=BLACK)
    else:
        raise ValueError(f"unknown shape kind {kind!r}; expected circle, square or triangle")


def jitter(rng_values, amount: int) -> tuple[float, float]:
    """A label offset from two pre-drawn uniform numbers in [-1, 1] (stored in the layout)."""
    return float(rng_values[0]) * amount, float(rng_values[1]) * amount
