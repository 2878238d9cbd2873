"""MAYE's evaluation scheme: accuracy on a split under three generation settings.

Settings (MAYE `eval()`): pass@1 at temperature 0.01 (top-p 0.001), pass@1 at 0.6, and pass@k at 1.0.
For the last, MAYE counts a problem solved when any of its k samples is (reported as `pass@k`,
MAYE's name); the unbiased estimator over the same samples is reported beside it as
`unbiased_pass@k`, with pass@1 from the same k samples. With `breakdown` fields (a record's `family`,
`modality`, MathVerse's `problem_version`, ...), each setting's accuracy is also reported per value of each
field. Every problem's score per setting is returned too (`evaluation.paired`: the change between two
evaluations, paired by problem). The trainer and `python -m vrl_jax.evaluate` call `Evaluator.evaluate_split`.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import numpy as np

from vrl_jax import distributed
from vrl_jax.errors import UserError
from vrl_jax.evaluation.paired import outcome_rows
from vrl_jax.evaluation.passk import MAYE_HIGH, MAYE_LOW, MAYE_MEDIUM, GenerationSetting, mean_pass_at_k
from vrl_jax.evaluation.progress import Progress
from vrl_jax.sampling.sampler import Sampler, SamplerConfig, decode_responses

SETTINGS = {"low": MAYE_LOW, "medium": MAYE_MEDIUM, "high": MAYE_HIGH}


def settings_from_names(names: Sequence[str], k: int, max_new_tokens: int) -> list[GenerationSetting]:
    out = []
    for name in names:
        s = SETTINGS[name]
        out.append(dataclasses.replace(s, k=k if s.k > 1 else 1, max_tokens=max_new_tokens))
    return out


def user_text(messages) -> str:
    """The last turn's text as the model reads it, `<image>` where an image stands (a template may put
    text on both sides of an image, e.g. DyME's instruction before a question with an image tag)."""
    return "".join(item.get("text", "") if item.get("type") == "text" else "<image>"
                   for item in messages[-1]["content"])


