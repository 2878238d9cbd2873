"""Everything a run needs before its first step: data on disk, the model, the processor, the rewards and
the input pipelines. Separate from the loop so the loop reads as the algorithm.

`check_inputs` runs first and is cheap: the data files, the model directory and the workdir are checked
before anything is generated, loaded or compiled, and a missing one is explained (what it should
hold, where to get it, how to try the recipe on synthetic data in the same format).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from vrl_jax import configs, distributed, sharding
from vrl_jax.configs import SYNTHGEO_EVAL_SPLITS
from vrl_jax.data.faults import FaultCounter
from vrl_jax.data.formats import Example, SampleFault, load_examples, load_image
from vrl_jax.data.pipeline import eval_dataset, eval_num_batches, train_dataset
from vrl_jax.evaluation.evaluator import check_breakdown
from vrl_jax.errors import UserError, ensure_writable_dir
from vrl_jax.models import lora, quantize
from vrl_jax.models.loading import check_model_dir, load_model
from vrl_jax.models.processor import VLProcessor
from vrl_jax.rewards import RewardSet


@dataclasses.dataclass(frozen=True)
class DataOrigin:
    """What a data source's files hold and where they come from, for the message about a missing one."""

    holds: str
    origin: str
    synthgeo_format: str  # `python -m vrl_jax.data.synthgeo --formats` name writing the same format
    synthgeo_file: str  # the file it writes for a split


DATA_ORIGINS = {
    "maye": DataOrigin(
        "MAYE's JSONL: one JSON object per line with question (starting with <image>), answer, solution, id "
        "and image (a path relative to the file's directory)",
        "the Hugging Face dataset ManTle/MAYE (https://huggingface.co/datasets/ManTle/MAYE, files and images), "
        "laid out as MAYE's README does under the directory you run from: datasets/geometry3k/{geometry3k_images/, "
        "geometry3k_rl_v0.jsonl, geometry3k_validation_v0.jsonl, geometry3k_test_v0.jsonl} and "
        "datasets/mm_math/{images/, mathverse_images/, mm_math_rl_v0.jsonl, mm_math_validation_v0.jsonl, "
        "math_verse_test_v0.jsonl}",
        "maye", "maye_{split}.jsonl"),
    "dyme": DataOrigin(
        "DyME's JSON array of records with question, answer, hint and image (an image path)",
        "DyME's data_utils/chartqa/download.py (github.com/HKUST-LongGroup/DyME), which builds "
        "data/chartqa/train_high.json (and train_medium/train_low) from the Hugging Face dataset "
        "HuggingFaceM4/ChartQA, with the images under data/images/",
        "dyme", "dyme_{split}.json"),
    "easyr1": DataOrigin(
        "EasyR1's parquet: problem (with <image>), answer and images (a list of {bytes, path})",
        "the Hugging Face dataset hiyouga/geometry3k (its train/validation/test parquet files)",
        "easyr1", "easyr1_{split}.parquet"),
}

MODEL_ORIGIN = ("It should hold a Qwen2-VL or Qwen2.5-VL checkpoint: config.json, the tokenizer (tokenizer.json or "
                "tokenizer_config.json) and the weights (*.safetensors as Hugging Face ships them, or params/ "
                "written by vrl_jax). Get one by downloading a Hugging Face checkpoint (e.g. "
                "Qwen/Qwen2.5-VL-7B-Instruct) and converting it: `python -m vrl_jax.convert to-orbax HF_DIR {path}`; "
                "or set --config.model.path= (empty) to build the tiny offline model in the workdir.")


