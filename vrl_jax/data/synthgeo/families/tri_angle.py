"""`tri_angle`: a triangle drawn with its true angles, two of them labelled; find the third, x."""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from vrl_jax.data.synthgeo import draw
from vrl_jax.data.synthgeo.answers import ExactAnswer
from vrl_jax.data.synthgeo.family import Family, Rationale, pick

# Every angle, x included, stays in this range: flatter triangles leave no room for the labels.
MIN_ANGLE, MAX_ANGLE = 30, 110
OOD_GRID = 5  # test_ood holds given angles that are not multiples of this


def sample(rng, config):
    step = config.angle_step
    first = MIN_ANGLE + (-MIN_ANGLE) % step
    alpha = pick(rng, range(first, MAX_ANGLE + 1, step))
    # beta keeps itself and x = 180 - alpha - beta inside [MIN_ANGLE, MAX_ANGLE].
    low, high = max(MIN_ANGLE, 180 - alpha - MAX_ANGLE), min(MAX_ANGLE, 180 - alpha - MIN_ANGLE)
    beta = pick(rng, range(low + (-low) % step, high + 1, step))
    layout = {"order": [int(v) for v in rng.permutation(3)], "mirror": bool(rng.integers(2)),
              "rotation": round(float(rng.uniform(-config.rotation_max, config.rotation_max)), 2),
              "jitter": [round(float(v), 3) for v in rng.uniform(-1, 1, size=6)]}
    return {"given": sorted((alpha, beta))}, layout


def solve(params) -> ExactAnswer:
    return ExactAnswer(Fraction(180 - sum(params["given"])))


def is_ood(params) -> bool:
    return any(angle % OOD_GRID for angle in params["given"])


def _angles(params) -> list[int]:
    """[alpha, beta, x]: the two given angles and the unknown one."""
    alpha, beta = params["given"]
    return [alpha, beta, 180 - alpha - beta]


def questions(params, layout, text: bool) -> tuple[str, ...]:
    asked = ("Find x in degrees.", "In the triangle, find the angle x in degrees.",
             "What is the measure of x, in degrees?")
    if not text:
        return asked
    alpha, beta = params["given"]
    stated = f"Two angles of a triangle measure {alpha} degrees and {beta} degrees, and x is the third angle."
    return tuple(f"{stated} {q}" for q in asked)


def rationale(params, layout, text: bool) -> Rationale:
    alpha, beta, x = _angles(params)
    observation = (f"The question gives two angles, {alpha} degrees and {beta} degrees." if text else
                   f"Two angles of the triangle are labelled {alpha} degrees and {beta} degrees, and the "
                   f"third angle is x.")
    steps = ("The angles of a triangle add up to 180 degrees.", f"x = 180 - {alpha} - {beta} = {x}.")
    return Rationale(goal="Find the angle x in degrees.", observation=observation, steps=steps,
                     conclusion=f"x = {x} degrees.")


def _vertices(params, layout, size: int) -> np.ndarray:
    """Pixel positions [3, 2] of the vertices carrying angles (alpha, beta, x) in that order."""
    angles = _angles(params)
    # Vertex k of the drawn triangle gets angle angles[order[k]]; the base runs from vertex 0 to 1.
    a0, a1, a2 = (math.radians(angles[i]) for i in layout["order"])
    apex = np.array([math.cos(a0), math.sin(a0)]) * math.sin(a1) / math.sin(a2)
    drawn = np.stack([np.zeros(2), np.array([1.0, 0.0]), apex])
    if layout["mirror"]:
        drawn[:, 0] *= -1
    drawn = draw.fit_points(draw.rotate(drawn, layout["rotation"]), size, margin=14)
    by_angle = np.empty_like(drawn)
    by_angle[layout["order"]] = drawn
    return by_angle


def visual_facts(params, layout) -> dict:
    alpha, beta = params["given"]
    return {
        "description": "A triangle; two interior angles are labelled in degrees and the third is x.",
        "objects": [{"name": "angle", "attributes": {"label": f"{alpha} degrees"}},
                    {"name": "angle", "attributes": {"label": f"{beta} degrees"}},
                    {"name": "angle", "attributes": {"label": "x"}}],
        "quantities": {"given_angles": [alpha, beta]},
    }


def render(params, layout, config, show_labels: bool):
    image, pen = draw.canvas(config.image_size)
    vertices = _vertices(params, layout, config.image_size)
    pen.polygon([tuple(p) for p in vertices], outline=draw.BLACK, width=config.line_width)
    angles = _angles(params)
    jitter = np.asarray(layout["jitter"]).reshape(3, 2) * config.label_jitter
    for k in range(3):
        if k < 2 and not show_labels:
            continue
        v, p, q = vertices[k], vertices[(k + 1) % 3], vertices[(k + 2) % 3]
        t1 = math.degrees(math.atan2(-(p - v)[1], (p - v)[0]))
        t2 = math.degrees(math.atan2(-(q - v)[1], (q - v)[0]))
        if (t2 - t1) % 360 > 180:
            t1, t2 = t2, t1
        draw.arc(pen, v, 7, t1, t1 + (t2 - t1) % 360)
        bisector = draw.unit(draw.unit(p - v) + draw.unit(q - v))
        distance = min(max(9 / math.sin(math.radians(angles[k]) / 2), 14), 26)
        text = "x" if k == 2 else f"{angles[k]}°"
        draw.label(pen, text, draw.clamp_to_canvas(v + bisector * distance + jitter[k], config.image_size))
    return image


FAMILY = Family("tri_angle", sample, solve, is_ood, questions, rationale, visual_facts, render)
