"""Optimizer options for DyME's HF Trainer defaults: the schedules against transformers' own schedulers,
and the weight-decay masks against HF Trainer's `get_decay_parameter_names` on real HF models."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from tests.rl_batches import model_config
from tests.tiny_models import hf_config
from vrl_jax.models.weights import abstract_model, match
from vrl_jax.rl.train_state import (DECAY_MASKS, OptimizerConfig, lr_schedule, make_optimizer, trainable_params,
                                    weight_decay_mask)


def _hf_lrs(make_scheduler, total: int, base: float = 2.0) -> list[float]:
    """The learning rate HF applies at update k (the scheduler steps after each optimizer step)."""
    import torch
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=base)
    sched = make_scheduler(opt)
    lrs = []
    for _ in range(total + 3):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


@pytest.mark.parametrize("warmup", [0, 3])
def test_linear_and_constant_schedules_equal_transformers(warmup):
    from transformers import get_constant_schedule_with_warmup, get_linear_schedule_with_warmup
    total = 10
    for name, make in (("linear", lambda o: get_linear_schedule_with_warmup(o, warmup, total)),
                       ("constant", lambda o: get_constant_schedule_with_warmup(o, warmup))):
        schedule = lr_schedule(OptimizerConfig(learning_rate=2.0, warmup_steps=warmup, total_steps=total,
                                               schedule=name))
        np.testing.assert_allclose([float(schedule(k)) for k in range(total + 3)], _hf_lrs(make, total),
                                   rtol=1e-6, atol=1e-7, err_msg=name)
    linear = lr_schedule(OptimizerConfig(learning_rate=2.0, warmup_steps=warmup, total_steps=total, schedule="linear"))
    assert float(linear(total)) == 0.0 and float(linear(total + 5)) == 0.0  # decays to 0 and stays


def test_schedule_and_mask_names_are_checked():
    with pytest.raises(ValueError, match="OptimizerConfig.schedule must be one of .*'cosine'"):
        OptimizerConfig(schedule="step")
    with pytest.raises(ValueError, match="OptimizerConfig.decay_mask must be one of .*'no_bias_norm'"):
        OptimizerConfig(decay_mask="none")


def _paths(family: str) -> list[str]:
    _, abstract = abstract_model(model_config(family, tie=False))
    return list(traverse_util.flatten_dict(abstract.to_pure_dict(), sep="."))


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_hf_trainer_mask_equals_hf_trainers_decay_parameters(family):
    import torch  # noqa: F401  (HF models)
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration, Trainer
    cls = Qwen2VLForConditionalGeneration if family == "qwen2_vl" else Qwen2_5_VLForConditionalGeneration
    model = cls(hf_config(family, tie=False))
    decayed = set(Trainer.get_decay_parameter_names(None, model))  # the method does not use `self`
    want = {}
    for name, _ in model.named_parameters():
        path = match(name)[0]
        want.setdefault(path, set()).add(name in decayed)
    assert all(len(v) == 1 for v in want.values())  # every layer of a stacked parameter agrees
    want = {p: v.pop() for p, v in want.items()}
    got = DECAY_MASKS["hf_trainer"](_paths(family))
    assert got == want
    # HF decays Qwen2.5-VL's vision RMSNorm weights (not nn.LayerNorm, no name match); Qwen2-VL's are LayerNorms.
    assert got["visual.blocks.norm1_w"] == (family == "qwen2_5_vl")
    assert not got["language.layers.input_norm"] and not got["language.norm"] and not got["language.layers.q_b"]


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_no_bias_norm_mask_excludes_every_bias_and_norm(family):
    got = DECAY_MASKS["no_bias_norm"](_paths(family))
    excluded = {p for p, decays in got.items() if not decays}
    assert excluded == {p for p in got if p.endswith("_b") or "norm" in p.rsplit(".", 1)[-1]}
    assert {"language.norm", "language.layers.post_norm", "visual.blocks.norm2_w", "visual.merger_norm_w",
            "language.layers.k_b", "visual.blocks.qkv_b"} <= excluded
    assert got["language.layers.q_w"] and got["language.embed"] and got["visual.patch_embed"]


def test_decay_mask_reaches_the_optimizer():
    """One AdamW update with zero gradients moves only decayed parameters (by -lr * wd * p)."""
    params = {"language": {"layers": {"q_w": jnp.ones((2, 2)), "q_b": jnp.ones(2), "input_norm": jnp.ones(2)},
                           "norm": jnp.ones(2)}}
    for mask, moved in (("all", {"q_w", "q_b", "input_norm", "norm"}), ("no_bias_norm", {"q_w"}),
                        ("hf_trainer", {"q_w"})):
        cfg = OptimizerConfig(learning_rate=0.5, weight_decay=0.1, schedule="constant", decay_mask=mask,
                              clip_grad_norm=None)
        opt, trainable = make_optimizer(cfg), trainable_params(params, cfg)
        zeros = jax.tree.map(jnp.zeros_like, trainable)
        flat, _ = opt.update(zeros, opt.init(trainable), trainable)
        changed = {k.rsplit(".", 1)[-1] for k, u in flat.items() if np.any(np.asarray(u) != 0)}
        assert changed == moved, mask
        np.testing.assert_allclose(flat["language.layers.q_w"], -0.5 * 0.1, rtol=1e-6)
        decays = traverse_util.flatten_dict(weight_decay_mask(params, cfg), sep=".")
        assert {k.rsplit(".", 1)[-1] for k, v in decays.items() if v} == moved


def test_adam_with_moments_stored_in_float32_is_optax_adam():
    """`scale_by_adam_stored_in(float32)` is `optax.scale_by_adam` (three updates, 1e-7): the bfloat16
    variant differs only in how the moments are stored."""
    import optax

    from vrl_jax.rl.train_state import scale_by_adam_stored_in
    rs = np.random.RandomState(0)
    params = {"w": jnp.asarray(rs.randn(4, 3), jnp.float32), "b": jnp.asarray(rs.randn(3), jnp.float32)}
    ours, theirs = scale_by_adam_stored_in(jnp.float32, 0.9, 0.95, 1e-5), optax.scale_by_adam(0.9, 0.95, 1e-5)
    s1, s2 = ours.init(params), theirs.init(params)
    for _ in range(3):
        grads = jax.tree.map(lambda p: jnp.asarray(rs.randn(*p.shape), jnp.float32), params)
        u1, s1 = ours.update(grads, s1)
        u2, s2 = theirs.update(grads, s2)
        for k in params:
            np.testing.assert_allclose(np.asarray(u1[k]), np.asarray(u2[k]), rtol=1e-6, atol=1e-7)
    low = scale_by_adam_stored_in(jnp.bfloat16, 0.9, 0.95, 1e-5).init(params)
    assert {x.dtype for x in jax.tree.leaves((low.mu, low.nu))} == {jnp.dtype(jnp.bfloat16)}
