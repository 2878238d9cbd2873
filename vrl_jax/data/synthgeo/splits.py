"""Split assignment by a hash of the problem's semantic parameters, never its layout.

`test_ood` holds exactly the problems in a family's held-out parameter region (`Family.is_ood`);
every other problem goes to `train`, `val` or `test_iid` by `sha256(family, params) mod 100`. A
semantic problem therefore lives in one split only, whatever its picture looks like, and a text
twin shares its split with the vision item it restates.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from vrl_jax.data.synthgeo.family import Family

SPLITS = ("train", "val", "test_iid", "test_ood")
# Hash buckets (of 100) for the in-distribution splits; the shares are of problems, not of items.
IID_BUCKETS = {"train": range(0, 80), "val": range(80, 90), "test_iid": range(90, 100)}


def semantic_key(family: str, params: Mapping[str, Any]) -> str:
    """Canonical JSON of (family, params): equal strings <=> the same problem."""
    return json.dumps([family, params], sort_keys=True, separators=(",", ":"))


def bucket(key: str) -> int:
    """Stable bucket in [0, 100) of a semantic key (sha256, so independent of PYTHONHASHSEED)."""
    return int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:16], 16) % 100


def split_of(family: Family, params: Mapping[str, Any]) -> str:
    """The one split the problem `(family, params)` may appear in."""
    if family.is_ood(params):
        return "test_ood"
    b = bucket(semantic_key(family.name, params))
    return next(split for split, buckets in IID_BUCKETS.items() if b in buckets)


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return split
