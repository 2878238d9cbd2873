"""`count`: how many shapes of one kind (or one colour) are in the picture.

Targets and distractors sit in distinct cells of a coarse grid, so they never overlap; the answer is
the number of targets drawn, known before drawing.
"""
from __future__ import annotations

from collections import Counter
from fractions import Fraction

from vrl_jax.data.synthgeo import draw
from vrl_jax.data.synthgeo.answers import ExactAnswer
from vrl_jax.data.synthgeo.family import Family, Rationale, pick, randint

SHAPES = ("circle", "square", "triangle")
COLOR_NAMES = tuple(draw.COLORS)
IID_COUNT_MAX = 6  # test_ood holds the counts above this
CELL_PX = 22  # about the grid cell side: 5x5 cells at 112 px
MARGIN_PX = 3


def _plural(shape: str, n: int = 2) -> str:
    return shape if n == 1 else shape + "s"


def _target_phrase(params) -> str:
    """'triangles' or 'red shapes'."""
    return _plural(params["target"]) if params["ask"] == "shape" else f"{params['target']} shapes"


def _is_target(obj, params) -> bool:
    return obj[params["ask"]] == params["target"]


def sample(rng, config):
    ask = pick(rng, ("shape", "color"))
    target = pick(rng, SHAPES if ask == "shape" else COLOR_NAMES)
    count = randint(rng, 1, config.count_max)
    distractors = randint(rng, 0, config.distractor_max)
    params = {"ask": ask, "target": target, "count": count, "distractors": distractors}

    grid = max(4, config.image_size // CELL_PX)
    cell = (config.image_size - 2 * MARGIN_PX) / grid
    cells = rng.permutation(grid * grid)[: count + distractors]
    others = [v for v in (SHAPES if ask == "shape" else COLOR_NAMES) if v != target]
    objects = []
    for i, c in enumerate(cells):
        free = COLOR_NAMES if ask == "shape" else SHAPES
        fixed = target if i < count else pick(rng, others)
        value = {ask: fixed, ("color" if ask == "shape" else "shape"): pick(rng, free)}
        size = round(cell * float(rng.uniform(0.5, 0.72)))
        slack = (cell - size) / 2
        x = MARGIN_PX + (int(c) % grid + 0.5) * cell + float(rng.uniform(-slack, slack))
        y = MARGIN_PX + (int(c) // grid + 0.5) * cell + float(rng.uniform(-slack, slack))
        objects.append({"shape": value["shape"], "color": value["color"], "x": round(x), "y": round(y),
                        "size": size})
    # Cells were drawn at random, so listing objects in reading order hides which were targets.
    objects.sort(key=lambda o: (o["y"] // cell, o["x"]))
    return params, {"objects": objects}


def solve(params) -> ExactAnswer:
    return ExactAnswer(Fraction(params["count"]))


def is_ood(params) -> bool:
    return params["count"] > IID_COUNT_MAX


def _inventory(objects) -> str:
    """'2 red triangles, 1 blue circle and 3 green squares', in a fixed colour/shape order."""
    groups = Counter((o["color"], o["shape"]) for o in objects)
    parts = [f"{n} {color} {_plural(shape, n)}" for (color, shape), n in sorted(groups.items())]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def questions(params, layout, text: bool) -> tuple[str, ...]:
    what = _target_phrase(params)
    asked = (f"How many {what} are in the image?", f"Count the {what} in the picture.",
             f"What is the number of {what} shown?")
    if not text:
        return asked
    return tuple(f"The picture shows {_inventory(layout['objects'])}. {q}" for q in asked)


def rationale(params, layout, text: bool) -> Rationale:
    what = _target_phrase(params)
    objects = layout["objects"]
    source = "The question lists" if text else "The image shows"
    targets = [o for o in objects if _is_target(o, params)]
    addends = [str(n) for _, n in sorted(Counter((o["color"], o["shape"]) for o in targets).items())]
    steps = [f"The {what} are {_inventory(targets)}."]
    if len(addends) > 1:
        steps.append(f"{' + '.join(addends)} = {len(targets)}.")
    return Rationale(goal=f"Count the {what}.", observation=f"{source} {_inventory(objects)}.",
                     steps=tuple(steps), conclusion=f"There {'is' if len(targets) == 1 else 'are'} {len(targets)} "
                                f"{what[:-1] if len(targets) == 1 else what}.")


def visual_facts(params, layout) -> dict:
    objects = layout["objects"]
    return {
        "description": f"{len(objects)} coloured shapes on a white background.",
        "objects": [{"name": o["shape"], "attributes": {"color": o["color"]}, "position": [o["x"], o["y"]]}
                    for o in objects],
        "quantities": {"targets": params["count"], "objects": len(objects)},
    }


def render(params, layout, config, show_labels: bool):
    image, pen = draw.canvas(config.image_size)
    for o in layout["objects"]:
        draw.shape(pen, o["shape"], (o["x"], o["y"]), o["size"], draw.COLORS[o["color"]])
    return image


FAMILY = Family("count", sample, solve, is_ood, questions, rationale, visual_facts, render)
