"""Progress display for training and evaluation: a tqdm bar on a terminal, log lines elsewhere.

A tqdm bar redraws with carriage returns, which in a CI log or a batch job's output file turns into
one enormous line (or thousands of lines). When the stream is not a TTY the same information
(count, rate, elapsed, ETA, key metrics) is printed as one plain line every `log_every` steps.
"""
from __future__ import annotations

import sys
import time
from typing import Any, Callable, Mapping, TextIO

# Short label -> metric key shown next to the bar.
TRAIN_KEYS = {"acc": "rews/acc_rewards", "score": "rews/scores", "len": "response/response_lengths",
              "kl": "training/kl", "ent": "training/entropy"}
EVAL_KEYS = {"acc": "accuracy"}


def format_duration(seconds: float) -> str:
    """`3725` -> "1h02m05s", `65` -> "1m05s", `7.2` -> "7s"; "?" for unknown (None/negative/inf)."""
    if seconds is None or seconds != seconds or seconds < 0 or seconds == float("inf"):
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    if h:
        return f"{h}h{m:02d}m{s:02d}s"
    return f"{m}m{s:02d}s" if m else f"{s}s"


def _fmt(value: Any) -> str:
    try:
        return f"{float(value):.4g}"
    except (TypeError, ValueError):
        return str(value)


class Progress:
    """Progress over `total` steps (generation steps, or evaluation batches).

    Args:
      total: steps in the whole run.
      desc: label, e.g. "train" or "eval val pass@8".
      initial: steps already done (after a resume); rate and ETA count only steps done here.
      keys: {label: metric key} to show from the metrics given to `update` (missing keys are skipped).
      log_every: plain mode prints every this many steps (and at the last one).
      enabled: False everywhere but process 0.
      stream: where to write (default stdout).
      tty: force bar (True) or plain lines (False); default `stream.isatty()`.
      clock: seconds source (tests pass a fake one).
    """

    def __init__(self, total: int, *, desc: str = "train", initial: int = 0,
                 keys: Mapping[str, str] | None = None, log_every: int = 10, enabled: bool = True,
                 stream: TextIO | None = None, tty: bool | None = None,
                 clock: Callable[[], float] = time.monotonic):
        if log_every < 1:
            raise ValueError(f"log_every must be >= 1; got {log_every}")
        self.total, self.desc, self.initial, self.count = int(total), desc, int(initial), int(initial)
        self.keys = dict(TRAIN_KEYS if keys is None else keys)
        self.log_every, self.enabled = log_every, enabled
        self.stream = sys.stdout if stream is None else stream
        self.clock = clock
        self.start = clock()
        self.metrics: dict[str, Any] = {}
        if tty is None:
            tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._bar = None
        if enabled and tty:
            from tqdm.auto import tqdm
            self._bar = tqdm(total=self.total, initial=self.initial, desc=desc, file=self.stream,
                             dynamic_ncols=True)

    def _shown(self) -> dict[str, str]:
        return {label: _fmt(self.metrics[key]) for label, key in self.keys.items() if key in self.metrics}

    def eta(self) -> float | None:
        """Seconds left at the mean rate of the steps done since construction; None before any."""
        done = self.count - self.initial
        elapsed = self.clock() - self.start
        if done <= 0 or elapsed <= 0:
            return None
        return max(self.total - self.count, 0) * elapsed / done

    def line(self) -> str:
        """The plain-mode line, e.g. `train 20/100 (20.0%) | 1.50 s/it | elapsed 30s | ETA 2m00s | acc=0.5`."""
        done = self.count - self.initial
        elapsed = self.clock() - self.start
        pct = 100.0 * self.count / self.total if self.total else 100.0
        parts = [f"{self.desc} {self.count}/{self.total} ({pct:.1f}%)"]
        if done > 0:
            parts.append(f"{elapsed / done:.2f} s/it")
        parts += [f"elapsed {format_duration(elapsed)}", f"ETA {format_duration(self.eta())}"]
        shown = self._shown()
        if shown:
            parts.append(" ".join(f"{k}={v}" for k, v in shown.items()))
        return " | ".join(parts)

    def update(self, n: int = 1, metrics: Mapping[str, Any] | None = None) -> None:
        """Advance by n steps; `metrics` (a step's dict) refreshes the shown values."""
        before = self.count
        self.count += n
        if metrics:
            self.metrics.update(metrics)
        if not self.enabled:
            return
        if self._bar is not None:
            shown = self._shown()
            if shown:
                self._bar.set_postfix(shown, refresh=False)
            self._bar.update(n)
        elif self.count // self.log_every > before // self.log_every or self.count >= self.total > before:
            print(self.line(), file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
