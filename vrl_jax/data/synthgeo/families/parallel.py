"""`parallel`: two parallel lines cut by a transversal; one angle is labelled, find the angle x.

At each intersection the four angles are numbered counter-clockwise from the line's right-hand ray:
0 above-right, 1 above-left, 2 below-left, 3 below-right. If the transversal's upward ray makes
the angle phi with the lines, sectors 0 and 2 measure phi and sectors 1 and 3 measure 180 - phi,
at both intersections; so x equals the given angle when the two sectors have the same parity and
is its supplement otherwise. Only pairs with a textbook name are asked.
"""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from vrl_jax.data.synthgeo import draw
from vrl_jax.data.synthgeo.answers import ExactAnswer
from vrl_jax.data.synthgeo.family import Family, Rationale, pick

ANGLE_MIN, ANGLE_MAX = 35, 145  # flatter transversals push the intersections off the canvas
OOD_GRID = 5  # test_ood holds given angles that are not multiples of this
LINES = ("upper", "lower")
SECTORS = (("above", "right"), ("above", "left"), ("below", "left"), ("below", "right"))
PHRASES = {
    "vertical": "are vertical angles", "linear pair": "form a linear pair",
    "corresponding": "are corresponding angles",
    "alternate interior": "are alternate interior angles",
    "alternate exterior": "are alternate exterior angles",
    "same-side interior": "are same-side interior angles",
    "same-side exterior": "are same-side exterior angles",
}


def relation(given: tuple[int, int], unknown: tuple[int, int]) -> str | None:
    """Textbook name of the angle pair ((line, sector), (line, sector)), or None if it has none."""
    (i, s), (j, t) = given, unknown
    if (i, s) == (j, t):
        return None
    if i == j:
        return "vertical" if t == (s + 2) % 4 else "linear pair"
    if t == s:
        return "corresponding"
    # Interior = between the two lines: below the upper line, above the lower one.
    interior_s, interior_t = (s >= 2) == (i == 0), (t >= 2) == (j == 0)
    if t == (s + 2) % 4:
        return "alternate interior" if interior_s else "alternate exterior"
    if (s in (0, 3)) == (t in (0, 3)) and interior_s == interior_t:
        return "same-side interior" if interior_s else "same-side exterior"
    return None


def angle_pairs(two_step: bool) -> list[tuple[tuple[int, int], tuple[int, int], str]]:
    """All named (given, unknown, relation) triples; one intersection only unless `two_step`."""
    pairs = []
    for i in range(2):
        for s in range(4):
            for j in range(2):
                for t in range(4):
                    name = relation((i, s), (j, t))
                    if name is not None and (two_step or i == j):
                        pairs.append(((i, s), (j, t), name))
    return pairs


def sample(rng, config):
    step = config.angle_step
    alpha = pick(rng, [a for a in range(ANGLE_MIN + (-ANGLE_MIN) % step, ANGLE_MAX + 1, step) if a != 90])
    given, unknown, name = pick(rng, angle_pairs(config.two_step))
    layout = {"gap": round(float(rng.uniform(34, 44)), 2), "shift": round(float(rng.uniform(-8, 8)), 2),
              "rotation": round(float(rng.uniform(-config.rotation_max, config.rotation_max)), 2),
              "jitter": [round(float(v), 3) for v in rng.uniform(-1, 1, size=4)]}
    return {"alpha": alpha, "given": list(given), "unknown": list(unknown), "relation": name}, layout


def solve(params) -> ExactAnswer:
    alpha = params["alpha"]
    same = params["given"][1] % 2 == params["unknown"][1] % 2
    return ExactAnswer(Fraction(alpha if same else 180 - alpha))


def is_ood(params) -> bool:
    return params["alpha"] % OOD_GRID != 0


def _where(position) -> str:
    line, sector = position
    vertical, side = SECTORS[sector]
    return f"{vertical} the {LINES[line]} line, {side} of the transversal"


def questions(params, layout, text: bool) -> tuple[str, ...]:
    asked = ("The two lines marked with arrows are parallel. Find x in degrees.",
             "The lines marked with arrows are parallel. What is x in degrees?",
             "Given the parallel lines, determine x in degrees.")
    if not text:
        return asked
    stated = (f"Two parallel lines are cut by a transversal. The angle of {params['alpha']} degrees and "
              f"the angle x {PHRASES[params['relation']]}.")
    return tuple(f"{stated} {q}" for q in asked)


