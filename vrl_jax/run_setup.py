"""Everything a run needs before its first step: data on disk, the model, the processor, the rewards and
the input pipelines. Separate from the loop so the loop reads as the algorithm.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from vrl_jax.data.faults import FaultCounter
from vrl_jax.data.formats import Example, load_examples, load_image
from vrl_jax.data.pipeline import eval_dataset, eval_num_batches, train_dataset
from vrl_jax.models.loading import load_model
from vrl_jax.models.processor import VLProcessor
from vrl_jax.rewards import RewardSet

SYNTHGEO_EVAL_SPLITS = ("val", "test_iid", "test_ood")


@dataclasses.dataclass
class RunSetup:
    model_dir: str
    processor: VLProcessor
    model: Any
    graphdef: Any
    rewards: RewardSet
    visual: Any  # DyME's checker/refiner pair, or None
    sft_data: Any  # grain IterDataset of SFT batches, or None
    rl_data: Any
    eval_data: dict[str, Callable[[], Any]]  # split -> a fresh pass over its batches
    ref_params: Any
    faults: FaultCounter
    eval_batches: dict[str, int] = dataclasses.field(default_factory=dict)  # split -> batches per pass

    def close(self):
        self.rewards.close()
        if self.visual is not None:
            self.visual.close()


def _with_hint(ex: Example) -> Example:
    """MAYE-format files keep extra fields in `meta`; use its rationale as the hint when present."""
    if not ex.hint and isinstance(ex.meta.get("hint"), str):
        return dataclasses.replace(ex, hint=ex.meta["hint"])
    return ex


def synthgeo_data(c, workdir: str, faults: FaultCounter) -> tuple[list[Example], dict[str, list[Example]]]:
    """Generates the synthetic benchmark into `workdir/data` once and reads it back through the MAYE loader."""
    from vrl_jax.data.synthgeo import GeneratorConfig, export_dataset
    out = os.path.join(workdir, "data")
    s = c.data.synthgeo
    sizes = {"train": s.train, "val": s.val, "test_iid": s.test, "test_ood": s.test}
    if not os.path.exists(os.path.join(out, "manifest.json")):
        gen = GeneratorConfig(seed=s.seed, levels=tuple(s.levels), text_fraction=s.text_fraction,
                              **({"families": tuple(s.families)} if s.families else {}))
        export_dataset(out, sizes, gen, formats=("maye",), progress=True)
    load = lambda split: [_with_hint(e) for e in load_examples(os.path.join(out, f"maye_{split}.jsonl"),  # noqa
                                                                 faults=faults)]
    return load("train"), {split: load(split) for split in SYNTHGEO_EVAL_SPLITS}


def file_data(c, faults: FaultCounter) -> tuple[list[Example], dict[str, list[Example]]]:
    fmt = c.data.source
    train = [_with_hint(e) for e in load_examples(c.data.train, format=fmt, faults=faults,
                                                  hint_field=c.data.hint_field)] if c.data.train else []
    evals = {split: [_with_hint(e) for e in load_examples(path, format=fmt, faults=faults,
                                                          hint_field=c.data.hint_field)]
             for split, path in c.data.eval.items() if path}
    return train, evals


def prepare_model(c, workdir: str, train_examples: list[Example]) -> str:
    if c.model.path:
        return c.model.path
    from vrl_jax.models.tiny import build_tiny_model
    model_dir = os.path.join(workdir, "model")
    if not os.path.exists(os.path.join(model_dir, "model.safetensors")):
        texts = [t for e in train_examples for t in (e.question, e.hint, e.solution, e.answer) if t]
        t = c.model.tiny
        build_tiny_model(model_dir, texts, seed=c.seed, vocab_size=t.vocab_size, hidden=t.hidden, layers=t.layers,
                         intermediate=t.intermediate, vision_width=t.vision_width, vision_depth=t.vision_depth)
    return model_dir


def prompt_length(example: Example, processor: VLProcessor, template) -> int:
    """Tokens of the rendered prompt with every image placeholder expanded (image headers only are read)."""
    from PIL import Image

    from vrl_jax.data.prompts import build_messages
    from vrl_jax.models.image_processing import num_image_tokens
    text = processor.render(build_messages(example, template))
    n = len(processor.tokenizer(text, add_special_tokens=False)["input_ids"])
    ip = processor.image_processor
    for ref in example.images:
        if ref.path is not None:
            with Image.open(ref.path) as im:
                w, h = im.size
        else:
            w, h = load_image(ref).size
        rh, rw = ip.target_size(h, w)
        n += int(num_image_tokens((1, rh // ip.patch_size, rw // ip.patch_size), ip.merge_size)) - 1
    return n


def drop_long_prompts(examples: list[Example], processor: VLProcessor, template, limit: int,
                      faults: FaultCounter) -> list[Example]:
    """Counts and reports (with the sample's file and line) prompts longer than the largest length
    bucket, and leaves them out, instead of letting one sample fail a whole batch mid-run."""
    kept = []
    for ex in examples:
        n = prompt_length(ex, processor, template)
        if n > limit:  # the loader already counted the sample as read; this turns it into a fault
            faults.record("prompt_too_long", ex.source, f"prompt has {n} tokens, the largest length bucket is {limit}")
        else:
            kept.append(ex)
    faults.check(final=True)
    return kept


def reward_spec(c) -> dict:
    weights = dict(c.rewards.weights)
    weights.setdefault("accuracy", 0.0)  # correctness is always measured, whether or not it is rewarded
    return {"weights": weights, "params": c.rewards.params.to_dict(), "overrides": c.rewards.overrides.to_dict(),
            "judge": c.rewards.judge.to_dict()}


def prepare_run(c, workdir: str) -> RunSetup:
    faults = FaultCounter(max_share=c.data.max_fault_share)
    if c.data.source == "synthgeo":
        train, evals = synthgeo_data(c, workdir, faults)
        evals = {k: v for k, v in evals.items() if k in tuple(c.eval.splits)}
    else:
        train, evals = file_data(c, faults)
    if c.eval.max_examples:
        evals = {k: v[:c.eval.max_examples] for k, v in evals.items()}
    model_dir = prepare_model(c, workdir, train)
    processor = VLProcessor.from_pretrained(model_dir, length_buckets=tuple(c.data.length_buckets),
                                            patch_buckets=tuple(c.data.patch_buckets))
    limit = max(c.data.length_buckets)
    train = drop_long_prompts(train, processor, c.data.template, limit, faults)
    evals = {k: drop_long_prompts(v, processor, c.data.template, limit, faults) for k, v in evals.items()}
    model = load_model(model_dir, dtype=jnp.dtype(c.model.dtype), param_dtype=jnp.dtype(c.model.param_dtype))
    graphdef, params = nnx.split(model, nnx.Param)
    needs_ref = bool(c.loss.kl_coef or (c.advantage.estimator == "reinforce_pp" and c.advantage.kl_reward_coef))
    ref_params = jax.tree.map(jnp.copy, params.to_pure_dict()) if needs_ref else None
    visual = None
    if c.algorithm == "dyme":
        from vrl_jax.rewards.visual import make_visual_supervision
        visual = make_visual_supervision({**c.dyme.visual.to_dict()})
    encode = processor.encode_examples
    pi, pc = jax.process_index(), jax.process_count()
    common = dict(template=c.data.template, process_index=pi, process_count=pc, faults=faults)
    rl_data = train_dataset(train, encode, batch_size=c.prompts_per_step, seed=c.seed, **common) \
        if c.rl_steps else None
    sft_data = train_dataset(train, encode, batch_size=c.sft.batch_size, seed=c.seed + 1, **common) \
        if c.sft.steps else None
    eval_data = {split: (lambda ex=ex: eval_dataset(ex, encode, batch_size=c.eval.batch_size, **common))
                 for split, ex in evals.items() if ex}
    eval_batches = {split: eval_num_batches(len(ex), c.eval.batch_size, pc) for split, ex in evals.items() if ex}
    return RunSetup(model_dir, processor, model, graphdef, RewardSet(reward_spec(c)), visual, sft_data, rl_data,
                    eval_data, ref_params, faults, eval_batches)