@dataclasses.dataclass
class RunSetup:
    model_dir: str
    processor: VLProcessor
    model: Any
    graphdef: Any
    rewards: RewardSet
    eval_rewards: RewardSet  # accuracy under the evaluation's judge (`eval.judge`)
    visual: Any  # DyME's checker/refiner pair, or None
    sft_data: Any  # grain IterDataset of SFT batches, or None
    rl_data: Any
    eval_data: dict[str, Callable[[], Any]]  # split -> a fresh pass over its batches
    ref_params: Any  # RL's KL reference where it differs from the policy (`reference_copy`), or None
    faults: FaultCounter
    eval_batches: dict[str, int] = dataclasses.field(default_factory=dict)  # split -> batches per pass
    num_train: int = 0  # training examples after faults and over-long prompts were left out

    def close(self):
        self.rewards.close()
        self.eval_rewards.close()
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
    out = os.path.join(setup_dir(workdir), "data")
    s = c.data.synthgeo
    sizes = {"train": s.train, "val": s.val, "test_iid": s.test, "test_ood": s.test}
    gen = GeneratorConfig(seed=s.seed, levels=tuple(s.levels), text_fraction=s.text_fraction,
                          **({"families": tuple(s.families)} if s.families else {}))
    distributed.once("synthgeo", lambda: export_dataset(out, sizes, gen, formats=("maye",), progress=True),
                     done=lambda: os.path.exists(os.path.join(out, "manifest.json")))
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
    model_dir = os.path.join(setup_dir(workdir), "model")
    texts = [t for e in train_examples for t in (e.question, e.hint, e.solution, e.answer) if t]
    t = c.model.tiny
    distributed.once("tiny_model", lambda: build_tiny_model(
        model_dir, texts, family=t.family, seed=c.seed, vocab_size=t.vocab_size, hidden=t.hidden, layers=t.layers,
        intermediate=t.intermediate, vision_width=t.vision_width, vision_depth=t.vision_depth),
        done=lambda: os.path.exists(os.path.join(model_dir, "model.safetensors")))
    return model_dir


def setup_dir(workdir: str) -> str:
    """Where the run's generated inputs (the synthetic data, the tiny model) live: the workdir, or, for a
    remote one (gs://...), a local directory named after it, filled by each host from the same seed."""
    if "://" not in workdir:
        return workdir
    import re
    import tempfile
    return os.path.join(tempfile.gettempdir(), "vrl_jax_setup", re.sub(r"[^\w.-]+", "_", workdir))


def _missing_data_message(c, missing: list[tuple[str, str]]) -> str:
    origin = DATA_ORIGINS[c.data.source]
    files = "; ".join(f"config.{key} = {path}" for key, path in missing)
    out = "data/synthgeo"
    split_file = lambda split: f"{out}/{origin.synthgeo_file.format(split=split)}"  # noqa: E731
    try_it = (f"python -m vrl_jax.data.synthgeo --out {out} --train 2000 --val 100 --test 200 --formats "
              f"{origin.synthgeo_format}` and add `--config.data.train={split_file('train')} "
              f"--config.data.eval.val={split_file('val')} --config.data.eval.test={split_file('test_iid')}")
    return (f"data file(s) not found (relative to {os.getcwd()}): {files}. For data.source {c.data.source!r} each "
            f"should hold {origin.holds}. Get them from {origin.origin}. To try the recipe on synthetic data in "
            f"the same format, run `{try_it}`.")


def check_inputs(c, workdir: str) -> None:
    """The cheap checks that spare a user minutes of setup before a missing input stops the run: the
    data files exist, the model directory holds a loadable model, the workdir can be written. Raises one
    UserError naming every missing input, what it should hold and how to get it."""
    ensure_writable_dir(workdir, "--workdir")
    problems = []
    if c.data.source != "synthgeo":
        wanted = ([("data.train", c.data.train)] if c.data.train and (c.rl_steps or c.sft.steps) else []) + \
                 [(f"data.eval.{split}", path) for split, path in c.data.eval.items() if path]
        missing = [(key, path) for key, path in wanted if not os.path.isfile(path)]
        if missing:
            problems.append(_missing_data_message(c, missing))
    if c.model.path:
        try:
            check_model_dir(c.model.path)
        except UserError as e:
            problems.append(f"config.model.path: {str(e).rstrip('.')}. {MODEL_ORIGIN.format(path=c.model.path)}")
    if problems:
        raise UserError("\n".join(problems))


def prompt_length(example: Example, processor: VLProcessor, template) -> int:
    """Tokens of the rendered prompt with every image placeholder expanded (image headers only are read).
    Raises SampleFault (`corrupt_image`, `missing_image`) for an image whose header cannot be read."""

    from vrl_jax.data.prompts import build_messages
    text = processor.render(build_messages(example, template))
    n = len(processor.tokenizer(text, add_special_tokens=False)["input_ids"])
    for ref in example.images:
        w, h = _image_size(ref)
        n += processor.image_tokens_for_size(h, w, len(example.images)) - 1
    return n


