"""pass@k: the unbiased estimator, MAYE's any-of-k, and MAYE's three evaluation generation settings.

With n samples per problem of which c are correct, the unbiased estimator of the probability that at
least one of k samples is correct is `1 - C(n-c, k) / C(n, k)` (Chen et al. 2021). It is computed as
`1 - prod_{i=n-c+1}^{n} (1 - k / i)`, which never forms a binomial coefficient (C(2048, 8) overflows
float64 long before the ratio does) and is exactly 1 when n - c < k.

MAYE's "pass@8" is not that estimator: it draws exactly 8 samples and counts a problem correct when
any one is (`correct |= judge(pred_i)`). With n == k the two coincide; with n > k they differ.
"""
from __future__ import annotations

import dataclasses

import numpy as np

# MAYE's split names inside its metric keys ("acc/Validation Set Epoch Accuracy ...").
SPLIT_TITLES = {"train": "Training", "training": "Training", "val": "Validation",
                "valid": "Validation", "validation": "Validation", "test": "Test"}


def _counts(n, c) -> tuple[np.ndarray, np.ndarray]:
    n = np.asarray(n)
    c = np.asarray(c)
    if n.shape != c.shape:
        raise ValueError(f"`n` and `c` must have the same shape; got {n.shape} and {c.shape}")
    for name, x in (("n", n), ("c", c)):
        if x.size and not np.issubdtype(x.dtype, np.integer) and not np.all(x == np.round(x)):
            raise ValueError(f"`{name}` must hold whole numbers of samples")
    n, c = n.astype(np.int64), c.astype(np.int64)
    if np.any(c < 0) or np.any(c > n):
        raise ValueError("need 0 <= c <= n for every problem")
    return n, c


def pass_at_k(n, c, k: int) -> np.ndarray:
    """Unbiased pass@k per problem.

    Args:
      n: int `[P]` (or any shape) samples drawn per problem.
      c: int, same shape, how many of them are correct.
      k: samples the metric imagines drawing; needs 1 <= k <= n for every problem.
    Returns:
      float64, same shape as n: `1 - C(n-c, k) / C(n, k)`.
    """
    n, c = _counts(n, c)
    if k < 1:
        raise ValueError(f"k must be >= 1; got {k}")
    if np.any(n < k):
        raise ValueError(f"pass@{k} needs at least k samples per problem; smallest n is {int(n.min())}")
    out = np.empty(n.shape, dtype=np.float64)
    for idx in np.ndindex(n.shape):
        ni, ci = int(n[idx]), int(c[idx])
        if ni - ci < k:
            out[idx] = 1.0  # every k-subset contains a correct sample
        else:
            out[idx] = 1.0 - np.prod(1.0 - k / np.arange(ni - ci + 1, ni + 1, dtype=np.float64))
    return out


def mean_pass_at_k(n, c, k: int) -> float:
    """Benchmark pass@k: the mean of `pass_at_k` over problems (0 problems -> 0)."""
    values = pass_at_k(n, c, k)
    return float(values.mean()) if values.size else 0.0


def any_of_k(correct) -> np.ndarray:
    """MAYE's pass@k: bool `[P, k]` (k independent generations per problem) -> bool `[P]`, any correct."""
    arr = np.asarray(correct)
    if arr.ndim != 2:
        raise ValueError(f"`correct` must be [problems, k]; got shape {arr.shape}")
    return arr.astype(bool).any(axis=1)


def passk_metrics(correct, ks=(1,)) -> dict[str, float]:
    """Summary of a `[P, n]` bool matrix of n samples per problem.

    Returns `pass@k` (unbiased, mean over problems) for each k <= n in `ks`, and `any@n`
    (MAYE's any-of-n, equal to unbiased pass@n) and `mean_correct` (per-sample accuracy).
    """
    arr = np.asarray(correct).astype(bool)
    if arr.ndim != 2:
        raise ValueError(f"`correct` must be [problems, samples]; got shape {arr.shape}")
    p, n = arr.shape
    c = arr.sum(axis=1)
    out = {f"pass@{k}": mean_pass_at_k(np.full(p, n), c, k) for k in ks if k <= n}
    out[f"any@{n}"] = float(any_of_k(arr).mean()) if p else 0.0
    out["mean_correct"] = float(arr.mean()) if arr.size else 0.0
    return out


@dataclasses.dataclass(frozen=True)
class GenerationSetting:
    """One evaluation setting: draw `k` samples per problem at this temperature/top_p; a problem is
    correct when any of them is (k == 1: plain accuracy)."""

    name: str
    k: int
    temperature: float
    top_p: float
    max_tokens: int = 2048

    @property
    def label(self) -> str:
        """MAYE's key suffix, e.g. "pass@1 Temperature=0.01"."""
        return f"pass@{self.k} Temperature={float(self.temperature)}"

    def metric_key(self, split: str) -> str:
        """MAYE's per-epoch key, e.g. `acc/Validation Set Epoch Accuracy pass@8 Temperature=1.0`.

        `split` is a short name ("val", "test") or already a title ("Validation")."""
        title = SPLIT_TITLES.get(split.lower(), split[:1].upper() + split[1:])
        return f"acc/{title} Set Epoch Accuracy {self.label}"


# MAYE's `eval()` strategies, in the order it runs them (reference §3.2). max_tokens 2048 in all three.
MAYE_LOW = GenerationSetting("low", k=1, temperature=0.01, top_p=0.001)
MAYE_MEDIUM = GenerationSetting("medium", k=1, temperature=0.6, top_p=1.0)
MAYE_HIGH = GenerationSetting("high", k=8, temperature=1.0, top_p=1.0)
MAYE_SETTINGS: tuple[GenerationSetting, ...] = (MAYE_LOW, MAYE_MEDIUM, MAYE_HIGH)
TRAIN_ACCURACY_KEY = "acc/Training Set Epoch Accuracy"


def setting_accuracy(correct) -> float:
    """Accuracy of one setting from bool `[P, k]`: the share of problems with any correct sample."""
    hits = any_of_k(correct)
    return float(hits.mean()) if hits.size else 0.0
