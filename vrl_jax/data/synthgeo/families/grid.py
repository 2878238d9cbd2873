"""`grid`: the length of a segment AB between lattice points of a unit grid."""
from __future__ import annotations

from vrl_jax.data.synthgeo import draw
from vrl_jax.data.synthgeo.answers import exact_sqrt, sqrt_equation
from vrl_jax.data.synthgeo.family import Family, Rationale, randint

IID_SPAN_MAX = 8  # test_ood holds segments spanning more grid squares
OOD_SPAN_MAX = 12
INTEGER_SPANS = ((3, 4), (6, 8))  # the non-axis spans with whole lengths that fit the IID grid


def sample(rng, config):
    top = min(config.number_max, OOD_SPAN_MAX)
    if config.irrational:
        q = randint(rng, 1, top)
        p = randint(rng, 0, q)
    elif config.two_step and rng.integers(2):
        p, q = INTEGER_SPANS[int(rng.integers(len(INTEGER_SPANS)))]
    else:
        p, q = 0, randint(rng, 1, top)
    cells = max(10, q + 2)
    horizontal, vertical = (p, q) if rng.integers(2) else (q, p)
    x0, y0 = randint(rng, 1, cells - 1 - horizontal), randint(rng, 1, cells - 1 - vertical)
    # A and B are opposite corners of the span's box; which corner is A is layout.
    corners = [(x0, y0), (x0 + horizontal, y0 + vertical)]
    if rng.integers(2):
        corners = [(x0, y0 + vertical), (x0 + horizontal, y0)]
    if rng.integers(2):
        corners.reverse()
    return {"legs": [p, q]}, {"cells": cells, "a": list(corners[0]), "b": list(corners[1])}


def solve(params):
    p, q = params["legs"]
    return exact_sqrt(p * p + q * q)


def is_ood(params) -> bool:
    return max(params["legs"]) > IID_SPAN_MAX


def questions(params, layout, text: bool) -> tuple[str, ...]:
    asked = ("Each small square of the grid has side length one. Find the length of AB.",
             "The grid squares have side length one. How long is segment AB?",
             "On the unit grid, what is the length of AB?")
    if not text:
        return asked
    (ax, ay), (bx, by) = layout["a"], layout["b"]
    return tuple(f"On a grid of unit squares, A = ({ax}, {ay}) and B = ({bx}, {by}). {q}" for q in asked)


def rationale(params, layout, text: bool) -> Rationale:
    (ax, ay), (bx, by) = layout["a"], layout["b"]
    dx, dy = abs(bx - ax), abs(by - ay)
    answer = solve(params)
    if text:
        observation = (f"From A = ({ax}, {ay}) to B = ({bx}, {by}) the segment moves {dx} units "
                       f"horizontally and {dy} units vertically.")
    else:
        observation = f"Counting grid squares, AB moves {dx} units horizontally and {dy} units vertically."
    if min(dx, dy) == 0:
        steps = (f"AB lies along a grid line, so its length is {max(dx, dy)}.",)
    else:
        total = dx * dx + dy * dy
        steps = (f"By the Pythagorean theorem, AB^2 = {dx}^2 + {dy}^2 = {dx * dx} + {dy * dy} = {total}.",
                 sqrt_equation("AB", total))
    return Rationale(goal="Find the length of AB.", observation=observation, steps=steps,
                     conclusion=f"AB = {answer.plain()}.")


def visual_facts(params, layout) -> dict:
    (ax, ay), (bx, by) = layout["a"], layout["b"]
    return {
        "description": f"A {layout['cells']} by {layout['cells']} grid of unit squares with a segment "
                       f"from A to B.",
        "objects": [{"name": "point", "attributes": {"label": "A"}, "position": [ax, ay]},
                    {"name": "point", "attributes": {"label": "B"}, "position": [bx, by]}],
        "quantities": {"dx": abs(bx - ax), "dy": abs(by - ay)},
    }


def render(params, layout, config, show_labels: bool):
    image, pen = draw.canvas(config.image_size)
    cells, margin = layout["cells"], 6
    step = (config.image_size - 2 * margin) / cells

    def px(point):  # lattice coordinates, y up -> pixels
        return margin + point[0] * step, config.image_size - margin - point[1] * step

    for k in range(cells + 1):
        pen.line([px((k, 0)), px((k, cells))], fill=draw.GREY, width=1)
        pen.line([px((0, k)), px((cells, k))], fill=draw.GREY, width=1)
    a, b = px(layout["a"]), px(layout["b"])
    pen.line([a, b], fill=draw.COLORS["red"], width=2)
    for point, other, name in ((a, b, "A"), (b, a, "B")):
        pen.ellipse((point[0] - 2.5, point[1] - 2.5, point[0] + 2.5, point[1] + 2.5), fill=draw.BLACK)
        away = draw.unit((point[0] - other[0], point[1] - other[1]))
        draw.label(pen, name, draw.clamp_to_canvas((point[0] + away[0] * 8, point[1] + away[1] * 8),
                                                   config.image_size))
    return image


FAMILY = Family("grid", sample, solve, is_ood, questions, rationale, visual_facts, render)
