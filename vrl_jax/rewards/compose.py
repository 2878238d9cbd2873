"""Rewards composed by name and weight from a config; every component is returned for logging.

A spec is either a plain ``{name: weight}`` mapping (or a list of one-entry mappings / pairs), or a
mapping with these keys (all plain values, so an ``ml_collections.ConfigDict`` works)::

    weights:   {name: weight}            # summed into "total"
    params:    {name: {keyword: value}}  # keyword arguments of that reward function
    overrides: {name: value}             # where component `name` is non-zero, total := value
    judge:     {JudgeConfig fields}      # for "accuracy"
    plugins:   {name: "package.module:function"}  # names for your own reward functions

``name`` is a built-in (``BUILTINS``), a name given in ``plugins`` (the way to use your own reward from a
config file, whose keys cannot hold dots), or ``"package.module:function"``. A reward function is
``fn(completions: list[str], examples: list[dict], **kw) -> array [B]``; it also receives, if its
signature names them, the context ``judge`` (an ``AnswerJudge``), ``lengths`` (int [B], response
tokens) and ``truncated`` (bool [B], no stop token).
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from vrl_jax.rewards.formatting import answer_flag_format, maye_format, r1_format
from vrl_jax.rewards.judge import AnswerJudge
from vrl_jax.rewards.penalties import language_penalty, maye_penalty, soft_overlong

_SPEC_KEYS = ("weights", "params", "overrides", "judge", "plugins")
CONTEXT_KEYS = ("judge", "lengths", "truncated")


def accuracy(completions: Sequence[str], examples: Sequence[Mapping], *, judge: AnswerJudge,
             answer_key: str = "answer") -> np.ndarray:
    """float32 [B]: 1 where the judge accepts the completion against ``example[answer_key]``.

    MAYE reproduction runs use ``answer_key="solution"`` (MAYE judges against its solution field).
    """
    golds = []
    for i, ex in enumerate(examples):
        if answer_key not in ex:
            raise KeyError(f"accuracy: example {i} has no field {answer_key!r} (fields: {sorted(ex)})")
        golds.append(ex[answer_key])
    return np.array([v.correct for v in judge.judge_batch(list(completions), golds)], np.float32)


BUILTINS: dict[str, Callable[..., Any]] = {
    "accuracy": accuracy,
    "r1_format": r1_format,
    "answer_flag_format": answer_flag_format,
    "maye_format": maye_format,
    "language": language_penalty,
    "maye_penalty": maye_penalty,
    "soft_overlong": soft_overlong,
}


def _plain(obj: Any) -> Any:
    """ConfigDict / FrozenConfigDict -> dict, recursively."""
    if hasattr(obj, "to_dict"):
        obj = obj.to_dict()
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    return obj


def resolve_reward(name: str, plugins: Mapping[str, str] | None = None) -> Callable[..., Any]:
    """A built-in by name, a function `plugins` names (``{name: "package.module:attr.path"}``), or a function
    imported from ``"package.module:attr.path"``."""
    if name in BUILTINS:
        return BUILTINS[name]
    if plugins and name in plugins:
        path = plugins[name]
        if not isinstance(path, str) or ":" not in path:
            raise ValueError(f"plugins[{name!r}]: expected 'package.module:function', got {path!r}")
        try:
            return resolve_reward(path)
        except ValueError as exc:
            raise ValueError(f"plugins[{name!r}]: {exc}") from None
    if ":" not in name:
        raise ValueError(f"reward {name!r}: unknown name; built-ins are {sorted(BUILTINS)}, "
                         "or give a plugin as 'package.module:function'")
    module_name, _, attr_path = name.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"reward {name!r}: cannot import module {module_name!r}: {exc}") from exc
    for attr in attr_path.split("."):
        if not hasattr(obj, attr):
            raise ValueError(f"reward {name!r}: module {module_name!r} has no attribute {attr_path!r}")
        obj = getattr(obj, attr)
    if not callable(obj):
        raise ValueError(f"reward {name!r}: {attr_path!r} is a {type(obj).__name__}, not a function")
    return obj


def _weights(raw: Any, where: str) -> dict[str, float]:
    """``{name: w}``, ``[{name: w}, ...]`` or ``[(name, w), ...]`` -> ordered ``{name: float}``."""
    raw = _plain(raw)
    items: list[tuple[Any, Any]] = []
    if isinstance(raw, Mapping):
        items = list(raw.items())
    elif isinstance(raw, (list, tuple)):
        for k, entry in enumerate(raw):
            entry = _plain(entry)
            if isinstance(entry, Mapping) and len(entry) == 1:
                items.append(next(iter(entry.items())))
            elif isinstance(entry, (list, tuple)) and len(entry) == 2:
                items.append((entry[0], entry[1]))
            else:
                raise ValueError(f"{where}[{k}]: expected {{name: weight}} or (name, weight), got {entry!r}")
    else:
        raise ValueError(f"{where}: expected a mapping or list of {{name: weight}}, got {type(raw).__name__}")
    out: dict[str, float] = {}
    for name, value in items:
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where}: reward names must be non-empty strings, got {name!r}")
        if name in out:
            raise ValueError(f"{where}: reward {name!r} is listed twice")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
            raise ValueError(f"{where}[{name!r}]: expected a finite number, got {value!r}")
        out[name] = float(value)
    return out


@dataclasses.dataclass(frozen=True)
class RewardSpec:
    """A parsed spec: weighted components, their parameters, overrides, judge options and plugin names."""

    weights: dict[str, float]
    params: dict[str, dict[str, Any]]
    overrides: dict[str, float]
    judge: dict[str, Any]
    plugins: dict[str, str] = dataclasses.field(default_factory=dict)

    @classmethod
    def parse(cls, spec: Any) -> "RewardSpec":
        spec = _plain(spec)
        if isinstance(spec, Mapping) and spec and set(spec) <= set(_SPEC_KEYS):
            weights = _weights(spec.get("weights", {}), "weights")
            overrides = _weights(spec.get("overrides", {}), "overrides")
            params, judge = spec.get("params", {}) or {}, spec.get("judge", {}) or {}
            plugins = spec.get("plugins", {}) or {}
        else:
            weights, overrides, params, judge, plugins = _weights(spec, "rewards"), {}, {}, {}, {}
        if not weights and not overrides:
            raise ValueError("reward spec: no rewards given (expected at least one {name: weight})")
        if not isinstance(params, Mapping) or not all(isinstance(v, Mapping) for v in params.values()):
            raise ValueError(f"params: expected {{name: {{keyword: value}}}}, got {params!r}")
        stray = sorted(set(params) - set(weights) - set(overrides))
        if stray:
            raise ValueError(f"params: {stray} are not in weights or overrides ({sorted({**weights, **overrides})})")
        if not isinstance(judge, Mapping):
            raise ValueError(f"judge: expected a mapping of JudgeConfig options, got {judge!r}")
        if not isinstance(plugins, Mapping):
            raise ValueError(f"plugins: expected {{name: 'package.module:function'}}, got {plugins!r}")
        shadowed = sorted(set(plugins) & set(BUILTINS))
        if shadowed:
            raise ValueError(f"plugins: {shadowed} are built-in reward names; give your functions other names")
        return cls(weights, {k: dict(v) for k, v in params.items()}, overrides, dict(judge), dict(plugins))


class RewardSet:
    """Built once from a spec, called every step: ``rewards(completions, examples, lengths=...)``.

    Owns the ``AnswerJudge`` it creates from ``spec.judge`` when a component needs one and none is
    given (a given ``judge`` takes precedence over ``spec.judge``); ``close()`` stops it.
    """

    def __init__(self, spec: Any, *, judge: AnswerJudge | None = None):
        self.spec = RewardSpec.parse(spec)
        self._fns: dict[str, Callable[..., Any]] = {}
        self._context_names: dict[str, tuple[str, ...]] = {}
        for name in {**self.spec.weights, **self.spec.overrides}:
            fn = resolve_reward(name, self.spec.plugins)
            try:
                sig = inspect.signature(fn)
                sig.bind_partial(None, None, **self.spec.params.get(name, {}))
            except TypeError as exc:
                raise ValueError(f"reward {name!r}: bad params {self.spec.params.get(name, {})}: {exc}") from exc
            missing = [p.name for p in sig.parameters.values()
                       if p.kind is p.KEYWORD_ONLY and p.default is p.empty
                       and p.name not in self.spec.params.get(name, {}) and p.name not in CONTEXT_KEYS]
            if missing:
                raise ValueError(f"reward {name!r}: missing params {missing}; set them under params.{name}")
            takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
            self._context_names[name] = tuple(k for k in CONTEXT_KEYS if takes_kwargs or k in sig.parameters)
            self._fns[name] = fn
        needs_judge = any("judge" in names for names in self._context_names.values())
        self._owns_judge = judge is None and needs_judge
        self.judge = AnswerJudge(self.spec.judge) if self._owns_judge else judge

    def close(self) -> None:
        if self._owns_judge and self.judge is not None:
            self.judge.close()

    def __enter__(self) -> "RewardSet":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __call__(self, completions: Sequence[str], examples: Sequence[Mapping], *,
                 lengths=None, truncated=None) -> dict[str, np.ndarray]:
        """Every component (float32 [B], unweighted) and ``"total"`` (weighted sum, then overrides)."""
        batch = len(completions)
        if len(examples) != batch:
            raise ValueError(f"compute_rewards: {batch} completions but {len(examples)} examples")
        context = {"judge": self.judge, "lengths": lengths, "truncated": truncated}
        out: dict[str, np.ndarray] = {}
        for name, fn in self._fns.items():
            kwargs = {**self.spec.params.get(name, {}),
                      **{k: context[k] for k in self._context_names[name] if context[k] is not None}}
            try:
                value = fn(list(completions), list(examples), **kwargs)
            except Exception as exc:
                if hasattr(exc, "add_note"):
                    exc.add_note(f"(while computing reward {name!r})")
                raise
            out[name] = _checked(name, value, batch)
        total = np.zeros(batch, np.float32)
        for name, weight in self.spec.weights.items():
            total += np.float32(weight) * out[name]
        for name, value in self.spec.overrides.items():
            total = np.where(out[name] != 0, np.float32(value), total)
        out["total"] = total.astype(np.float32)
        return out


def _checked(name: str, value: Any, batch: int) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"reward {name!r} returned {type(value).__name__}, not numbers: {exc}") from exc
    if arr.shape != (batch,):
        raise ValueError(f"reward {name!r} returned shape {arr.shape}; expected ({batch},), one per completion")
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise ValueError(f"reward {name!r} returned non-finite values at indices {bad[:10].tolist()}")
    return arr


def compute_rewards(completions: Sequence[str], examples: Sequence[Mapping], spec: Any, *,
                    lengths=None, truncated=None, judge: AnswerJudge | None = None) -> dict[str, np.ndarray]:
    """One-shot ``RewardSet(spec, judge=judge)(completions, examples, ...)``; closes what it started.

    A training loop should build a ``RewardSet`` once instead, to keep the judge's server warm.
    """
    with RewardSet(spec, judge=judge) as rewards:
        return rewards(completions, examples, lengths=lengths, truncated=truncated)
