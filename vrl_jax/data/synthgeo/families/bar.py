"""`bar`: read a bar chart with gridlines; one bar's value, the largest value, a sum or a difference."""
from __future__ import annotations

from fractions import Fraction

from vrl_jax.data.synthgeo import draw
from vrl_jax.data.synthgeo.answers import ExactAnswer
from vrl_jax.data.synthgeo.family import Family, Rationale, pick, randint

IID_VALUE_MAX = 12  # test_ood holds charts with a taller bar
NAMES = "ABCDE"
BAR_COLORS = ("blue", "green", "red")


def sample(rng, config):
    n = randint(rng, 3, 5) if config.two_step else 3
    values = [randint(rng, 1, config.number_max) for _ in range(n)]
    ask = pick(rng, ("value", "max", "diff", "sum") if config.two_step else ("value", "max"))
    order = [int(i) for i in rng.permutation(n)]
    bars = {"value": order[:1], "max": [], "diff": order[:2], "sum": sorted(order[:2])}[ask]
    axis_max = max(config.number_max, *values)
    layout = {"axis_max": axis_max + axis_max % 2, "color": pick(rng, BAR_COLORS)}
    return {"values": values, "ask": ask, "bars": bars}, layout


def solve(params) -> ExactAnswer:
    v, bars = params["values"], params["bars"]
    return ExactAnswer(Fraction({
        "value": lambda: v[bars[0]], "max": lambda: max(v),
        "diff": lambda: v[bars[0]] - v[bars[1]], "sum": lambda: v[bars[0]] + v[bars[1]],
    }[params["ask"]]()))


def is_ood(params) -> bool:
    return max(params["values"]) > IID_VALUE_MAX


def _listing(values) -> str:
    parts = [f"{NAMES[i]} = {v}" for i, v in enumerate(values)]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def questions(params, layout, text: bool) -> tuple[str, ...]:
    names = [NAMES[i] for i in params["bars"]]
    asked = {
        "value": lambda: (f"What is the value of bar {names[0]}?",
                          f"In the bar chart, what value does bar {names[0]} show?",
                          f"Read the value of bar {names[0]} from the chart."),
        "max": lambda: ("What is the largest value in the bar chart?",
                        "Which value does the tallest bar show?", "Read the value of the tallest bar."),
        "diff": lambda: (f"What is the value of bar {names[0]} minus the value of bar {names[1]}?",
                         f"In the bar chart, what is bar {names[0]} minus bar {names[1]}?",
                         f"Compute bar {names[0]} minus bar {names[1]} from the chart."),
        "sum": lambda: (f"What is the sum of the values of bars {names[0]} and {names[1]}?",
                        f"In the bar chart, what do bars {names[0]} and {names[1]} add up to?",
                        f"Compute bar {names[0]} plus bar {names[1]} from the chart."),
    }[params["ask"]]()
    if not text:
        return asked
    return tuple(f"A bar chart shows {_listing(params['values'])}. {q}" for q in asked)


def rationale(params, layout, text: bool) -> Rationale:
    v, bars, ask = params["values"], params["bars"], params["ask"]
    answer = solve(params).latex()
    source = "The question lists" if text else "Reading each bar against the gridlines gives"
    if ask == "value":
        goal, steps = f"Find the value of bar {NAMES[bars[0]]}.", (f"Bar {NAMES[bars[0]]} has value {answer}.",)
    elif ask == "max":
        goal, steps = "Find the largest value.", (f"The largest of {', '.join(map(str, v))} is {answer}.",)
    else:
        sign = "-" if ask == "diff" else "+"
        a, b = (NAMES[i] for i in bars)
        goal = f"Find bar {a} {'minus' if ask == 'diff' else 'plus'} bar {b}."
        steps = (f"{a} {sign} {b} = {v[bars[0]]} {sign} {v[bars[1]]} = {answer}.",)
    return Rationale(goal=goal, observation=f"{source} {_listing(v)}.", steps=steps,
                     conclusion=f"The answer is {answer}.")


def visual_facts(params, layout) -> dict:
    return {
        "description": f"A bar chart with {len(params['values'])} bars named {NAMES[:len(params['values'])]}, "
                       f"a y axis from 0 to {layout['axis_max']} and horizontal gridlines.",
        "objects": [{"name": "bar", "attributes": {"name": NAMES[i], "value": v}, "position": i}
                    for i, v in enumerate(params["values"])],
        "quantities": {NAMES[i]: v for i, v in enumerate(params["values"])},
    }


def render(params, layout, config, show_labels: bool):
    image, pen = draw.canvas(config.image_size)
    size, top = config.image_size, 8
    left, bottom, right = 22, size - 16, size - 6
    axis_max = layout["axis_max"]
    unit = (bottom - top) / axis_max
    grid_step = 1 if axis_max <= IID_VALUE_MAX else 2  # keeps gridlines >= 6 px apart at 112 px
    for v in range(0, axis_max + 1, grid_step):
        y = bottom - v * unit
        pen.line([(left, y), (right, y)], fill=draw.GREY, width=1)
        if show_labels and v % (2 * grid_step) == 0:
            draw.label(pen, str(v), (left - 9, y), size=9, halo=False)
    slot = (right - left) / len(params["values"])
    for i, v in enumerate(params["values"]):
        x0 = left + slot * (i + 0.2)
        pen.rectangle((x0, bottom - v * unit, x0 + slot * 0.6, bottom), fill=draw.COLORS[layout["color"]],
                      outline=draw.BLACK)
        draw.label(pen, NAMES[i], (x0 + slot * 0.3, bottom + 8), size=10, halo=False)
    pen.line([(left, top), (left, bottom), (right, bottom)], fill=draw.BLACK, width=1)
    return image


FAMILY = Family("bar", sample, solve, is_ood, questions, rationale, visual_facts, render)