def rationale(params, layout, text: bool) -> Rationale:
    alpha, phrase = params["alpha"], PHRASES[params["relation"]]
    x = solve(params).latex()
    if text:
        observation = f"The question says the angle of {alpha} degrees and x {phrase}."
        steps = []
    else:
        observation = (f"The angle labelled {alpha} degrees is {_where(params['given'])}; "
                       f"x is {_where(params['unknown'])}.")
        steps = [f"So x and the angle of {alpha} degrees {phrase}."]
    if x == str(alpha):
        steps += ["Such angles are equal.", f"x = {alpha}."]
    else:
        steps += ["Such angles add up to 180 degrees.", f"x = 180 - {alpha} = {x}."]
    return Rationale(goal="Find the angle x in degrees.", observation=observation, steps=tuple(steps),
                     conclusion=f"x = {x} degrees.")


def _sector_span(params, sector: int) -> tuple[float, float]:
    """(start, end) figure angles of a sector, before rotation."""
    alpha, (_, s) = params["alpha"], params["given"]
    phi = alpha if s % 2 == 0 else 180 - alpha
    return ((0, phi), (phi, 180), (180, 180 + phi), (180 + phi, 360))[sector]


def _intersections(params, layout) -> np.ndarray:
    """Figure coordinates [2, 2] (origin at the image centre, y up) of the upper and lower crossings."""
    alpha, (_, s) = params["alpha"], params["given"]
    phi = math.radians(alpha if s % 2 == 0 else 180 - alpha)
    half = layout["gap"] / 2
    run = half / math.tan(phi)
    return np.array([[layout["shift"] + run, half], [layout["shift"] - run, -half]])


def visual_facts(params, layout) -> dict:
    return {
        "description": "Two parallel lines (marked with arrows) cut by a transversal; one angle is "
                       "labelled in degrees and another is x.",
        "objects": [{"name": "angle", "attributes": {"label": f"{params['alpha']} degrees"},
                     "position": _where(params["given"])},
                    {"name": "angle", "attributes": {"label": "x"}, "position": _where(params["unknown"])}],
        "quantities": {"given_angle": params["alpha"], "relation": params["relation"]},
    }


def render(params, layout, config, show_labels: bool):
    image, pen = draw.canvas(config.image_size)
    size, rot = config.image_size, layout["rotation"]

    def to_image(points):
        points = draw.rotate(np.atleast_2d(points), rot)
        return np.stack([size / 2 + points[:, 0], size / 2 - points[:, 1]], axis=1)

    crossings = _intersections(params, layout)
    half = layout["gap"] / 2
    for y in (half, -half):
        ends = to_image([[-size, y], [size, y]])
        pen.line([tuple(ends[0]), tuple(ends[1])], fill=draw.BLACK, width=config.line_width)
        for dx in (-size * 0.36, -size * 0.36 + 5):  # double chevrons: these two lines are parallel
            chevron = to_image([[dx - 4, y + 3], [dx, y], [dx - 4, y - 3]])
            pen.line([tuple(p) for p in chevron], fill=draw.BLACK, width=1)
    phi = math.radians(_sector_span(params, 0)[1])
    upward = np.array([math.cos(phi), math.sin(phi)])  # the transversal's upward ray, figure frame
    ends = to_image([crossings[0] + upward * 26, crossings[1] - upward * 26])
    pen.line([tuple(ends[0]), tuple(ends[1])], fill=draw.BLACK, width=config.line_width)

    jitter = np.asarray(layout["jitter"]).reshape(2, 2) * config.label_jitter
    marks = ((params["given"], f"{params['alpha']}°"), (params["unknown"], "x"))
    for k, ((line, sector), text) in enumerate(marks):
        if k == 0 and not show_labels:
            continue
        start, end = _sector_span(params, sector)
        vertex = to_image(crossings[line])[0]
        draw.arc(pen, vertex, 8, start + rot, end + rot)
        distance = min(max(11 / math.sin(math.radians(end - start) / 2), 15), 24)
        anchor = vertex + draw.direction((start + end) / 2 + rot) * distance + jitter[k]
        draw.label(pen, text, draw.clamp_to_canvas(anchor, size))
    return image


FAMILY = Family("parallel", sample, solve, is_ood, questions, rationale, visual_facts, render)
