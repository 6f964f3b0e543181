"""The core test of sharding: the same model and batch give the same loss and gradients on every mesh.

Meshes are data x fsdp x tensor over the 8 simulated devices (1x1x1 uses one of them). Computation is fp32;
sharded reductions add in a different order, so values agree to rounding, not bitwise: within the bounds of
tests/tolerance.py, which count the terms of the sums each value went through.
"""

import flax.linen as nn
import jax
import numpy as np
import pytest
from conftest import init_params
from tolerance import (
    assert_close_after_reordering,
    assert_sgd_params_close_after_reordering,
    float32_sum_tolerance,
    lm_sum_lengths,
)

from bigjax.run import step as step_lib
from bigjax.run.setup import make_setup

# data x fsdp x tensor: one device, pure data parallel, FSDP, and all three axes at once.
MESHES = [(1, 1, 1), (8, 1, 1), (2, 4, 1), (2, 2, 2)]


def fixed_batch(config, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 256, (config.batch_size, config.data.seq_len + 1), dtype=np.int32)
    weights = np.ones((config.batch_size, config.data.seq_len), np.float32)
    weights[0, -5:] = 0  # some padding, so the masked mean is exercised too
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": weights}


def on_mesh(config, shape):
    """The setup of `config` on a data x fsdp x tensor mesh of that shape (over the first devices)."""
    config.mesh.update(dict(zip(("data", "fsdp", "tensor"), shape, strict=True)))  # context: the default 1
    return make_setup(config, jax.devices()[: int(np.prod(shape))])


def loss_and_grads(setup, params, batch):
    def mean_loss(p, b):
        sums, _ = setup.task.loss_sums(p, {}, b)
        return sums["loss"] / sums["count"]

    fn = jax.jit(jax.value_and_grad(mean_loss), in_shardings=(setup.state_shardings.params, setup.sharding.batch))
    with setup.sharding.activate():
        return fn(params, setup.sharding.global_batch(batch))


@pytest.mark.parametrize("variant", ["gpt2", "llama"])
def test_loss_and_gradients_match_on_every_mesh(tiny_config, variant):
    config = tiny_config("llama=True" if variant == "llama" else "")
    batch = fixed_batch(config)
    reference = None
    for shape in MESHES:
        setup = on_mesh(config, shape)
        if reference is None:
            host_params = jax.device_get(init_params(setup.task))
        params = jax.device_put(host_params, setup.state_shardings.params)
        loss, grads = jax.device_get(loss_and_grads(setup, params, batch))
        if reference is None:
            reference = (loss, grads)
            continue
        # The loss (a mean of terms >= 0) and the gradients within the bound of the sums they went through.
        tolerance = float32_sum_tolerance(*lm_sum_lengths(config, tokens=batch["weights"].size))
        np.testing.assert_allclose(loss, reference[0], rtol=tolerance, err_msg=f"loss on mesh {shape}")
        assert_close_after_reordering(grads, reference[1], tolerance, f"gradients on mesh {shape}")


# What the default rules are meant to do, written out here rather than read from bigjax.config, so that a rule that
# changes is caught: the model dimension splits over fsdp; heads, key/value heads, the MLP and the vocabulary over
# tensor; layer stacks over stage (the pipeline); the head dimension and positions stay whole.
MESH_AXIS_OF = {
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "vocab": "tensor",
    "kv": None,
    "layers": "stage",  # consecutive blocks of layers per pipeline stage (one block where stage=1)
    "positions": None,
}


def padded(spec, rank: int) -> tuple:
    """A PartitionSpec as one entry per dimension (a spec may leave out trailing unsplit dimensions)."""
    return tuple(spec) + (None,) * (rank - len(spec))