class Evaluator:
    """Runs the settings over a split's batches. One compiled sampler per distinct k (the temperature
    and top-p are traced), so the three settings compile twice per prompt-length bucket. With a `mesh`
    the samplers split each batch's prompts over the devices of every process, and each process
    judges its share of the samples: every process ends with the metrics of the whole split."""

    def __init__(self, graphdef, processor, reward_set, settings: Sequence[GenerationSetting], stop_ids, pad_id,
                 mesh=None, decode_segments: int = 4, breakdown: Sequence[str] = ()):
        self.processor = processor
        self.breakdown = tuple(breakdown)
        self.reward_set = reward_set
        self.settings = list(settings)
        self.samplers = {}
        for s in self.settings:
            if s.k not in self.samplers:
                self.samplers[s.k] = Sampler(graphdef, SamplerConfig(
                    max_new_tokens=s.max_tokens, num_samples=s.k, stop_token_ids=tuple(stop_ids), pad_token_id=pad_id,
                    decode_segments=decode_segments), mesh=mesh)

    def _accuracy(self, texts, examples, out) -> np.ndarray:
        """float [rows]: this process judges its share of the rows; the shares are gathered."""
        if not self.reward_set:
            return np.zeros(len(texts))
        mine = distributed.share(len(texts))
        local = self.reward_set(texts[mine], examples[mine], lengths=out.lengths[mine],
                                truncated=~out.stopped[mine])["accuracy"]
        return distributed.gather_rows({"accuracy": np.asarray(local, np.float32)}, len(texts))["accuracy"]

    def evaluate_split(self, params, batches, key, split: str, keep_samples: int = 0, num_batches: int = 0):
        """batches: iterable of pipeline `Batch`es (`num_batches` of them, for the progress bar's ETA).
        Returns (metrics {key: float}, sample dicts, outcome rows: each problem's score per setting, for
        `paired.paired_change` between evaluations)."""
        correct = {s.name: [] for s in self.settings}
        groups = {field: [] for field in self.breakdown}  # field -> each valid problem's value, in order
        ids, problems = [], []  # each valid problem's id and the problem it poses (`problem_key`)
        samples = []
        bar = Progress(num_batches * len(self.settings), desc=f"eval {split}", keys={"acc": "accuracy"},
                       log_every=max(1, num_batches * len(self.settings) // 4),
                       enabled=jax.process_index() == 0)
        hits_so_far = [0, 0]
        for i, batch in enumerate(batches):
            valid = np.asarray(batch.valid)
            ids += [e["id"] for e, v in zip(batch.examples, valid) if v]
            problems += [problem_key(e) for e, v in zip(batch.examples, valid) if v]
            for field in self.breakdown:
                groups[field] += [field_value(e, field) for e, v in zip(batch.examples, valid) if v]
            for j, s in enumerate(self.settings):
                out = jax.device_get(self.samplers[s.k](params, batch.inputs, jax.random.fold_in(key, i * 16 + j),
                                                        temperature=s.temperature, top_p=s.top_p))
                texts = decode_responses(self.processor.tokenizer, out.tokens, out.mask)
                examples = [e for e in batch.examples for _ in range(s.k)]
                # The run's whole reward set scores the samples, so length-aware components
                # (maye_penalty, soft_overlong) get the same context as in training.
                acc = self._accuracy(texts, examples, out)
                per_problem = np.asarray(acc).reshape(-1, s.k) > 0.5
                correct[s.name].append(per_problem[valid])
                hits_so_far[0] += int(per_problem[valid].any(1).sum())
                hits_so_far[1] += int(valid.sum())
                bar.update(1, {"accuracy": hits_so_far[0] / max(hits_so_far[1], 1)})
                if j == 0 and len(samples) < keep_samples:
                    for e, text, ok, v in zip(batch.examples, texts[::s.k], per_problem[:, 0], valid):
                        if v and len(samples) < keep_samples:
                            samples.append({"id": e["id"], "prompt": user_text(e["prompt_messages"]),
                                            "image_id": e["id"], "response": text, "answer": e["answer"],
                                            "reward": float(ok), "correct": bool(ok), "setting": s.label})
        bar.close()
        metrics, scores = {}, {}
        for s in self.settings:
            hits = np.concatenate(correct[s.name]) if correct[s.name] else np.zeros((0, s.k), bool)
            metrics[s.metric_key(split)] = float(hits.any(1).mean()) if len(hits) else 0.0
            scores[s.label] = hits.any(1)
            if s.k > 1 and len(hits):
                n = np.full(len(hits), s.k)
                metrics[f"eval/{split}/unbiased_pass@{s.k} T={s.temperature}"] = mean_pass_at_k(n, hits.sum(1), s.k)
                metrics[f"eval/{split}/pass@1 from {s.k} samples T={s.temperature}"] = mean_pass_at_k(
                    n, hits.sum(1), 1)
                scores[f"pass@1 from {s.k} samples T={s.temperature}"] = hits.mean(1)
            metrics[f"eval/{split}/num_problems"] = float(len(hits))
            for field, values in groups.items():
                metrics.update(breakdown_metrics(split, field, values, hits, s))
        return metrics, samples, outcome_rows(ids, problems, scores)


def problem_key(example: dict) -> str:
    """The problem an item poses: its `semantic_key` where the data names problems (synthgeo repeats one
    with another picture or wording), else its id."""
    key = (example.get("meta") or {}).get("semantic_key")
    return example["id"] if key is None else str(key)


def check_breakdown(fields: Sequence[str], evals: dict, option: str) -> None:
    """`fields` are in the evaluation data: one that none of a split's examples (`Example`s) has, a typo or a
    dataset without it, is a UserError naming `option` and the fields they do have."""
    for split, examples in evals.items():
        have = {k for e in examples for k in e.meta} - {"format"}
        missing = [f for f in fields if f not in have]
        if examples and missing:
            raise UserError(f"{option}: the {split} examples have no field {missing[0]!r}; their fields are "
                            f"{sorted(have)}")


MISSING = "(none)"  # the value of a breakdown field a record does not have


def field_value(example: dict, field: str) -> str:
    """A record's value of `field` as a string, read from its `meta` (where the loaders keep the fields
    their schema does not use), `MISSING` where it has none. A '/' becomes '_': it would nest the key."""
    return str((example.get("meta") or {}).get(field, MISSING)).replace("/", "_")


def breakdown_metrics(split: str, field: str, values: Sequence[str], hits: np.ndarray,
                      setting: GenerationSetting) -> dict[str, float]:
    """Accuracy of one setting per value of one field.

    values: [P] each problem's value; hits: bool [P, k], problem p's samples judged correct.
    Keys `eval/{split}/{field}/{value}/...`: the setting's label (a problem is correct when any of its k
    samples is, as in `acc/`), `pass@1 from k samples T=...` for k > 1, and `num_problems`.
    """
    values = np.asarray(values, dtype=object)
    if len(values) != len(hits):
        raise ValueError(f"{len(values)} values of {field!r} for {len(hits)} problems")
    out = {}
    for value in sorted(set(values.tolist())):
        rows = hits[values == value]
        prefix = f"eval/{split}/{field}/{value}"
        out[f"{prefix}/{setting.label}"] = float(rows.any(1).mean())
        if setting.k > 1:
            out[f"{prefix}/pass@1 from {setting.k} samples T={setting.temperature}"] = float(rows.mean())
        out[f"{prefix}/num_problems"] = float(len(rows))
    return out


def parse_breakdown_key(key: str) -> tuple[str, str, str, str] | None:
    """`eval/test_iid/family/bar/pass@1 Temperature=0.6` -> ("test_iid", "family", "bar", "pass@1 Temperature=0.6");
    None for any other key."""
    parts = key.split("/")
    return tuple(parts[1:]) if len(parts) == 5 and parts[0] == "eval" else None


def breakdown_lines(metrics: dict[str, float]) -> list[str]:
    """The breakdown metrics as one line per split, field and setting (a console summary):
    `test_iid by family, pass@1 Temperature=0.6: bar 30.0% (50) | count 12.0% (25) | ...`."""
    table: dict[tuple, dict[str, float]] = {}
    for key, value in metrics.items():
        if (parsed := parse_breakdown_key(key)) is not None:
            split, field, val, label = parsed
            table.setdefault((split, field, label), {})[val] = value
    lines = []
    for (split, field, label), cells in sorted(table.items()):
        if label == "num_problems":
            continue
        counts = table.get((split, field, "num_problems"), {})
        lines.append(f"{split} by {field}, {label}: " + " | ".join(
            f"{val} {100 * acc:.1f}% ({int(counts.get(val, 0))})" for val, acc in sorted(cells.items())))
    return lines
