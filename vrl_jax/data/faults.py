"""Per-sample fault accounting: bad records are reported, counted by kind and skipped, until too many.

A real dataset copy always has a few broken samples (a missing PNG, a truncated line); stopping the
run for one of them wastes a job, but silently dropping a third of the data hides a broken copy.
`FaultCounter` sits between the two: every fault is logged with its file and line, and once the
share of faulty samples passes `max_share` the run stops with a summary of what went wrong.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import threading

from vrl_jax.errors import UserError

_LOG = logging.getLogger(__name__)

# The kinds a loader or the pipeline may report; a typo in a kind is a bug, so `record` checks it.
FAULT_KINDS = (
    "malformed_record",  # a line or array element that is not a JSON object
    "missing_field",  # a required field is absent or null
    "bad_field",  # a field has the wrong type or an unparseable value
    "missing_image",  # the image file does not exist
    "corrupt_image",  # the image exists but PIL cannot decode it
    "image_count_mismatch",  # `<image>` tags in the question do not match the images
    "prompt_too_long",  # the prompt is longer than the configured limit
)


class TooManyFaultsError(UserError, RuntimeError):
    """The share of faulty samples passed the configured maximum; the data copy is likely broken."""


@dataclasses.dataclass(frozen=True)
class Fault:
    """One skipped sample: what went wrong (`kind`), where (`where`, e.g. `train.jsonl:17`), details."""

    kind: str
    where: str
    detail: str

    def __str__(self) -> str:
        return f"{self.where}: {self.kind}: {self.detail}"


class FaultCounter:
    """Counts good and faulty samples; raises `TooManyFaultsError` when faults exceed `max_share`.

    The share is only judged once `min_seen` samples were counted (or at `check(final=True)`, when a
    whole file has been read), so that one bad sample at the start of a stream does not stop a run.
    Safe across grain's reader threads; each grain worker *process* counts in its own copy.
    """

    def __init__(self, max_share: float = 0.05, *, min_seen: int = 100, keep: int = 20,
                 log_per_kind: int = 10):
        if not 0.0 <= max_share <= 1.0:
            raise ValueError(f"FaultCounter max_share must be in [0, 1], got {max_share!r}")
        if min_seen < 1:
            raise ValueError(f"FaultCounter min_seen must be >= 1, got {min_seen!r}")
        self.max_share = max_share
        self.min_seen = min_seen
        self.keep = keep
        self.log_per_kind = log_per_kind
        self.num_ok = 0
        self.counts: collections.Counter[str] = collections.Counter()
        self.examples: list[Fault] = []  # the first `keep` faults, for the error message
        self._lock = threading.Lock()

    def __getstate__(self):
        # Locks cannot be pickled; grain pickles the pipeline (and this counter) into its workers.
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @property
    def num_faults(self) -> int:
        return sum(self.counts.values())

    @property
    def num_seen(self) -> int:
        return self.num_ok + self.num_faults

    @property
    def share(self) -> float:
        return self.num_faults / self.num_seen if self.num_seen else 0.0

    def ok(self, n: int = 1) -> None:
        """Counts `n` samples that loaded without a fault."""
        with self._lock:
            self.num_ok += n
        self.check()

    def record(self, kind: str, where: str, detail: str, counted_ok: bool = False) -> Fault:
        """Logs and counts one skipped sample; raises `TooManyFaultsError` past the maximum share.

        counted_ok: the sample was already counted by `ok()` (a later stage found the fault), so it moves
          from the good samples to the faulty ones instead of being counted twice.
        """
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; expected one of {FAULT_KINDS}")
        fault = Fault(kind, where, detail)
        with self._lock:
            if counted_ok:
                self.num_ok -= 1
            self.counts[kind] += 1
            count = self.counts[kind]
            if len(self.examples) < self.keep:
                self.examples.append(fault)
        # Log the first few of each kind: a broken copy would otherwise flood the log.
        if count <= self.log_per_kind:
            _LOG.warning("skipping sample: %s", fault)
        elif count == self.log_per_kind + 1:
            _LOG.warning("more %s faults follow; only counting them from now on", kind)
        self.check()
        return fault

    def check(self, final: bool = False) -> None:
        """Raises `TooManyFaultsError` when the fault share exceeds `max_share`.

        Args:
          final: judge the share even when fewer than `min_seen` samples were seen (end of a file).
        """
        if self.num_seen == 0 or (not final and self.num_seen < self.min_seen):
            return
        if self.share > self.max_share:
            raise TooManyFaultsError(
                f"{self.num_faults} of {self.num_seen} samples were faulty ({self.share:.1%}), more than "
                f"the allowed {self.max_share:.1%}; the data copy is probably broken.\n{self.summary()}")

    def brief(self) -> str:
        """One line for the run's log: how many samples were skipped, by kind, and the first one."""
        if not self.num_faults:
            return f"no faulty samples ({self.num_ok} read)"
        kinds = ", ".join(f"{kind} {n}" for kind, n in sorted(self.counts.items()))
        return (f"{self.num_faults} of {self.num_seen} samples skipped as faulty ({kinds}; allowed share "
                f"{self.max_share:.1%}); first: {self.examples[0]}")

    def summary(self) -> str:
        """Counts by kind and the first faults, one per line."""
        lines = [f"faults by kind: {dict(sorted(self.counts.items()))} ({self.num_ok} samples ok)"]
        lines += [f"  {fault}" for fault in self.examples]
        if self.num_faults > len(self.examples):
            lines.append(f"  ... and {self.num_faults - len(self.examples)} more")
        return "\n".join(lines)