def _image_size(ref) -> tuple[int, int]:
    """(width, height) from the image's header only; a file PIL cannot identify is a `corrupt_image` fault."""
    from PIL import Image
    if ref.path is None:
        return load_image(ref).size  # in memory: decoding is cheap and raises SampleFault itself
    try:
        with Image.open(ref.path) as im:
            return im.size
    except FileNotFoundError as err:
        raise SampleFault("missing_image", f"image file not found: {ref.path}") from err
    # UnidentifiedImageError (no decoder knows the bytes) is an OSError.
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise SampleFault("corrupt_image", f"cannot read image {ref.path}: {err}") from err


def drop_long_prompts(examples: list[Example], processor: VLProcessor, template, limit: int,
                      faults: FaultCounter) -> list[Example]:
    """Counts and reports (with the sample's file and line) prompts longer than the largest length
    bucket, and leaves them out, instead of letting one sample fail a whole batch mid-run."""
    kept = []
    for ex in examples:
        # The loader already counted each sample as good; a fault found here turns it into a faulty one.
        try:
            n = prompt_length(ex, processor, template)
        except SampleFault as fault:
            faults.record(fault.kind, ex.source or ex.id, fault.detail, counted_ok=True)
            continue
        if n > limit:
            faults.record("prompt_too_long", ex.source, f"prompt has {n} tokens, the largest length bucket is {limit}",
                          counted_ok=True)
        else:
            kept.append(ex)
    faults.check(final=True)
    return kept


def reward_spec(c) -> dict:
    weights = dict(c.rewards.weights)
    weights.setdefault("accuracy", 0.0)  # correctness is always measured, whether or not it is rewarded
    return {"weights": weights, "params": c.rewards.params.to_dict(), "overrides": c.rewards.overrides.to_dict(),
            "judge": c.rewards.judge.to_dict(), "plugins": c.rewards.plugins.to_dict()}


def eval_reward_spec(c) -> dict:
    """Accuracy alone (with the training reward's accuracy options, e.g. MAYE's answer key), judged by
    `eval.judge`: evaluation measures correctness, not the shaped training reward."""
    params = c.rewards.params.to_dict().get("accuracy", {})
    return {"weights": {"accuracy": 1.0}, "params": {"accuracy": params} if params else {},
            "judge": configs.eval_judge(c)}


def make_visual(c):
    """DyME's checker/refiner pair (`dyme.visual`), answering in the run's answer format, or None."""
    if c.algorithm != "dyme":
        return None
    from vrl_jax.rewards.visual import make_visual_supervision
    try:
        return make_visual_supervision(c.dyme.visual.to_dict(), answer_format=c.dyme.answer_format)
    except (ValueError, ImportError, OSError) as e:
        raise UserError(f"config.dyme.visual: {e}") from None


def rl_steps(c, num_train: int) -> int:
    """RL steps of the run: `rl_steps`, or `rl_epochs` passes over the training prompts (DyME and TRL
    count epochs over prompts) at `prompts_per_step` prompts a step."""
    return math.ceil(c.rl_epochs * num_train / c.prompts_per_step) if c.rl_epochs else c.rl_steps


LORA_KEY = 0x10A  # folded into the run's seed for the adapters' initial A


def reference_copy(c, params, mesh=None) -> dict:
    """RL's KL reference where it differs from the policy: a copy of the parameters that train, {dotted path:
    array}, placed like them. Frozen ones (a vision tower MAYE does not train, a LoRA run's base weights) are
    the policy's own, so `train_state.overlay` reads them from the current state instead of a second copy."""
    from vrl_jax.rl.train_state import trainable_params
    ref = {k: jnp.copy(v) for k, v in trainable_params(params, configs.optimizer_config(c, 1)).items()}
    return ref if mesh is None else sharding.put(ref, sharding.param_shardings(ref, mesh))


def distinct_problems(examples: list[Example]) -> int | None:
    """How many distinct problems `examples` hold, where every one names its problem (synthgeo's
    `semantic_key`: items repeat a problem with another picture or wording); None otherwise."""
    keys = [e.meta.get("semantic_key") for e in examples]
    return None if not keys or None in keys else len(set(keys))


def data_sizes(splits: dict[str, list[Example]]) -> str:
    """"12000 train (2055 distinct problems), 200 test_iid (76 distinct problems)": each split's examples, and
    its distinct problems where the data names them (a model can memorize a problem it meets repeatedly)."""
    parts = []
    for name, examples in splits.items():
        n = distinct_problems(examples)
        parts.append(f"{len(examples)} {name}" + ("" if n is None else f" ({n} distinct problems)"))
    return ", ".join(parts)


