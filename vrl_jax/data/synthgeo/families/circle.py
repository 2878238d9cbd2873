"""`circle`: circumference, area, or the area of a shaded sector, in terms of pi, of a circle with
a labelled radius or diameter. The shaded share (a half, a quarter, three quarters) is read from
the picture, so area answers are rational multiples of pi."""
from __future__ import annotations

from fractions import Fraction

import numpy as np

from vrl_jax.data.synthgeo import draw
from vrl_jax.data.synthgeo.answers import ExactAnswer
from vrl_jax.data.synthgeo.family import Family, Rationale, pick, randint

IID_RADIUS_MAX = 12  # test_ood holds larger circles
SHADED = ("1", "1/2", "1/4", "3/4")  # share of the disc that is shaded (area questions only)
SHADE = (170, 200, 250)


def radius(params) -> Fraction:
    return Fraction(params["value"]) / (2 if params["given"] == "diameter" else 1)


def sample(rng, config):
    ask = pick(rng, ("area", "circumference"))
    given = pick(rng, ("radius", "diameter")) if config.two_step else "radius"
    if given == "radius":
        value = randint(rng, 1, config.number_max)
    elif config.irrational:  # odd diameters give fractional radii, hence fraction-times-pi answers
        value = randint(rng, 1, 2 * config.number_max)
    else:
        value = 2 * randint(rng, 1, config.number_max)
    shaded = pick(rng, SHADED) if ask == "area" and config.irrational else "1"
    layout = {"angle": round(float(rng.uniform(0, 360)), 2), "fill": round(float(rng.uniform(0.75, 0.95)), 3),
              "jitter": [round(float(v), 3) for v in rng.uniform(-1, 1, size=2)],
              "shade_start": round(float(rng.uniform(0, 360)), 2)}
    return {"ask": ask, "given": given, "value": value, "shaded": shaded}, layout


def solve(params) -> ExactAnswer:
    r = radius(params)
    return ExactAnswer(r * r * Fraction(params["shaded"]) if params["ask"] == "area" else 2 * r, pi=True)


def is_ood(params) -> bool:
    return radius(params) > IID_RADIUS_MAX


def questions(params, layout, text: bool) -> tuple[str, ...]:
    if params["shaded"] == "1":
        what, whose = f"{params['ask']} of the circle", f"circle's {params['ask']}"
    else:
        what, whose = "area of the shaded region", "shaded region's area"
    asked = (f"Find the {what}. Give the answer in terms of pi.", f"What is the {what}, in terms of pi?",
             f"Express the {whose} in terms of pi.")
    if not text:
        return asked
    shade = "" if params["shaded"] == "1" else f", and {params['shaded']} of it is shaded"
    return tuple(f"A circle has {params['given']} {params['value']}{shade}. {q}" for q in asked)


def rationale(params, layout, text: bool) -> Rationale:
    given, value, r = params["given"], params["value"], radius(params)
    if text:
        observation = f"The question gives the {given}, {value}."
    elif given == "radius":
        observation = f"The segment from the centre to the circle is labelled {value}, so the radius is {value}."
    else:
        observation = f"The segment through the centre is labelled {value}, so the diameter is {value}."
    steps = []
    if given == "diameter":
        halving = f"{value}/2" if r.denominator == 1 else ""
        steps.append(f"The radius is half the diameter: r = {halving + ' = ' if halving else ''}{r}.")
    answer = solve(params).plain()
    whole = ExactAnswer(r * r, pi=True).plain()
    if params["ask"] == "circumference":
        steps.append(f"The circumference is 2 * pi * r = 2 * pi * {r} = {answer}.")
    elif params["shaded"] == "1":
        steps.append(f"The area is pi * r^2 = pi * ({r})^2 = {answer}.")
    else:
        observation += f" The shaded sector is {params['shaded']} of the circle."
        steps += [f"The whole circle has area pi * r^2 = pi * ({r})^2 = {whole}.",
                  f"The shaded area is {params['shaded']} * {whole} = {answer}."]
    what = "shaded area" if params["shaded"] != "1" else params["ask"]
    return Rationale(goal=f"Find the {what} in terms of pi.", observation=observation,
                     steps=tuple(steps), conclusion=f"The {what} is {answer}.")


def visual_facts(params, layout) -> dict:
    return {
        "description": f"A circle with its {params['given']} drawn as a segment and labelled.",
        "objects": [{"name": "circle", "attributes": {params["given"]: params["value"]}, "position": "center"}],
        "quantities": {params["given"]: params["value"], "radius": str(radius(params)),
                       "shaded_share": params["shaded"]},
    }


def render(params, layout, config, show_labels: bool):
    image, pen = draw.canvas(config.image_size)
    size = config.image_size
    centre = np.array([size / 2, size / 2])
    r = layout["fill"] * (size / 2 - 14)
    box = (*(centre - r), *(centre + r))
    if params["shaded"] != "1":
        sweep = 360 * float(Fraction(params["shaded"]))
        pen.pieslice(box, layout["shade_start"], layout["shade_start"] + sweep, fill=SHADE,
                     outline=draw.BLACK, width=1)
    pen.ellipse(box, outline=draw.BLACK, width=config.line_width)
    towards = draw.direction(layout["angle"])
    start = centre - towards * r if params["given"] == "diameter" else centre
    pen.line([tuple(start), tuple(centre + towards * r)], fill=draw.BLACK, width=config.line_width)
    pen.ellipse((*(centre - 2), *(centre + 2)), fill=draw.BLACK)
    if show_labels:
        normal = np.array([towards[1], -towards[0]])
        anchor = centre + towards * r * 0.5 + normal * 9 + np.asarray(layout["jitter"]) * config.label_jitter
        draw.label(pen, str(params["value"]), draw.clamp_to_canvas(anchor, size))
    return image


FAMILY = Family("circle", sample, solve, is_ood, questions, rationale, visual_facts, render)
