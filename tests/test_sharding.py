"""The core test of sharding: the same model and batch give the same loss and gradients on every mesh.

Meshes are data x fsdp x tensor over the 8 simulated devices (1x1x1 uses one of them). Computation is fp32;
sharded reductions add in a different order, so values agree to rtol 2e-5 / atol 1e-7, not bitwise.
"""

import jax
import numpy as np
import pytest
from conftest import init_params

from bigjax import mesh as mesh_lib
from bigjax import optim, train
from bigjax import state as state_lib
from bigjax.tasks import make_task

# data x fsdp x tensor: one device, pure data parallel, FSDP, and all three axes at once.
MESHES = [(1, 1, 1), (8, 1, 1), (2, 4, 1), (2, 2, 2)]
RTOL, ATOL = 2e-5, 1e-7


def fixed_batch(config, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 256, (config.batch_size, config.data.seq_len + 1), dtype=np.int32)
    weights = np.ones((config.batch_size, config.data.seq_len), np.float32)
    weights[0, -5:] = 0  # some padding, so the masked mean is exercised too
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": weights}


def assert_trees_close(tree, reference, what, rtol=RTOL, atol=ATOL):
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    for (path, leaf), want in zip(leaves, jax.tree.leaves(reference), strict=True):
        np.testing.assert_allclose(leaf, want, rtol=rtol, atol=atol, err_msg=f"{what}: {jax.tree_util.keystr(path)}")


def on_mesh(config, shape):
    config.mesh.update(dict(zip(mesh_lib.MESH_AXES, shape, strict=True)))
    devices = jax.devices()[: int(np.prod(shape))]
    return mesh_lib.make_mesh(config, devices), mesh_lib.logical_rules(config)


def loss_and_grads(task, params, batch, mesh, rules, param_shardings):
    def mean_loss(p, b):
        sums, _ = task.loss_sums(p, {}, b)
        return sums["loss"] / sums["count"]

    fn = jax.jit(
        jax.value_and_grad(mean_loss),
        in_shardings=(param_shardings, mesh_lib.batch_sharding(mesh)),
    )
    with mesh_lib.activate(mesh, rules):
        return fn(params, mesh_lib.global_batch_from_host(batch, mesh))


@pytest.mark.parametrize("variant", ["gpt2", "llama"])
def test_loss_and_gradients_match_on_every_mesh(tiny_config, variant):
    config = tiny_config("llama=True" if variant == "llama" else "")
    task, batch = make_task(config), fixed_batch(config)
    reference = None
    for shape in MESHES:
        mesh, rules = on_mesh(config, shape)
        _, shardings = state_lib.abstract_variables_and_shardings(task, config.seed, mesh, rules)
        shardings = shardings["params"]
        if reference is None:
            host_params = jax.device_get(init_params(task))
        params = jax.device_put(host_params, shardings)
        loss, grads = jax.device_get(loss_and_grads(task, params, batch, mesh, rules, shardings))
        if reference is None:
            reference = (loss, grads)
            continue
        np.testing.assert_allclose(loss, reference[0], rtol=RTOL, atol=ATOL, err_msg=f"loss on mesh {shape}")
        assert_trees_close(grads, reference[1], f"gradients on mesh {shape}")


def test_parameters_really_are_sharded(tiny_config):
    config = tiny_config()
    task = make_task(config)
    mesh, rules = on_mesh(config, (2, 2, 2))
    tx = optim.make_optimizer(config.optim, config.total_steps)
    _, shardings = state_lib.abstract_state_and_shardings(task, tx, config.seed, mesh, rules)
    state = state_lib.create_sharded_state(task, tx, config.seed, mesh, rules, shardings)
    up = state.params["layers"]["mlp"]["up"]["kernel"]  # [layers, embed, mlp]
    assert up.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    # Each device holds a quarter of it: embed split over fsdp=2, mlp over tensor=2.
    assert up.addressable_shards[0].data.shape == (up.shape[0], up.shape[1] // 2, up.shape[2] // 2)
    # Adam's moments are sharded like the parameters they belong to.
    moments = [leaf for leaf in jax.tree.leaves(state.opt_state) if getattr(leaf, "shape", None) == up.shape]
    assert len(moments) == 2 and all(m.sharding.spec == up.sharding.spec for m in moments)  # mu and nu


@pytest.mark.parametrize("variant", ["gpt2", "llama"])
def test_train_steps_match_on_every_mesh(tiny_config, variant):
    """Sharded init + the compiled train step: same parameters and metrics after 3 steps on each mesh."""
    config = tiny_config("llama=True" if variant == "llama" else "")
    task = make_task(config)
    tx = optim.make_optimizer(config.optim, config.total_steps)
    batches = [fixed_batch(config, seed) for seed in range(3)]
    reference = None
    # Each mesh is a compile of its own (seconds on the CI's CPU): two per variant, between them every axis.
    for shape in [(1, 1, 1), (2, 2, 2)] if variant == "gpt2" else [(1, 1, 1), (1, 4, 2)]:
        mesh, rules = on_mesh(config, shape)
        _, shardings = state_lib.abstract_state_and_shardings(task, tx, config.seed, mesh, rules)
        state = state_lib.create_sharded_state(task, tx, config.seed, mesh, rules, shardings)
        step, _ = train.compile_train_step(task, tx, config, mesh, rules, state, shardings)
        losses = []
        for batch in batches:
            state, m = step(state, mesh_lib.global_batch_from_host(batch, mesh))
            losses.append(m["loss"])
        result = jax.device_get((losses, state.params))
        if reference is None:
            reference = result
            continue
        np.testing.assert_allclose(result[0], reference[0], rtol=RTOL, err_msg=f"losses on mesh {shape}")
        assert_trees_close(result[1], reference[1], f"parameters after 3 steps on mesh {shape}", rtol=1e-4, atol=1e-6)


def test_a_mesh_that_does_not_divide_a_parameter_is_a_clear_error(tiny_config):
    from bigjax.config import ConfigError

    config = tiny_config("llama=True")  # 2 key/value heads cannot split 4 ways
    task = make_task(config)
    mesh, rules = on_mesh(config, (1, 2, 4))
    with pytest.raises(ConfigError, match=r"layers/attention/key/kernel has size 2 in dimension 2.*tensor=4"):
        state_lib.abstract_variables_and_shardings(task, config.seed, mesh, rules)