def prepare_run(c, workdir: str, mesh=None) -> RunSetup:
    """Data, model, processor, rewards and pipelines for a run. Every process reads the same global
    batches (see `vrl_jax.distributed`); with a `mesh` the reference parameters are placed on it."""
    visual = make_visual(c)  # a bad dyme.visual fails before the data and the model are read
    faults = FaultCounter(max_share=c.data.max_fault_share)
    if c.data.source == "synthgeo":
        train, evals = synthgeo_data(c, workdir, faults)
        evals = {k: v for k, v in evals.items() if k in tuple(c.eval.splits)}
    else:
        train, evals = file_data(c, faults)
    if c.eval.max_examples:
        evals = {k: v[:c.eval.max_examples] for k, v in evals.items()}
    check_breakdown(tuple(c.eval.breakdown), evals, "config.eval.breakdown")  # before the model is built
    model_dir = prepare_model(c, workdir, train)
    processor = VLProcessor.from_pretrained(model_dir, length_buckets=tuple(c.data.length_buckets),
                                            patch_buckets=tuple(c.data.patch_buckets))
    limit = max(c.data.length_buckets)
    train = drop_long_prompts(train, processor, c.data.template, limit, faults)
    evals = {k: drop_long_prompts(v, processor, c.data.template, limit, faults) for k, v in evals.items()}
    if (c.rl_steps or c.rl_epochs or c.sft.steps) and not train:
        raise UserError(f"no training example is left to train on: {faults.brief()}")
    print(f"data: {data_sizes({'train': train, **evals})} examples; {faults.brief()}", flush=True)
    model = load_model(model_dir, dtype=jnp.dtype(c.model.dtype), param_dtype=jnp.dtype(c.model.param_dtype))
    # No image of this run has more patches than the processor allows: vision attention stays within that.
    model.visual.max_segment = processor.image_processor.max_patches
    model.language.unroll_layers = c.model.unroll_layers
    if (lora_cfg := configs.lora_config(c)) is not None:  # the same adapters in every process (same key)
        lora.add_adapters(model, lora_cfg, jax.random.fold_in(jax.random.key(c.seed), LORA_KEY))
        if c.model.lora.quantize != "none":  # QLoRA: the language model's frozen projections in int8 / NF4
            quantize.quantize_layers(model.language.layers, lora.projection_names(model.language.layers),
                                     c.model.lora.quantize)
    graphdef, params = nnx.split(model, nnx.Param)
    needs_ref = bool(c.loss.kl_coef or (c.advantage.estimator == "reinforce_pp" and c.advantage.kl_reward_coef))
    ref_params = reference_copy(c, params.to_pure_dict(), mesh) if needs_ref else None
    # Batches have their images packed per row shard (each device encodes its own rows' images; the trainer
    # re-packs SFT and update batches per micro-batch), and each process computes the pixels of its own
    # devices' shards only: the others' images stay deferred until a layout puts them on this host's devices.
    def encode(rows: int):
        shards = sharding.row_shards(rows, mesh)
        return functools.partial(processor.encode_examples, shards=shards,
                                 local=sharding.local_blocks(shards, mesh))

    # Configured batch sizes are global, and every process reads (and decodes, so all agree on which samples
    # are faulty) the whole global batch: the same prompts, shapes and buckets on every host.
    common = dict(template=c.data.template, process_index=0, process_count=1, faults=faults)
    rl_data = train_dataset(train, encode(c.prompts_per_step), batch_size=c.prompts_per_step, seed=c.seed,
                            shuffle=c.data.shuffle, **common) \
        if c.rl_steps or c.rl_epochs else None
    sft_data = train_dataset(train, encode(c.sft.batch_size), batch_size=c.sft.batch_size, seed=c.seed + 1,
                             shuffle=c.data.shuffle, **common) \
        if c.sft.steps else None
    eval_data = {split: (lambda ex=ex: eval_dataset(ex, encode(c.eval.batch_size), batch_size=c.eval.batch_size,
                                                    **common))
                 for split, ex in evals.items() if ex}
    eval_batches = {split: eval_num_batches(len(ex), c.eval.batch_size) for split, ex in evals.items() if ex}
    return RunSetup(model_dir, processor, model, graphdef, RewardSet(reward_spec(c)), RewardSet(eval_reward_spec(c)),
                    visual, sft_data, rl_data, eval_data, ref_params, faults, eval_batches, len(train))
