"""DyME's visual supervision as two pluggable batch interfaces, and the factory that picks one.

- A ``Checker`` gives each sampled reasoning a *thinking reward* in [0, 1] (DyME's checker,
  reference 3.2): how much of the reference rationale's vocabulary it uses (``lexical``, DyME's
  released run), or does it state the image's facts correctly (``rule_based``, ``http``)?
- A ``Refiner`` turns an example's reference rationale (``hint``) into a memorisation target that
  ends with the answer line in the run's format: the hint as it is (``IdentityRefiner``, DyME's
  released run) or rewritten to be grounded in the image (``rule_based``, ``http``).

Both sit inside the training loop, so neither may raise or stall it. A sample that cannot be
handled gets a documented fallback and is counted by reason in ``stats``:

- checker: ``fallback[i] = True`` and ``scores[i] = fallback_score`` (NaN by default, so a
  ``np.nansum`` of reward components ignores it, as DyME's ``None`` -> NaN does);
- refiner: the reference rationale itself, only normalised to end with the answer line (so every
  refiner output is a complete SFT target whatever happened).

Implementations: ``lexical`` (DyME's ``RewardCalculatorLocal`` + ``ContextRefinerLocal``, the
default), ``rule_based`` (offline, facts are the generator's parameters) and ``http`` (an
OpenAI-compatible server); ``make_visual_supervision(config)`` builds a pair from a plain dict.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import math
import re
import threading
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from vrl_jax.rewards.extract import boxed_spans

ANSWER_FLAG = "Answer:"  # DyME's RL_CONFIG["answer_flag"]
ANSWER_FORMATS = ("flag", "boxed")
IMAGE_TAG = "<image>"
# The answer flag in any case, also in markdown ("**Answer:**", "Answer**:").
_FLAG = re.compile(re.escape(ANSWER_FLAG[:-1]) + r"\**\s*:", re.IGNORECASE)

# Fallback reasons, the keys under which `SupervisionStats` counts them.
NO_FACTS = "no_facts"        # checker: the example carries no visual facts to hold reasoning to
ERROR = "error"              # an unexpected exception inside one item (caught, never re-raised)
TIMEOUT = "timeout"          # http: the request exceeded its timeout
CONNECTION = "connection"    # http: refused / reset / unreachable, after the retries
HTTP_STATUS = "http_status"  # http: a non-2xx status, after the retries where retrying applies
PARSE = "parse"              # http: the reply was not the JSON or the text we asked for
BUDGET = "budget"            # http: the batch wall-clock budget ran out before the item finished


# ---------------------------------------------------------------------------------------------
# Examples and facts


@dataclasses.dataclass(frozen=True)
class VisualExample:
    """What visual supervision needs from a dataset example.

    Attributes:
      question: the question without the prompt template and without ``<image>`` tags.
      hint: the reference rationale (DyME's ``hint``); may be empty.
      answer: the bare gold answer, e.g. ``"15"`` or ``"36\\pi"``.
      facts: flat ``name -> number | string`` visual facts (see ``flatten_facts``).
      description: an optional one-sentence description of the image.
      answer_format: ``"flag"`` (``Answer: 15``) or ``"boxed"`` (``\\boxed{15}``), or None for the
        implementation's default.
    """

    question: str
    hint: str
    answer: str
    facts: Mapping[str, Any]
    description: str = ""
    answer_format: str | None = None


def _get(obj: Any, key: str) -> Any:
    """A field of a mapping or an attribute of an object (``vrl_jax.data.formats.Example``)."""
    if isinstance(obj, Mapping):
        return obj.get(key)
    return getattr(obj, key, None)


def _raw_facts(ex: Any) -> Any:
    """The facts wherever a loader put them: top level (synthgeo records' `visual_facts`, DyME's
    `visual_fact` JSON string) or under `meta` (MAYE records, `Example.meta`)."""
    for holder in (ex, _get(ex, "meta") or {}):
        for key in ("visual_facts", "visual_fact", "facts"):
            value = _get(holder, key)
            if value is not None:
                return value
    return None


def flatten_facts(raw: Any) -> tuple[dict[str, Any], str]:
    """``(facts, description)`` from a facts object in any of the shapes the data uses.

    - a JSON string is parsed first (DyME's export stores ``visual_fact`` as a string);
    - a mapping with ``quantities`` (synthgeo: "what a checker can hold the reasoning to") uses
      those and takes ``description`` as the description; ``objects`` are not facts by themselves;
    - any other mapping is ``name -> value`` already;
    - lists become ``name[i]`` entries and nested mappings ``name.key`` entries; None, booleans
      and empty strings are dropped (nothing a reasoning could state as a value).
    """
    if raw is None:
        return {}, ""
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError:
            return {}, raw.strip()  # free text: a description, no checkable facts
    if not isinstance(raw, Mapping):
        raise TypeError(f"visual facts must be a mapping or a JSON object string, got {type(raw).__name__}")
    description = raw.get("description", "") if isinstance(raw.get("description"), str) else ""
    source = raw["quantities"] if isinstance(raw.get("quantities"), Mapping) else {
        k: v for k, v in raw.items() if k not in ("description", "objects")}
    flat: dict[str, Any] = {}

    def add(name: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for k, v in value.items():
                add(f"{name}.{k}", v)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                add(f"{name}[{i}]", v)
        elif value is None or isinstance(value, bool) or (isinstance(value, str) and not value.strip()):
            return
        elif isinstance(value, float) and not math.isfinite(value):
            return
        else:
            flat[name] = value.strip() if isinstance(value, str) else value

    for key, value in source.items():
        add(str(key), value)
    return flat, description


def as_visual_example(ex: Any) -> VisualExample:
    """A ``VisualExample`` from a ``VisualExample``, a record dict, or an object with the fields."""
    if isinstance(ex, VisualExample):
        return ex
    question = next((q for q in (_get(ex, k) for k in ("question_wo_prompt", "question", "problem"))
                     if isinstance(q, str)), "")
    facts, description = flatten_facts(_raw_facts(ex))
    return VisualExample(question=question.replace(IMAGE_TAG, "").strip(), hint=_hint_of(ex),
                         answer=_answer_of(ex), facts=facts, description=description,
                         answer_format=_get(ex, "answer_format"))


def _hint_of(ex: Any) -> str:
    return str(_get(ex, "hint") or _get(_get(ex, "meta") or {}, "hint") or "")


def _answer_of(ex: Any) -> str:
    answer = _get(ex, "answer")
    return "" if answer is None else str(answer).strip()


# ---------------------------------------------------------------------------------------------
# The answer line


def check_answer_format(fmt: str, field: str = "answer_format") -> str:
    if fmt not in ANSWER_FORMATS:
        raise ValueError(f"{field} must be one of {ANSWER_FORMATS}, got {fmt!r}")
    return fmt


def answer_line(answer: str, fmt: str) -> str:
    """``Answer: 15`` (DyME's ANSWER_TEMPLATE) or ``The answer is \\boxed{15}.`` (MAYE/R1)."""
    check_answer_format(fmt)
    return f"{ANSWER_FLAG} {answer}" if fmt == "flag" else f"The answer is \\boxed{{{answer}}}."


def strip_final_answer(text: str) -> str:
    """The text with its answer marks removed and all of its reasoning kept: a flag on the last line
    (the rationale's own final answer) cuts the text there, every earlier flag is defused
    (``answer:`` -> ``answer``, so a target ends up with exactly one flag, the one appended, as
    DyME's format reward wants), and every ``\\boxed{X}`` is unwrapped to ``X``."""
    text = text.rstrip()
    flags = list(_FLAG.finditer(text))
    if flags and "\n" not in text[flags[-1].end():]:
        text = text[:flags[-1].start()].rstrip(" *_")
    text = _FLAG.sub(lambda m: m.group(0)[:-1].rstrip("* "), text)
    for start, end, content in reversed(boxed_spans(text)):
        text = text[:start] + (content or "") + text[end:]
    return text.strip()


def reasoning_part(text: str) -> str:
    """What a checker grades: the text before the first answer flag (DyME's thinking part), with
    the last ``\\boxed{}`` (the final answer) removed and earlier boxes unwrapped, so restating the
    answer earns no thinking reward."""
    cut = text.lower().find(ANSWER_FLAG.lower())
    if cut >= 0:
        text = text[:cut]
    spans = boxed_spans(text)
    if spans:
        start, end, _ = spans[-1]
        text = text[:start] + text[end:]
    return strip_final_answer(text)


def with_answer_line(body: str, answer: str, fmt: str) -> str:
    """``body`` without answer marks, then the answer line; the answer line alone if body is empty."""
    body = strip_final_answer(body)
    line = answer_line(answer, fmt)
    return f"{body}\n{line}" if body else line


def hint_then_answer(hint: str, answer: str, fmt: str) -> str:
    """DyME's memorisation target ``hint + "\\n" + "Answer: X"`` (before the end token), the hint
    verbatim; the answer line alone when there is no hint."""
    line = answer_line(answer, fmt)
    return f"{hint}\n{line}" if hint.strip() else line


def unchanged_reference(example: Any, default_format: str) -> str:
    """The refiner fallback: the reference rationale, ending with the answer line. Reads only the
    hint, answer and format (not the facts, which may be what broke); never raises."""
    try:
        fmt = _get(example, "answer_format")
        return with_answer_line(_hint_of(example), _answer_of(example),
                                fmt if fmt in ANSWER_FORMATS else default_format)
    except Exception:  # noqa: BLE001 - even an unreadable example yields a string
        return ""


# ---------------------------------------------------------------------------------------------
# Results, counters, protocols


class SupervisionStats:
    """Thread-safe counters: ``items`` handled, ``fallback.<reason>``, and implementation extras
    (``requests``, ``retries``). Read with ``snapshot()``; the training loop logs it."""

    def __init__(self):
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}

    def add(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._counts[key] = self._counts.get(key, 0) + n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def fallbacks(self) -> int:
        return sum(v for k, v in self.snapshot().items() if k.startswith("fallback."))


@dataclasses.dataclass(frozen=True)
class CheckResult:
    """One checker batch. ``scores`` float32 [B] in [0, 1], or ``fallback_score`` (NaN unless
    configured) where ``fallback`` is True; ``reasons[i]`` names the fallback (None if scored);
    ``details[i]`` is implementation-specific and for logs only."""

    scores: np.ndarray
    fallback: np.ndarray
    reasons: tuple[str | None, ...]
    details: tuple[Any, ...] = ()


@dataclasses.dataclass(frozen=True)
class RefineResult:
    """One refiner batch. ``texts[i]`` ends with the answer line; where ``fallback[i]`` it is the
    reference rationale normalised by ``with_answer_line``."""

    texts: tuple[str, ...]
    fallback: np.ndarray
    reasons: tuple[str | None, ...]


@runtime_checkable
class Checker(Protocol):
    stats: SupervisionStats

    def check(self, reasonings: Sequence[str], examples: Sequence[Any]) -> CheckResult:
        """Score ``reasonings[i]`` against ``examples[i]``'s visual facts; never raises."""

    def close(self) -> None: ...


@runtime_checkable
class Refiner(Protocol):
    stats: SupervisionStats

    def refine(self, examples: Sequence[Any]) -> RefineResult:
        """A grounded rationale per example, ending with its answer line; never raises."""

    def close(self) -> None: ...


class IdentityRefiner:
    """DyME's released refiner (``ContextRefinerLocal``) rewrites nothing: each target is the
    example's hint verbatim, then the answer line in the run's format (``hint_then_answer``)."""

    def __init__(self, answer_format: str = "flag"):
        self.answer_format = check_answer_format(answer_format)
        self.stats = SupervisionStats()

    def refine_one(self, example: Any) -> str:
        fmt = _get(example, "answer_format") or self.answer_format
        return hint_then_answer(_hint_of(example), _answer_of(example), check_answer_format(fmt))

    def refine(self, examples: Sequence[Any]) -> RefineResult:
        return refine_each(examples, self.refine_one, self.answer_format, self.stats)

    def close(self) -> None:
        pass


def refine_each(examples: Sequence[Any], refine_one: Any, default_format: str,
                stats: SupervisionStats) -> RefineResult:
    """``refine_one(example) -> text`` over a batch; an example it raises on gets
    ``unchanged_reference`` and is counted as ``fallback.error`` (a bad example must not stop training)."""
    texts, fallback, reasons = [], np.zeros(len(examples), bool), []
    for i, example in enumerate(examples):
        try:
            texts.append(refine_one(example))
            reasons.append(None)
        except Exception:  # noqa: BLE001 - caught by design, see the docstring
            texts.append(unchanged_reference(example, default_format))
            fallback[i] = True
            reasons.append(ERROR)
            stats.add(f"fallback.{ERROR}")
    stats.add("items", len(examples))
    return RefineResult(tuple(texts), fallback, tuple(reasons))


def fallback_value(fallback_score: float | None) -> float:
    return float("nan") if fallback_score is None else float(fallback_score)


def check_fallback_score(value: Any, field: str = "fallback_score") -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{field} must be None (NaN) or a number in [0, 1], got {value!r}")
    return float(value)


# ---------------------------------------------------------------------------------------------
# Factory


@dataclasses.dataclass
class VisualSupervision:
    """A checker and a refiner built from one config; ``close()`` releases both."""

    checker: Checker
    refiner: Refiner

    def close(self) -> None:
        self.checker.close()
        self.refiner.close()


# kind -> "module:function" taking the config dict without "kind"; resolved like a plugin, so the
# base module imports no implementation (no import cycle) and new kinds are one line.
KINDS = {
    "lexical": "vrl_jax.rewards.visual.lexical:make_lexical",   # DyME's released run (main.py)
    "rule_based": "vrl_jax.rewards.visual.rule_based:make_rule_based",
    "http": "vrl_jax.rewards.visual.http_client:make_http",
}
DEFAULT_KIND = "lexical"
IDENTITY = "identity"  # the `refiner` value that keeps hints as they are (DyME's ContextRefinerLocal)


def _plain(config: Any) -> dict:
    if hasattr(config, "to_dict"):  # ml_collections.ConfigDict / FrozenConfigDict
        config = config.to_dict()
    if not isinstance(config, Mapping):
        raise TypeError(f"visual supervision config must be a mapping, got {type(config).__name__}")
    return dict(config)


def _import(target: str, where: str) -> Any:
    module_name, _, attr = target.partition(":")
    try:
        obj = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"{where}: cannot load {target!r}: {err}") from err
    if not callable(obj):
        raise ValueError(f"{where}: {target!r} is not callable")
    return obj


def _with_format(fields: dict, answer_format: str | None, where: str) -> dict:
    """``fields`` with the run's answer format, which a kind's own ``answer_format`` may not contradict."""
    if answer_format is None:
        return fields
    check_answer_format(answer_format)
    own = fields.get("answer_format", answer_format)
    if own != answer_format:
        raise ValueError(f"{where}: answer_format {own!r} contradicts the run's answer format "
                         f"{answer_format!r} (leave it out; the run's is used)")
    return {**fields, "answer_format": answer_format}


def _build(fields: dict, where: str) -> VisualSupervision:
    kind = fields.pop("kind", None)
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"{where}: field 'kind' is required, one of {sorted(KINDS)} "
                         f"or 'package.module:function'; got {kind!r}")
    if kind in KINDS:
        target = KINDS[kind]
    elif ":" in kind:
        target = kind
    else:
        raise ValueError(f"{where}: field 'kind' is {kind!r}; expected one of "
                         f"{sorted(KINDS)} or 'package.module:function'")
    built = _import(target, f"visual supervision kind {kind!r}")(**fields)
    if not isinstance(built, VisualSupervision):
        raise ValueError(f"visual supervision kind {kind!r} returned {type(built).__name__}, "
                         "not a VisualSupervision")
    return built


def make_visual_supervision(config: Any, *, answer_format: str | None = None) -> VisualSupervision:
    """Build the checker/refiner pair named by ``config["kind"]``.

    ``{"kind": "lexical"}`` (DyME's released run: lexical F1 checker, hints kept as they are),
    ``{"kind": "rule_based", ...}`` or ``{"kind": "http", "base_url": ..., "model": ..., ...}``; the
    other keys are the fields of that kind's config dataclass (``LexicalConfig``,
    ``RuleBasedConfig``, ``HttpConfig``). A kind ``"package.module:function"`` is a plugin:
    ``function(**fields)`` must return a ``VisualSupervision``.

    ``refiner`` replaces the kind's refiner: ``"identity"`` (hint + answer line, DyME's
    ``ContextRefinerLocal``), or another config of this shape whose refiner is used, e.g.
    ``{"kind": "lexical", "refiner": {"kind": "rule_based"}}`` for DyME's checker with a rewriting
    refiner. ``answer_format`` (the run's ``dyme.answer_format``) is given to every kind built, so
    each memorisation target ends with the answer line the run's prompts ask for. Errors are
    ``ValueError``s that name the bad field.
    """
    where = "visual supervision config"
    fields = _with_format(_plain(config), answer_format, where)
    refiner = fields.pop("refiner", None)
    built = _build(fields, where)
    if refiner is None:
        return built
    if refiner == IDENTITY:
        fmt = answer_format or fields.get("answer_format") or "flag"
        return VisualSupervision(built.checker, IdentityRefiner(fmt))
    if not isinstance(refiner, Mapping) and not hasattr(refiner, "to_dict"):
        raise ValueError(f"{where}: field 'refiner' must be {IDENTITY!r} or a config mapping with a "
                         f"'kind', got {refiner!r}")
    sub = _with_format(_plain(refiner), answer_format, f"{where}, field 'refiner'")
    if "refiner" in sub:
        raise ValueError(f"{where}: field 'refiner' may not itself have a 'refiner'")
    # The other pair's checker is not used; closing its refiner releases what the two share.
    return VisualSupervision(built.checker, _build(sub, f"{where}, field 'refiner'").refiner)


def config_from_fields(cls: type, fields: Mapping[str, Any], kind: str) -> Any:
    """``cls(**fields)`` with errors that name the unknown or missing field and the kind."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - set(known))
    if unknown:
        raise ValueError(f"visual supervision config (kind {kind!r}): unknown field(s) {unknown}; "
                         f"expected fields: {sorted(known)}")
    missing = [name for name, f in known.items() if name not in fields
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"visual supervision config (kind {kind!r}): missing required field(s) {missing}")
    return cls(**fields)
