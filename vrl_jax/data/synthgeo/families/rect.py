"""`rect`: area or perimeter of a rectangle whose side lengths are written next to its sides."""
from __future__ import annotations

from fractions import Fraction

from vrl_jax.data.synthgeo import draw
from vrl_jax.data.synthgeo.answers import ExactAnswer
from vrl_jax.data.synthgeo.family import Family, Rationale, pick, randint

IID_SIDE_MAX = 12  # test_ood holds rectangles with a longer side


def _width_height(params, layout) -> tuple[int, int]:
    a, b = params["sides"]
    return (a, b) if layout["short_is_width"] else (b, a)


def sample(rng, config):
    ask = pick(rng, ("area", "perimeter")) if config.two_step else "area"
    sides = sorted((randint(rng, 1, config.number_max), randint(rng, 1, config.number_max)))
    layout = {"short_is_width": bool(rng.integers(2)), "height_label_left": bool(rng.integers(2)),
              "jitter": [round(float(v), 3) for v in rng.uniform(-1, 1, size=4)],
              "fill": round(float(rng.uniform(0.6, 0.85)), 3)}
    return {"ask": ask, "sides": sides}, layout


def solve(params) -> ExactAnswer:
    a, b = params["sides"]
    return ExactAnswer(Fraction(a * b) if params["ask"] == "area" else Fraction(2 * (a + b)))


def is_ood(params) -> bool:
    return max(params["sides"]) > IID_SIDE_MAX


def questions(params, layout, text: bool) -> tuple[str, ...]:
    what = params["ask"]
    asked = (f"Find the {what} of the rectangle.", f"What is the {what} of the rectangle shown?",
             f"Compute the rectangle's {what}.")
    if not text:
        return asked
    w, h = _width_height(params, layout)
    return tuple(f"A rectangle has width {w} and height {h}. {q}" for q in asked)


def rationale(params, layout, text: bool) -> Rationale:
    w, h = _width_height(params, layout)
    side = "left" if layout["height_label_left"] else "right"
    observation = (f"The question gives width {w} and height {h}." if text else
                   f"The bottom side is labelled {w} and the {side} side is labelled {h}.")
    value = solve(params).latex()
    if params["ask"] == "area":
        steps = ("The area of a rectangle is width times height.", f"{w} * {h} = {value}.")
    else:
        steps = ("The perimeter of a rectangle is two times the sum of width and height.",
                 f"{w} + {h} = {w + h}.", f"2 * {w + h} = {value}.")
    return Rationale(goal=f"Find the {params['ask']} of the rectangle.", observation=observation,
                     steps=steps, conclusion=f"The {params['ask']} is {value}.")


def _corners(params, layout, size: int):
    """Pixel box (left, top, right, bottom) of the rectangle, sides in proportion to the labels
    but clamped so a 1-by-12 rectangle is still a visible rectangle."""
    w, h = _width_height(params, layout)
    longest = layout["fill"] * (size - 36)
    pw = max(longest * w / max(w, h), 0.28 * longest)
    ph = max(longest * h / max(w, h), 0.28 * longest)
    cx, cy = size / 2, size / 2 - 4
    return cx - pw / 2, cy - ph / 2, cx + pw / 2, cy + ph / 2


def visual_facts(params, layout) -> dict:
    w, h = _width_height(params, layout)
    return {
        "description": "A rectangle with its width written under the bottom side and its height "
                       "beside a vertical side.",
        "objects": [{"name": "rectangle", "attributes": {"width": w, "height": h}, "position": "center"}],
        "quantities": {"width": w, "height": h},
    }


def render(params, layout, config, show_labels: bool):
    image, pen = draw.canvas(config.image_size)
    left, top, right, bottom = _corners(params, layout, config.image_size)
    pen.rectangle((left, top, right, bottom), outline=draw.BLACK, width=config.line_width)
    if show_labels:
        w, h = _width_height(params, layout)
        j = [v * config.label_jitter for v in layout["jitter"]]
        pen_x = left - 10 if layout["height_label_left"] else right + 10
        draw.label(pen, str(w), draw.clamp_to_canvas(((left + right) / 2 + j[0], bottom + 9 + j[1]),
                                                     config.image_size))
        draw.label(pen, str(h), draw.clamp_to_canvas((pen_x + j[2], (top + bottom) / 2 + j[3]),
                                                     config.image_size))
    return image


FAMILY = Family("rect", sample, solve, is_ood, questions, rationale, visual_facts, render)