@pytest.mark.parametrize("variant", ["gpt2", "llama"])
def test_every_parameter_is_sharded_as_its_logical_axes_say(tiny_config, variant):
    config = tiny_config("llama=True" if variant == "llama" else "")
    setup = on_mesh(config, (2, 2, 2))
    state = setup.init_state()
    logical = nn.get_partition_spec(jax.eval_shape(setup.task.init_variables, jax.random.key(0))["params"])
    names_seen = set()

    def check(path, names, param):
        where = jax.tree_util.keystr(path)
        assert len(names) == param.ndim, f"{where}: logical names {names} for a parameter of shape {param.shape}"
        expected = tuple(MESH_AXIS_OF[name] for name in names)
        assert padded(param.sharding.spec, param.ndim) == expected, f"{where} {names}: {param.sharding.spec}"
        # And each device really holds only its share: 2 ways along each split dimension (stage: one way here).
        ways = lambda axis: setup.mesh.shape[axis] if axis else 1
        shard = tuple(size // ways(axis) for size, axis in zip(param.shape, expected, strict=True))
        assert param.addressable_shards[0].data.shape == shard, where
        names_seen.update(names)

    is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)
    jax.tree_util.tree_map_with_path(check, logical, state.params, is_leaf=is_spec)
    # Every kind of parameter was there: attention and MLP kernels, embeddings, norms.
    assert {"embed", "heads", "kv_heads", "kv", "mlp", "vocab", "layers"} <= names_seen
    # Adam's moments are sharded like the parameters they belong to.
    adam = [s for s in jax.tree.leaves(state.opt_state, is_leaf=lambda x: hasattr(x, "mu")) if hasattr(s, "mu")]
    assert len(adam) == 1
    for moments in (adam[0].mu, adam[0].nu):
        jax.tree.map(assert_same_spec, moments, state.params)


def assert_same_spec(moment, param):
    assert padded(moment.sharding.spec, moment.ndim) == padded(param.sharding.spec, param.ndim)


@pytest.mark.parametrize("variant", ["gpt2", "llama"])
def test_train_steps_match_on_every_mesh(tiny_config, variant):
    """Sharded init + the compiled train step: same parameters and metrics after 3 steps on each mesh.

    With SGD (momentum, weight decay) and no clipping, whose update is linear in the gradient, so that parameters
    differ by what the gradients do. Adam divides by the root of each gradient's second moment: an element whose
    gradient is near 0 may move by up to the learning rate on one mesh and not on another, whatever the rounding.
    Clipping would divide every update by the gradient's global norm, a sum over every parameter, whose bound would
    swamp the gradient's.
    """
    config = tiny_config("llama=True" if variant == "llama" else "", "config.optim.name=sgd", "config.optim.clip=0")
    batches = [fixed_batch(config, seed) for seed in range(3)]
    reference = initial = None
    # Each mesh is a compile of its own (seconds on the CI's CPU): two per variant, between them every axis.
    for shape in [(1, 1, 1), (2, 2, 2)] if variant == "gpt2" else [(1, 1, 1), (1, 4, 2)]:
        setup = on_mesh(config, shape)
        state = setup.init_state()
        initial = jax.device_get(state.params) if initial is None else initial
        step, _ = step_lib.compile_train_step(setup)
        losses = []
        for batch in batches:
            state, m = step(state, setup.sharding.global_batch(batch))
            losses.append(m["loss"])
        result = jax.device_get((losses, state.params))
        if reference is None:
            reference = result
            continue
        # Losses: the forward pass's sums (the parameters of later steps differ by far less than that moves them).
        lengths = lm_sum_lengths(config, tokens=config.batch_size * config.data.seq_len)
        np.testing.assert_allclose(
            result[0], reference[0], rtol=float32_sum_tolerance(*lengths), err_msg=f"losses on mesh {shape}"
        )
        # Parameters: updates as the gradients' sums allow, and one rounding of each step's params + update.
        tolerance, what = float32_sum_tolerance(*lengths), f"parameters after 3 steps on mesh {shape}"
        assert_sgd_params_close_after_reordering(result[1], reference[1], initial, tolerance, len(batches), what)


def test_a_mesh_that_does_not_divide_a_parameter_is_a_clear_error(tiny_config):
    from bigjax.config import ConfigError

    config = tiny_config("llama=True")  # 2 key/value heads cannot split 4 ways
    with pytest.raises(ConfigError, match=r"layers/attention/key/kernel has size 2 in dimension 2.*tensor=4"):
        on_mesh(config, (1, 2, 4))
