"""Mesh construction, parameter rules with divisibility fallback, batch specs, sharded loading and state."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util
from jax.sharding import PartitionSpec as P

from tests.tiny_models import build_hf_model
from vrl_jax import sharding as shd
from vrl_jax.models.config import ModelConfig
from vrl_jax.models.weights import load_hf_params
from vrl_jax.rl.train_state import OptimizerConfig, create_train_state, train_state_shardings


@pytest.mark.parametrize("sizes,want", [
    ((-1, 1, 1), (8, 1, 1)),
    ((2, -1, 1), (2, 4, 1)),
    ((2, 2, -1), (2, 2, 2)),
    ((1, 8, 1), (1, 8, 1)),
])
def test_mesh_shape_resolves_the_free_axis(sizes, want):
    assert shd.mesh_shape(shd.MeshConfig(*sizes), 8) == want
    mesh = shd.make_mesh(sizes)
    assert mesh.axis_names == shd.AXES and tuple(mesh.shape.values()) == want
    assert mesh.devices.size == len(jax.devices()) == 8


@pytest.mark.parametrize("sizes,match", [
    ((3, 1, 1), r"data\*fsdp\*tensor = 3 must equal the number of devices \(8\)"),
    ((-1, 3, 1), r"MeshConfig.data=-1: the other axes multiply to 3"),
    ((-1, -1, 1), "only one axis may be -1"),
    ((0, 8, 1), "MeshConfig.data must be a positive int or -1"),
    ((2, 2, 1.5), "MeshConfig.tensor must be a positive int"),
])
def test_mesh_errors_name_the_axis(sizes, match):
    with pytest.raises(ValueError, match=match):
        shd.make_mesh(sizes)


def test_param_spec_rules_and_fallback():
    mesh = shd.make_mesh((2, 2, 2))
    spec = lambda path, shape: shd.param_spec(path, shape, mesh)  # noqa: E731
    assert spec("language.layers.q_w", (2, 64, 64)) == P(None, "fsdp", "tensor")
    assert spec("language.layers.down_w", (2, 128, 64)) == P(None, "tensor", "fsdp")
    assert spec("language.layers.k_b", (2, 32)) == P(None, "tensor")
    assert spec("language.embed", (1024, 64)) == P("tensor", "fsdp")
    assert spec("language.lm_head", (64, 1024)) == P("fsdp", "tensor")
    assert spec("visual.blocks.qkv_w", (4, 32, 96)) == P(None, "fsdp", "tensor")
    assert spec("visual.merger_fc2_w", (128, 64)) == P("tensor", "fsdp")
    # Dimensions that do not divide their axis fall back to replication on that dimension only.
    assert spec("language.layers.q_w", (2, 63, 64)) == P(None, None, "tensor")
    assert spec("language.embed", (1023, 64)) == P(None, "fsdp")
    assert spec("visual.patch_embed", (1176, 31)) == P(None, None)
    # Norms and unknown parameters are replicated; the layer axis is never split.
    assert spec("language.layers.input_norm", (2, 64)) == P()
    assert spec("language.norm", (64,)) == P()
    assert spec("something.else", (64, 64)) == P()
    # Axes of size 1 are dropped: on a pure data-parallel mesh every weight is replicated.
    dp = shd.make_mesh((8, 1, 1))
    assert shd.param_spec("language.layers.q_w", (2, 64, 64), dp) == P(None, None, None)
    # The first matching rule wins.
    rules = ((r"q_w$", ("tensor", None, None)), (r"^language\.", (None, "fsdp")))
    assert shd.param_spec("language.layers.q_w", (2, 64, 64), mesh, rules) == P("tensor", None, None)
    assert shd.param_spec("language.layers.k_w", (2, 64, 32), mesh, rules) == P(None, "fsdp", None)


def test_batch_spec_splits_rows_over_data_and_fsdp():
    mesh = shd.make_mesh((2, 2, 2))
    assert shd.batch_size_divisor(mesh) == 4
    assert shd.batch_spec((2, 8, 16), 1, mesh) == P(None, ("data", "fsdp"), None)
    assert shd.batch_spec((2, 3, 8, 16), 2, mesh) == P(None, None, ("data", "fsdp"), None)
    assert shd.batch_spec((2, 6, 16), 1, mesh) == P(None, None, None)  # 6 rows do not split 4 ways
    x = np.arange(2 * 8 * 4, dtype=np.float32).reshape(2, 8, 4)
    placed = shd.put({"x": x, "none": None}, {"x": jax.sharding.NamedSharding(mesh, shd.batch_spec(x.shape, 1, mesh)),
                                              "none": None})
    assert placed["none"] is None
    assert placed["x"].addressable_shards[0].data.shape == (2, 2, 4)
    np.testing.assert_array_equal(np.asarray(placed["x"]), x)
    assert shd.shardings_of(placed)["x"].spec == P(None, ("data", "fsdp"), None)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("qwen2_5_vl"))
    build_hf_model(d, "qwen2_5_vl", tie=False)
    return d


def test_streaming_loader_places_each_parameter_by_the_rules(checkpoint):
    config = ModelConfig.from_pretrained(checkpoint)
    mesh = shd.make_mesh((2, 2, 2))
    fn = shd.param_sharding_fn(mesh)
    sharded = load_hf_params(checkpoint, config, shardings=fn)
    plain = load_hf_params(checkpoint, config)
    got = traverse_util.flatten_dict(nnx.state(sharded, nnx.Param).to_pure_dict(), sep=".")
    want = traverse_util.flatten_dict(nnx.state(plain, nnx.Param).to_pure_dict(), sep=".")
    assert got.keys() == want.keys()
    split = 0
    for path, value in got.items():
        assert value.sharding == fn(path, value.shape), path
        assert value.sharding.spec == shd.param_spec(path, value.shape, mesh)
        split += value.sharding.spec != P()
        np.testing.assert_array_equal(np.asarray(value), np.asarray(want[path]), err_msg=path)
    assert split >= 15  # most weights really are split
    assert got["language.layers.gate_w"].addressable_shards[0].data.shape == (2, 32, 64)  # [L, H/fsdp, I/tensor]


def test_train_state_on_a_mesh_shards_moments_like_their_parameters(checkpoint):
    config = ModelConfig.from_pretrained(checkpoint)
    mesh = shd.make_mesh((2, 2, 2))
    model = load_hf_params(checkpoint, config)
    state, _, _ = create_train_state(model, OptimizerConfig(train_connector=True), mesh=mesh)
    params = traverse_util.flatten_dict(state.params, sep=".")
    for path, value in params.items():
        assert value.sharding.spec == shd.param_spec(path, value.shape, mesh), path
    moments = [(".".join(str(getattr(k, "key", k)) for k in kp), x)
               for kp, x in jax.tree_util.tree_leaves_with_path(state.opt_state) if x.ndim > 0]
    trainable = [p for p in params if not p.startswith("visual.blocks") and p != "visual.patch_embed"]
    assert len(moments) == 2 * len(trainable)  # mu and nu, none for the frozen ViT
    for name, x in moments:
        path = next(p for p in trainable if name.endswith("." + p))
        assert x.sharding == params[path].sharding, name
    for x in (state.step, state.skipped, state.rng):
        assert x.sharding.is_fully_replicated
    assert jnp.asarray(state.step) == 0
    # The same layout from shapes alone (what a sharded checkpoint restore needs).
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    from_shapes = train_state_shardings(abstract, mesh)
    assert jax.tree.structure(from_shapes) == jax.tree.structure(train_state_shardings(state))
    for want, got in zip(jax.tree.leaves(train_state_shardings(state)), jax.tree.leaves(from_shapes)):
        assert want == got


def test_the_cpu_host_split_sets_the_device_count_unless_xla_flags_does():
    """`mesh.cpu_devices` becomes XLA's host device count before JAX starts (the training command runs it
    first; the two-device run in tests/test_train_e2e.py goes through it), and never overrides a count the
    user's XLA_FLAGS give."""
    from vrl_jax import distributed
    from vrl_jax.configs import base_config
    c = base_config()
    env = {"XLA_FLAGS": "--xla_backend_optimization_level=0"}
    assert distributed.split_cpu_host(c, env) is None and env["XLA_FLAGS"] == "--xla_backend_optimization_level=0"
    c.mesh.cpu_devices = 2
    assert distributed.split_cpu_host(c, env) == 2
    assert env["XLA_FLAGS"] == "--xla_backend_optimization_level=0 --xla_force_host_platform_device_count=2"
    given = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    assert distributed.split_cpu_host(c, given) is None
    assert given == {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    empty = {}
    assert distributed.split_cpu_host(c, empty) == 2
    assert empty == {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    assert shd.MeshConfig.of(c.mesh) == shd.MeshConfig(data=-1, fsdp=1, tensor=1)


def test_the_compilation_cache_is_off_on_a_split_cpu_host(monkeypatch):
    """On a CPU backend of several devices the training command turns JAX's persistent compilation cache off
    (executables with in-process collectives loaded from it deadlocked in 11 of 26 smoke runs on two devices);
    one CPU device, or an accelerator, keeps it."""
    from vrl_jax import distributed
    assert jax.default_backend() == "cpu" and jax.local_device_count() > 1  # conftest's virtual devices
    before = jax.config.values["jax_enable_compilation_cache"]
    try:
        jax.config.update("jax_enable_compilation_cache", True)
        with monkeypatch.context() as m:
            m.setattr(jax, "local_device_count", lambda *a: 1)
            assert distributed.cache_off_on_split_host() is False
        assert jax.config.values["jax_enable_compilation_cache"] is True
        with monkeypatch.context() as m:
            m.setattr(jax, "default_backend", lambda: "gpu")
            assert distributed.cache_off_on_split_host() is False
        assert jax.config.values["jax_enable_compilation_cache"] is True
        assert distributed.cache_off_on_split_host() is True
        assert jax.config.values["jax_enable_compilation_cache"] is False
    finally:
        jax.config.update("jax_enable_compilation_cache", before)
