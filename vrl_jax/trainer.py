"""The training loop: MAYE's four steps, one optional SFT stage before them, evaluation and checkpoints.

Read `train` top to bottom. One step of RL is `rl_step`:
  1. data flow   a batch of prompts from the grain pipeline (images already packed into a bucket);
  2. rollout     n samples per prompt from the compiled sampler (one prefill per prompt);
  3. trajectory and reward   decode, score with the reward set, turn rewards into credit
                 (GRPO / Dr.GRPO / RLOO / REINFORCE++ advantages, or DyME's per-group modes);
  4. policy update   lay the rows out as micro-batches and run the jitted, sharded train step.
Where each step's code lives: 1. `data/pipeline.py`; 2. `sampling/sampler.py`; 3. `rewards/compose.py`,
`rl/algorithms.py` -> `rl/advantages.py`; 4. `rl/batching.py` -> `rl/train_step.py` -> `rl/logprobs.py`, `rl/losses.py`
(`python tools/trace_step.py` lists every function one step runs).
On several hosts every process runs this same loop on the same global batch (`distributed.py`).
Every source of randomness is a function of (seed, step) or lives in the checkpointed state, so a
run killed at any step and restarted resumes exactly.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
from flax import nnx

from vrl_jax import configs, distributed, host_malloc, sharding
from vrl_jax.checkpointing import Checkpointer, PreemptionGuard, config_fingerprint
from vrl_jax.errors import as_user_error
from vrl_jax.evaluation.evaluator import Evaluator, settings_from_names
from vrl_jax.evaluation.metrics import EpochAccumulator, step_metrics
from vrl_jax.evaluation.progress import Progress
from vrl_jax.evaluation.reflection import analyze_reflection, reflection_metrics
from vrl_jax.evaluation.writers import MetricWriter
from vrl_jax.memory import GiB, device_memory_limit
from vrl_jax.models.image_processing import DeferredPatches
from vrl_jax.plan import check_fits
from vrl_jax.rewards.visual.base import hint_then_answer
from vrl_jax.rl import algorithms, batching
from vrl_jax.rl.logprobs import make_logprob_fn
from vrl_jax.rl.losses import max_abs_ratio_minus_one, sequence_kl
from vrl_jax.rl.train_state import create_train_state, overlay, train_state_shardings
from vrl_jax.rl.train_step import OnMesh, StepConfig, make_train_step
from vrl_jax.run_files import (checkpoint_template, export_policy, load_reference, read_config, restored_state,
                               save_reference, saved_state, write_config)
from vrl_jax.run_setup import RunSetup, check_inputs, prepare_run, rl_steps, setup_dir
from vrl_jax.sampling.sampler import Sampler, SamplerConfig, decode_responses
from vrl_jax.timing import CompileWatch, PhaseTimer


def batch_shapes(tb, prompts=None) -> dict[str, float]:
    """The bucketed shapes a step compiled for (a new combination compiles the sampler or the train step
    once): the train batch's columns and patches per image buffer (one per micro-batch, or per device's
    rows of it), and the sampler's prompt columns and patches per buffer."""
    out = {"shapes/train_columns": float(tb.input_ids.shape[-1]),
           "shapes/train_patches": float(0 if tb.vision is None else tb.vision.pixel_values.shape[-2])}
    if prompts is not None:
        out["shapes/prompt_columns"] = float(prompts.input_ids.shape[1])
        out["shapes/prompt_patches"] = float(0 if prompts.vision is None else prompts.vision.pixel_values.shape[-2])
    return out


def reference_text(example: dict, fmt: str) -> str:
    """The supervised target of an example: its hint followed by the answer line in `fmt` ("boxed" or
    "flag"), which is also what DyME's no-op refiner memorizes, so SFT and DyME train on the same text;
    an example with a worked solution and no hint (MAYE's data) trains on the solution."""
    hint, solution = (example.get("hint") or "").strip(), (example.get("solution") or "").strip()
    if hint or not solution:
        return hint_then_answer(hint, str(example["answer"]), fmt)
    return solution


