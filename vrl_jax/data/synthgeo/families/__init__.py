"""The task families, by name, in a fixed order (the order is part of the generator's output)."""
from __future__ import annotations

from vrl_jax.data.synthgeo.families import bar, circle, count, grid, parallel, rect, rtri, tri_angle
from vrl_jax.data.synthgeo.family import Family

FAMILIES: dict[str, Family] = {
    module.FAMILY.name: module.FAMILY
    for module in (count, rect, rtri, tri_angle, parallel, circle, bar, grid)
}


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"unknown synthgeo family {name!r}; expected one of {list(FAMILIES)}")
    return FAMILIES[name]
