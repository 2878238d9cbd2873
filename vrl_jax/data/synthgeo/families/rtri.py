"""`rtri`: a right triangle with two sides labelled; find the third side, x.

Levels without `irrational` draw Pythagorean triples (whole answers); with it, any whole sides,
so answers like 2 sqrt(13) exercise the judge's symbolic path and the problem space is large
enough for honest val/test splits.
"""
from __future__ import annotations

import functools
import math

import numpy as np

from vrl_jax.data.synthgeo import draw
from vrl_jax.data.synthgeo.answers import ExactAnswer, exact_sqrt, sqrt_equation
from vrl_jax.data.synthgeo.family import Family, Rationale, pick, randint

IID_SIDE_MAX = 30  # test_ood holds triangles with a longer labelled side
HYPOTENUSE_PER_NUMBER = 2.5  # a level's largest hypotenuse, relative to its number_max


@functools.lru_cache(maxsize=1)
def triples(limit: int = 60) -> tuple[tuple[int, int, int], ...]:
    """All integer right triangles (a < b < c) with c <= limit, primitive or not, by c then a."""
    found = []
    for c in range(5, limit + 1):
        for a in range(3, c):
            b = math.isqrt(c * c - a * a)
            if a < b and a * a + b * b == c * c:
                found.append((a, b, c))
    return tuple(found)


def sample(rng, config):
    unknown = pick(rng, ("hypotenuse", "leg")) if config.two_step else "hypotenuse"
    if config.irrational and rng.integers(2):
        if unknown == "hypotenuse":
            given = sorted((randint(rng, 1, config.number_max), randint(rng, 1, config.number_max)))
        else:  # a leg at least a quarter of the hypotenuse keeps the triangle drawable
            hyp = randint(rng, 3, 2 * config.number_max)
            given = [randint(rng, -(-hyp // 4), hyp - 1), hyp]
    else:
        a, b, c = pick(rng, [t for t in triples() if t[2] <= HYPOTENUSE_PER_NUMBER * config.number_max])
        given = [a, b] if unknown == "hypotenuse" else [pick(rng, (a, b)), c]
    layout = {"first_leg_horizontal": bool(rng.integers(2)), "mirror": bool(rng.integers(2)),
              "flip": bool(rng.integers(2)),
              "rotation": round(float(rng.uniform(-config.rotation_max, config.rotation_max)), 2),
              "jitter": [round(float(v), 3) for v in rng.uniform(-1, 1, size=6)]}
    return {"unknown": unknown, "given": given}, layout


def solve(params) -> ExactAnswer:
    p, q = params["given"]
    return exact_sqrt(p * p + q * q if params["unknown"] == "hypotenuse" else q * q - p * p)


def is_ood(params) -> bool:
    return max(params["given"]) > IID_SIDE_MAX


def _sides(params) -> tuple[float, float, float]:
    """Lengths (first leg, second leg, hypotenuse) of the drawn triangle."""
    p, q = params["given"]
    if params["unknown"] == "hypotenuse":
        return p, q, math.hypot(p, q)
    return p, math.sqrt(q * q - p * p), q


def questions(params, layout, text: bool) -> tuple[str, ...]:
    asked = ("Find x.", "In the right triangle, find the length x.", "Determine the value of x.")
    if not text:
        return asked
    p, q = params["given"]
    stated = (f"A right triangle has legs of length {p} and {q}, and x is its hypotenuse."
              if params["unknown"] == "hypotenuse" else
              f"A right triangle has a leg of length {p} and a hypotenuse of length {q}, and x is its "
              f"other leg.")
    return tuple(f"{stated} {asked_}" for asked_ in asked)


def rationale(params, layout, text: bool) -> Rationale:
    p, q = params["given"]
    source = "The question says" if text else "The triangle has a right angle;"
    if params["unknown"] == "hypotenuse":
        observation = f"{source} the legs are {p} and {q} and the hypotenuse is x."
        steps = (f"By the Pythagorean theorem, x^2 = {p}^2 + {q}^2 = {p * p} + {q * q} = {p * p + q * q}.",
                 sqrt_equation("x", p * p + q * q))
    else:
        observation = f"{source} one leg is {p}, the hypotenuse is {q} and the other leg is x."
        steps = (f"By the Pythagorean theorem, x^2 = {q}^2 - {p}^2 = {q * q} - {p * p} = {q * q - p * p}.",
                 sqrt_equation("x", q * q - p * p))
    return Rationale(goal="Find the length x.", observation=observation, steps=steps,
                     conclusion=f"x = {solve(params).plain()}.")


def _vertices(params, layout, size: int) -> np.ndarray:
    """Pixel positions [3, 2]: the right-angle vertex, the end of the first leg, of the second."""
    first, second, _ = _sides(params)
    u, v = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    if not layout["first_leg_horizontal"]:
        u, v = v, u
    points = np.stack([np.zeros(2), u * first, v * second])
    points = points * np.array([-1.0 if layout["mirror"] else 1.0, -1.0 if layout["flip"] else 1.0])
    return draw.fit_points(draw.rotate(points, layout["rotation"]), size, margin=20)


def _labels(params) -> tuple[str, str, str]:
    """Labels of (first leg, second leg, hypotenuse)."""
    p, q = params["given"]
    return (str(p), str(q), "x") if params["unknown"] == "hypotenuse" else (str(p), "x", str(q))


def visual_facts(params, layout) -> dict:
    names = ("leg", "leg", "hypotenuse")
    return {
        "description": "A right triangle with a right-angle mark; two sides carry their lengths and "
                       "the third is labelled x.",
        "objects": [{"name": name, "attributes": {"label": text}} for name, text in zip(names, _labels(params))],
        "quantities": {"given": list(params["given"]), "unknown": params["unknown"]},
    }


def render(params, layout, config, show_labels: bool):
    image, pen = draw.canvas(config.image_size)
    r, end1, end2 = _vertices(params, layout, config.image_size)
    pen.polygon([tuple(r), tuple(end1), tuple(end2)], outline=draw.BLACK, width=config.line_width)
    draw.right_angle_mark(pen, r, end1, end2)
    centroid = (r + end1 + end2) / 3
    jitter = np.asarray(layout["jitter"]).reshape(3, 2) * config.label_jitter
    for k, (text, (p, q)) in enumerate(zip(_labels(params), ((r, end1), (r, end2), (end1, end2)))):
        if text != "x" and not show_labels:
            continue
        middle = (p + q) / 2
        anchor = middle + draw.unit(middle - centroid) * 10 + jitter[k]
        draw.label(pen, text, draw.clamp_to_canvas(anchor, config.image_size))
    return image


FAMILY = Family("rtri", sample, solve, is_ood, questions, rationale, visual_facts, render)