_FALLBACK = "_checker_fallback"  # per row, gathered with the rewards; taken out before they are logged


class Loop:
    """The pieces one run needs, built once: model graph, samplers, compiled steps, writers."""

    def __init__(self, config, workdir: str, setup: RunSetup, mesh=None):
        self.c, self.workdir, self.s, self.mesh = config, workdir, setup, mesh
        c = config
        self.stop_ids = tuple(setup.processor.config.eos_token_ids) or (setup.processor.tokenizer.eos_token_id,)
        self.pad_id = setup.processor.pad_token_id
        n_new = c.rollout.max_new_tokens
        self.sampler = Sampler(setup.graphdef, SamplerConfig(
            max_new_tokens=n_new, num_samples=c.rollout.num_samples, top_k=c.rollout.top_k,
            stop_token_ids=self.stop_ids, pad_token_id=self.pad_id, decode_segments=c.rollout.decode_segments), mesh=mesh)
        loss = configs.loss_config(c, max_len=n_new)
        self.rl_cfg = StepConfig(batch_size=c.prompts_per_step * c.rollout.num_samples, num_micro=c.num_micro,
                                 num_mini=c.num_mini, ppo_epochs=c.ppo_epochs, loss=loss, remat=c.model.remat,
                                 chunk_size=c.loss.chunk_size, temperature=c.rollout.temperature or 1.0,
                                 with_entropy=True,
                                 old_logprobs="forward" if c.rollout.old_logprobs == "forward" else "batch")
        # The SFT stage trains the NLL of the references alone: no KL term (RL's reference is the policy RL
        # starts from, which SFT is still making) and no entropy bonus.
        self.sft_cfg = StepConfig(batch_size=c.sft.batch_size, num_micro=c.num_micro,
                                  loss=dataclasses.replace(loss, kl_coef=0.0, entropy_coef=0.0),
                                  remat=c.model.remat, chunk_size=c.loss.chunk_size, with_entropy=False)
        a = c.advantage
        self.credit_cfg = algorithms.CreditConfig(
            algorithm=c.algorithm, estimator=a.estimator, num_samples=c.rollout.num_samples, eps=a.eps, gamma=a.gamma,
            kl_reward_coef=a.kl_reward_coef, whiten=a.whiten, shift_mean=a.shift_mean,
            num_whiten_shards=a.num_whiten_shards)
        self.needs_ref = bool(c.loss.kl_coef or (c.advantage.estimator == "reinforce_pp" and
                                                  c.advantage.kl_reward_coef))
        # Log-probs of a batch under some parameters (the reference's, the sampling policy's), read on
        # the host: replicated over the mesh, so every process holds every row.
        self.logprob_fn = OnMesh(lambda shardings: make_logprob_fn(
            setup.graphdef, chunk_size=c.loss.chunk_size, temperature=self.rl_cfg.temperature,
            batch_shardings=shardings, out_sharding=None if mesh is None else sharding.replicated(mesh)), mesh)
        self.evaluator = Evaluator(setup.graphdef, setup.processor, setup.eval_rewards,
                                   settings_from_names(c.eval.settings, c.eval.pass_k,
                                                       c.eval.max_new_tokens or n_new),
                                   self.stop_ids, self.pad_id, mesh=mesh, decode_segments=c.rollout.decode_segments,
                                   breakdown=tuple(c.eval.breakdown))
        self.key = jax.random.key(c.seed)
        if setup.visual is not None and hasattr(setup.visual.checker, "impl") and c.dyme.thinking_weight:
            print(f"DyME thinking reward: {setup.visual.checker.impl}", flush=True)

    # -- the update's inputs ------------------------------------------------------------------

    def sft_targets(self, examples, refine: bool = False) -> list[list[int]]:
        """Reference rationale + final answer + EOS, tokenized (DyME memorization, SFT): the refiner's
        text when `refine`, else `reference_text` in the run's answer format."""
        c, tok = self.c, self.s.processor.tokenizer
        texts = None
        if refine and self.s.visual is not None:  # each process refines its share of the rows
            mine = distributed.share(len(examples))
            texts = distributed.gather_texts(list(self.s.visual.refiner.refine(examples[mine]).texts), len(examples))
        fmt = "flag" if c.dyme.answer_format == "flag" or c.data.template == "dyme_answer" else "boxed"
        if texts is None:
            texts = [reference_text(e, fmt) for e in examples]
        return [tok(text, add_special_tokens=False)["input_ids"] + [self.stop_ids[0]] for text in texts]

    def train_batch(self, prompts, tokens, mask, logprobs, num_samples, advantages, sft_weights, row_images,
                    ref_logprobs=None):
        c = self.c
        seqs = batching.build_sequences(prompts, tokens, mask, logprobs, num_samples, self.pad_id)
        rows = len(seqs.input_ids)
        group = batching.shared_prompt_group(rows, c.num_micro, num_samples)
        # One image buffer per device's block of a micro-batch's rows, when the blocks hold whole groups.
        shards = sharding.row_shards(rows // c.num_micro, self.mesh)
        shards = shards if (rows // c.num_micro // shards) % group == 0 else 1
        vision = batching.pack_micro_batches(row_images, seqs.prompt_index, c.num_micro, self.s.processor,
                                            self.s.processor.patch_buckets, group, shards,
                                            local=sharding.local_blocks(shards, self.mesh))
        return batching.to_train_batch(seqs, advantages, sft_weights, c.num_micro, vision, ref_logprobs, group), seqs

    def response_logprobs(self, params, ro: batching.Rollouts, tokens, mask, logprobs):
        """float [R, N]: log-probs of the sampled response tokens under `params` (0 off the mask)."""
        rows = len(tokens)
        tb, _ = self.train_batch(ro.inputs, tokens, mask, logprobs, self.c.rollout.num_samples, np.zeros(rows),
                                 np.zeros(rows), ro.row_images)
        full = np.asarray(self.logprob_fn(params, tb).logprobs)
        return batching.response_slice(full.reshape(rows, -1), ro.inputs.input_ids.shape[1], tokens.shape[1]) * mask

    # -- one step of each stage ---------------------------------------------------------------

    def sft_step(self, state, step_fn, batch):
        targets = self.sft_targets(batch.examples)
        rows = len(targets)
        longest = max(len(t) for t, ok in zip(targets, batch.valid) if ok) if np.any(batch.valid) else 1
        n_new = batching.target_width(longest, self.c.sft.max_target_tokens)
        truncated = sum(len(t) > n_new for t, ok in zip(targets, batch.valid) if ok)
        tokens, mask, lp = batching.replace_responses(np.zeros((rows, n_new), np.int32),
                                                     np.zeros((rows, n_new), np.int32),
                                                     np.zeros((rows, n_new), np.float32), range(rows), targets)
        weights = np.asarray(batch.valid, np.float32)
        tb, _ = self.train_batch(batch.inputs, tokens, mask, lp, 1, np.zeros(rows), weights, batch.inputs.row_images)
        state, metrics = step_fn(state, tb)
        out = {f"sft/{k}": float(v) for k, v in jax.device_get(metrics).items()}
        out["sft/truncated_targets"] = float(truncated)  # longer than sft.max_target_tokens
        return state, {**out, **batch_shapes(tb)}

    def rollout_round(self, params, batch, key, timer: PhaseTimer) -> batching.Rollouts:
        """Steps 2 and 3 for one batch of prompts: sample n responses each, decode, score."""
        c = self.c
        with timer("sample"):
            out = jax.device_get(self.sampler(params, batch.inputs, key, temperature=c.rollout.temperature,
                                              top_p=c.rollout.top_p))
        with timer("score"):
            return self.score(batch, out)

    def score(self, batch, out) -> batching.Rollouts:
        """Step 3's rewards for sampled responses: decode, judge, and DyME's thinking reward. Each process
        judges its share of the rows and the scores are gathered, so every process holds all of them. With DyME's
        thinking reward the rewards also hold `_FALLBACK`, per row: whether the checker fell back."""
        c, s, n = self.c, self.s, self.c.rollout.num_samples
        texts = decode_responses(s.processor.tokenizer, out.tokens, out.mask)
        examples = [e for e in batch.examples for _ in range(n)]
        mine = distributed.share(len(texts))
        local = {k: np.asarray(v, np.float32) for k, v in s.rewards(
            texts[mine], examples[mine], lengths=out.lengths[mine], truncated=~out.stopped[mine]).items()}
        dyme_thinking = c.algorithm == "dyme" and c.dyme.thinking_weight and s.visual is not None
        if dyme_thinking:
            checked = s.visual.checker.check(texts[mine], examples[mine])
            local["thinking"] = np.nan_to_num(np.asarray(checked.scores, np.float32))
            local[_FALLBACK] = np.asarray(checked.fallback, np.float32)
        rewards = distributed.gather_rows(local, len(texts))
        if dyme_thinking:
            # DyME's total is format + accuracy + thinking (NaN, a checker that could not score, counts 0).
            rewards["total"] = np.asarray(rewards["total"], np.float32) + c.dyme.thinking_weight * rewards["thinking"]
        return batching.Rollouts(batch.inputs, list(batch.examples), np.asarray(batch.valid), out.tokens, out.mask,
                                out.logprobs, out.lengths, out.stopped, texts,
                                {k: np.asarray(v, np.float32) for k, v in rewards.items()})

    def collect(self, params, next_batch, first_batch, step: int, timer: PhaseTimer) -> tuple[batching.Rollouts, int]:
        """Rollouts for one step. With DAPO's dynamic sampling, groups whose `dapo.filter_on` reward is the
        same for every sample are dropped and more prompts are drawn until the batch is full (at most
        `dapo.max_rounds` rounds); if it is still short, dropped groups fill it back, as invalid rows
        (`dapo.fill = "masked"`: they count nowhere) or as zero-advantage rows ("zero_advantage")."""
        c, n = self.c, self.c.rollout.num_samples
        key = jax.random.fold_in(self.key, step)
        first = self.rollout_round(params, first_batch, jax.random.fold_in(key, 0), timer)
        if not c.dapo.dynamic_sampling:
            return first, 1
        kept, dropped, rounds, batch = [], [], 0, first
        while True:
            keep = algorithms.dynamic_sampling_keep(batch.rewards, n, on=c.dapo.filter_on, valid=batch.valid)
            kept += [(batch, g) for g in np.flatnonzero(keep)]
            dropped += [(batch, g) for g in np.flatnonzero(~keep)]
            rounds += 1
            if len(kept) >= c.prompts_per_step or rounds >= c.dapo.max_rounds:
                break
            batch = self.rollout_round(params, next_batch(), jax.random.fold_in(key, rounds), timer)
        choice = algorithms.choose_groups(kept, dropped, c.prompts_per_step)
        ro = batching.select_groups(choice.chosen, n, self.pad_id)
        if c.dapo.fill == "masked":
            ro = ro._replace(valid=ro.valid & ~choice.filler)
        return ro, rounds

    def rl_step(self, state, step_fn, batch, step: int, next_batch=None, fetch_metrics: bool = True):
        """One RL step, its phases timed apart (sample, score, reference, credit, update). The update's
        device metrics are fetched only when `fetch_metrics` (a logging step): no host sync otherwise."""
        c, n = self.c, self.c.rollout.num_samples
        timer = PhaseTimer()
        # 2. rollout and 3. trajectory and reward (steps 1-3 repeat under dynamic sampling)
        ro, rounds = self.collect(state.params, next_batch, batch, step, timer)
        rewards = dict(ro.rewards)
        fallback = rewards.pop(_FALLBACK, None)
        valid = np.repeat(ro.valid, n)
        # Rows of padding prompts and of DAPO's fillers count in no loss, denominator or whitening statistic.
        mask = ro.mask * valid[:, None].astype(ro.mask.dtype)
        ref = None
        if self.needs_ref:  # the reference policy's log-probs of the sampled tokens (KL reward / KL loss)
            with timer("reference"):
                ref = self.response_logprobs(overlay(state.params, self.s.ref_params), ro, ro.tokens, mask,
                                             ro.logprobs)
        with timer("credit"):
            tb, cred, extra = self.credit_batch(ro, mask, valid, ref)
        if c.rollout.old_logprobs == "recompute":  # pi_old from the training forward, not the sampler
            with timer("reference"):
                sampler_logprobs = tb.old_logprobs
                tb = tb._replace(old_logprobs=np.asarray(self.logprob_fn(state.params, tb).logprobs))
                rl_tokens = tb.loss_mask * (tb.sft_weights[..., None] == 0)
                extra["training/sampler_max_abs_ratio_minus_1"] = float(max_abs_ratio_minus_one(
                    tb.old_logprobs, sampler_logprobs, rl_tokens))
        # 4. policy update
        with timer("update"):
            state, update = step_fn(state, tb)
            if fetch_metrics:
                update = jax.device_get(update)
            else:  # the update's time is still its own; its metrics stay on the device
                timer.block(state.params)
                update = None
        correct = rewards["accuracy"]
        reflection = analyze_reflection(ro.texts, correct, match=c.log.reflection_match)
        # MAYE's training/kl: per sequence, the sum of k3(ref || rollout policy) over the sampled tokens.
        kl_seq = None if ref is None else np.asarray(sequence_kl(ro.logprobs, ref, ro.mask))
        metrics = step_metrics(
            rewards=rewards, response_lengths=ro.lengths, max_tokens=c.rollout.max_new_tokens, correct=correct,
            stopped=ro.stopped, group_size=n, modes=cred.modes, update=update, temperature=c.rollout.temperature,
            kl_per_sequence=kl_seq, kl_reward=cred.kl_reward, timings=timer.seconds,
            rollout_tokens=int(np.asarray(ro.lengths).sum()), update_tokens=int(tb.loss_mask.sum()),
            num_devices=jax.device_count(), generation_step=step, gradient_step=int(state.step), epoch=batch.epoch)
        metrics.update(reflection_metrics(reflection.counts))
        metrics.update(cred.stats)
        metrics.update(extra)
        if fallback is not None:
            metrics["thinking/fallback_share"] = float(np.mean(fallback))
            # which keyword extractor scored (the lexical checker): spaCy, as DyME runs it, or the offline
            # lemminflect approximation
            metrics["thinking/spacy"] = float(getattr(self.s.visual.checker, "backend", "") == "spacy")
        metrics.update(batch_shapes(tb, ro.inputs))
        metrics["dapo/sampling_rounds"] = float(rounds)
        if c.dapo.dynamic_sampling:
            metrics["dapo/filler_groups"] = float((~ro.valid).sum())
        sample = ro.texts[reflection.example] if reflection.example is not None else None
        return state, metrics, correct[valid], sample

    def credit_batch(self, ro: batching.Rollouts, mask, valid, ref):
        """Step 3's credit and the update's batch: advantages (or DyME's modes, with memorized rows'
        references in place of their responses), laid out as micro-batches. Returns (batch, credit, metrics)."""
        c, n = self.c, self.c.rollout.num_samples
        tokens, logprobs, total = ro.tokens, ro.logprobs, ro.rewards["total"]
        cred = algorithms.credit(self.credit_cfg, total, ro.rewards["accuracy"], response_mask=mask,
                                 logprobs=logprobs, ref_logprobs=ref)
        sft_weights = np.zeros(len(total), np.float32)
        extra = {}
        if cred.sft_rows.any():
            rows = np.flatnonzero(cred.sft_rows)
            examples = [e for e in ro.examples for _ in range(n)]
            targets = self.sft_targets([examples[r] for r in rows], refine=c.dyme.refine)
            tokens, mask, logprobs, truncated = batching.insert_targets(tokens, mask, logprobs, rows, targets,
                                                                       c.dyme.max_target_tokens)
            extra["dyme/truncated_targets"] = float(truncated)  # longer than dyme.max_target_tokens
            sft_weights[rows] = 1.0
        advantages = cred.advantages
        if advantages.ndim == 2:  # token level over the response -> over the whole row
            advantages = batching.response_to_row(advantages, ro.inputs.input_ids.shape[1])
        advantages = advantages * (valid[:, None] if advantages.ndim == 2 else valid)
        ref_rows = None if ref is None else batching.response_to_row(ref, ro.inputs.input_ids.shape[1])
        tb, _ = self.train_batch(ro.inputs, tokens, mask, logprobs, n, advantages, sft_weights * valid,
                                 ro.row_images, ref_logprobs=ref_rows)
        return tb, cred, extra


# Per-step means kept over each RL epoch (with the training accuracy), summarised on the epoch's last step.
EPOCH_KEYS = ("rews/scores", "response/response_lengths", "training/entropy", "health/zero_variance_groups")


@dataclasses.dataclass
class TrainResult:
    """The last evaluation's metrics, and why the run stopped early (a signal), or None if it finished."""

    metrics: dict
    stopped: str | None = None


def train(config, workdir: str, allow_config_change: bool = False) -> TrainResult:
    """Runs an experiment in `workdir` (resuming it if it holds checkpoints). Returns the last eval.

    The config is validated and the inputs checked (`run_setup.check_inputs`) first. A workdir whose checkpoints were written with another config is refused (the error lists the keys
    that differ) before anything is written or built, unless `allow_config_change`. A damaged latest
    checkpoint is set aside and the run resumes from the newest intact one. When a write fails (a full
    disk), the half-written checkpoint is removed, so the workdir holds only complete ones.
    """
    c = config
    configs.validate(c, jax.device_count())
    check_inputs(c, workdir)  # data files, model directory, a writable workdir: before anything slow
    check_fits(c, jax.device_count(), c.memory.device_gib * GiB if c.memory.device_gib else device_memory_limit())
    # How the processes joined (`distributed`) and the memory check are not part of the experiment.
    recorded = {k: v for k, v in c.to_dict().items() if k not in ("distributed", "memory")}
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=c.checkpoint.keep,
                        best_metric=c.checkpoint.best_metric or None, fingerprint=config_fingerprint(recorded),
                        config=recorded)
    ckpt.check_config(allow_config_change, previous=read_config(workdir))
    if distributed.is_main():
        write_config(workdir, recorded)  # only once the checkpoints accept this config
    distributed.barrier("vrl_jax:config")
    try:
        return _train(c, workdir, ckpt, allow_config_change)
    except Exception as e:
        if as_user_error(e) is not None:  # a write failed: keep only complete checkpoints
            ckpt.discard_unfinished()
        raise


def _train(c, workdir: str, ckpt: Checkpointer, allow_config_change: bool) -> TrainResult:
    mesh = sharding.make_mesh(sharding.MeshConfig.of(c.mesh)) if jax.device_count() > 1 else None
    layout = "" if mesh is None else " (mesh " + " ".join(f"{k}={v}" for k, v in mesh.shape.items()) + ")"
    print(f"devices: {jax.device_count()} {jax.devices()[0].platform}{layout}", flush=True)
    print(f"host malloc: {host_malloc.describe()}", flush=True)  # vrl_jax/host_malloc.py
    setup = prepare_run(c, workdir, mesh)
    loop = Loop(c, workdir, setup, mesh)
    total_steps = c.sft.steps + rl_steps(c, setup.num_train)

    def new_state(stage: str, params=None):
        updates = (c.sft.steps if stage == "sft" else (total_steps - c.sft.steps) * c.num_mini * c.ppo_epochs)
        lr = c.sft.learning_rate if stage == "sft" else None
        model = setup.model if params is None else nnx.merge(setup.graphdef, params)
        opt_cfg = configs.optimizer_config(c, updates, lr, stage=stage)
        state, _, _ = create_train_state(model, opt_cfg, seed=c.seed, mesh=mesh)
        step_cfg = loop.sft_cfg if stage == "sft" else loop.rl_cfg
        placed = None if mesh is None else dict(mesh=mesh, state_shardings=train_state_shardings(state))
        return state, OnMesh(lambda shardings: make_train_step(
            setup.graphdef, opt_cfg, step_cfg, donate=True,
            **({} if placed is None else dict(placed, batch_shardings=shardings))), mesh)

    stage = "sft" if c.sft.steps else "rl"
    state, step_fn = new_state(stage)
    iters = {name: (iter(ds) if ds is not None else None) for name, ds in (("sft", setup.sft_data), ("rl", setup.rl_data))}
    start = 0
    # The RL epoch being accumulated (None before the first RL step) and its running sums; both are in
    # every checkpoint, so a resumed run summarises its epoch exactly as an uninterrupted one.
    acc, acc_epoch = EpochAccumulator.create(EPOCH_KEYS), None
    restored, damaged = ckpt.restore_latest_intact(
        lambda step: checkpoint_template(c, state, mesh, "sft" if stage == "sft" and step <= c.sft.steps else "rl"),
        allow_config_change=allow_config_change)
    for d in damaged:
        print(f"checkpoint step {d.step} cannot be restored and was set aside as {d.set_aside_as} (kept, not "
              f"deleted); resuming from step {restored.step}. Why: {d.reason}", flush=True)
    if restored is not None:
        start, state = restored.step, restored_state(state, restored.state)
        stage = restored.extra["stage"]
        if restored.extra.get("epoch_acc") is not None:
            acc, acc_epoch = EpochAccumulator.from_dict(restored.extra["epoch_acc"]), restored.extra["acc_epoch"]
        if stage == "rl" and c.sft.steps:
            _, step_fn = new_state("rl")
            if loop.needs_ref:
                setup.ref_params = load_reference(c, state.params, workdir, mesh)
        for name, st in (restored.data_state or {}).items():
            if iters.get(name) is not None and st is not None:
                iters[name].set_state(st)
        print(f"resumed {workdir} at step {start} ({stage})", flush=True)
    writer = MetricWriter(workdir, process_index=jax.process_index(), resume_step=start if start else None,
                          tensorboard=c.log.tensorboard, wandb=c.log.wandb, wandb_project=c.log.wandb_project,
                          run_name=c.name, config=c.to_dict())
    last_eval: dict = {}
    stopped = None
    compiles = CompileWatch()

    def evaluate(params, step: int) -> dict:
        """Every eval split under `params`, written at `step`; returns the metrics of all splits."""
        out = {}
        for split, batches in setup.eval_data.items():
            metrics, samples, outcomes = loop.evaluator.evaluate_split(params, batches(), jax.random.fold_in(
                jax.random.key(c.seed + 1), step), split, keep_samples=c.log.samples_per_eval,
                num_batches=setup.eval_batches.get(split, 0))
            out.update(metrics)
            writer.write_samples(split, step, samples)
            writer.write_outcomes(split, step, outcomes)
        count, seconds = compiles.take()  # the evaluation's own compiling, apart from the step's
        writer.write(step, {**out, "compile/count": count, "time/compile": seconds}, split="eval", kind="eval")
        return out

    def write_epoch(step: int, acc: EpochAccumulator, epoch: int, complete: bool):
        # "epoch" counts completed epochs as the report reads it (0 = before training), so RL epoch 0 is
        # logged as 1. Every process holds every rollout (see `vrl_jax.distributed`): nothing to pool.
        writer.write(step, {**acc.result(), "epoch": epoch + 1, "epoch/complete": float(complete)},
                     split="epoch", kind="epoch")

    with PreemptionGuard() as guard, Progress(total_steps, desc=c.name, initial=start) as bar:
        print(f"{c.name}: steps {start + 1}-{total_steps} in {workdir}; SIGTERM or Ctrl-C saves a checkpoint "
              "after the current step and stops", flush=True)
        if start == 0 and setup.eval_data and c.eval.at_start:
            last_eval = evaluate(state.params, 0)
        for step in range(start, total_steps):
            done = step + 1
            log_now = done % c.log.every_steps == 0 or done == total_steps
            profiling = done in tuple(c.log.profile_steps)
            if profiling:  # (the profiler writes local files: a bucket run traces into its local setup dir)
                jax.profiler.start_trace(os.path.join(setup_dir(workdir), "profile"))
            if stage == "sft" and step >= c.sft.steps:
                stage = "rl"
                state, step_fn = new_state("rl", state.params)
                if loop.needs_ref:
                    setup.ref_params = save_reference(c, state.params, workdir, mesh)
            batch = next(iters[stage])
            if stage == "sft":
                state, metrics = loop.sft_step(state, step_fn, batch)
            else:
                if acc_epoch is not None and batch.epoch != acc_epoch:  # the previous epoch ended at `step`
                    write_epoch(step, acc, acc_epoch, complete=True)
                    acc = acc.reset()
                acc_epoch = int(batch.epoch)
                state, metrics, correct, sample = loop.rl_step(state, step_fn, batch, step, fetch_metrics=log_now,
                                                               next_batch=lambda: next(iters["rl"]))
                acc = acc.update(correct, {k: metrics[k] for k in EPOCH_KEYS if k in metrics})
                if sample and log_now:
                    writer.write_text(done, "reflective_correct_sample", sample)
            if profiling:
                jax.profiler.stop_trace()
            # Compiling is reported apart from the phases it slowed: after warm-up it should stay at 0.
            metrics["compile/count"], metrics["time/compile"] = compiles.take()
            metrics["stage"] = 0.0 if stage == "sft" else 1.0
            if log_now:
                writer.write(done, metrics, split="train")
            # Evaluate at the start (eval.at_start), at the SFT -> RL boundary, at the end, and every N steps.
            if setup.eval_data and (done in (c.sft.steps, total_steps) or
                                    (c.eval.every_steps and done % c.eval.every_steps == 0)):
                last_eval = evaluate(state.params, done)
            bar.update(1, metrics)
            data_state = {k: (it.get_state() if it is not None else None) for k, it in iters.items()}
            if done == total_steps and acc_epoch is not None:  # the last, possibly partial, epoch
                write_epoch(done, acc, acc_epoch, complete=False)
            extra = {"stage": stage, "eval": last_eval, "epoch_acc": acc.to_dict(), "acc_epoch": acc_epoch}
            # checkpoint.every_steps = 0: only at the end (and on a stop signal, below).
            if (c.checkpoint.every_steps and done % c.checkpoint.every_steps == 0) or done == total_steps:
                writer.flush()
                ranked = last_eval if ckpt.best_metric and ckpt.best_metric in last_eval else None
                ckpt.save(done, saved_state(c, state), data_state, extra, metrics=ranked, force=True)
            if guard.should_stop(done, ckpt):
                writer.flush()
                ckpt.save(done, saved_state(c, state), data_state, extra, force=True)
                stopped = (f"stopped by signal ({guard.reason}) at step {done}: checkpoint saved in "
                           f"{workdir}/checkpoints; run the same command again to resume")
                break
    ckpt.wait()
    ckpt.close()
    writer.close()
    if setup.faults.num_faults:
        print(f"data: {setup.faults.brief()}", flush=True)
    if DeferredPatches.computed():  # each host resizes and patchifies only its own devices' images
        print(f"data: {DeferredPatches.computed()} images preprocessed by process {jax.process_index()} "
              f"of {jax.process_count()}", flush=True)
    if stopped:
        setup.close()
        return TrainResult(last_eval, stopped)
    if c.checkpoint.export_hf:  # every process gathers the tensors it holds; process 0 writes
        export_policy(c, nnx.merge(setup.graphdef, state.params), workdir, setup.model_dir)
    setup.close()
    return TrainResult(last_eval)
