"""Magnitude pruning (bigjax.compress.prune): off changes nothing, the schedule reaches its target to the count
with exact
zeros, 2:4 holds in every group, the masks are checkpointed and a resumed run is bit-exact, the masks are the same on
every mesh, bad combinations are one `error:` line, and a pruned run evaluates."""

import dataclasses
import functools

import jax
import numpy as np
import optax
import pytest
import test_sharding
from conftest import TINY
from tolerance import assert_sgd_params_close_after_reordering, float32_sum_tolerance, lm_sum_lengths

from bigjax import params as params_lib
from bigjax.compress import prune
from bigjax.ops import metrics
from bigjax.run import checkpoint, optim, train
from bigjax.run import step as step_lib
from bigjax.run.setup import make_setup


def pruning_config(tiny_config, kind="unstructured", *overrides, arg="", start=1, end=4, every=2, sparsity=0.5):
    return tiny_config(
        arg,
        f"config.prune.kind={kind}",
        f"config.prune.sparsity={sparsity}",
        f"config.prune.start_step={start}",
        f"config.prune.end_step={end}",
        f"config.prune.every={every}",
        *overrides,
    )


def run_steps(setup, steps: int, state=None):
    """`steps` compiled train steps on fixed batches: (the states after each step, as host arrays, and the losses)."""
    step, _ = step_lib.compile_train_step(setup)
    state = setup.init_state() if state is None else state
    states, losses = [], []
    for seed in range(steps):
        state, m = step(state, setup.sharding.global_batch(test_sharding.fixed_batch(setup.config, seed)))
        states.append(jax.device_get(state))
        losses.append(float(m["loss"]))
    return states, losses


def host_masks(state) -> dict:
    return {name: np.asarray(mask) for name, mask in prune.masks_of(state.opt_state).items()}


def layer_slices(array, layout):
    """The slices a kernel is pruned by: one per layer of a stacked kernel, as rows."""
    leading = tuple(range(len(layout.layer_axes)))
    rows = np.moveaxis(array, layout.layer_axes, leading)
    return rows.reshape(int(np.prod(rows.shape[: len(leading)])), -1)


# --------------------------------------------------------------------------------------------------
# Off is today's run


def test_prune_off_adds_nothing_and_trains_bit_identically_to_the_plain_optimizer(tiny_config):
    config = tiny_config("", "config.optim.warmup_steps=0")
    assert config.prune.kind == "none"
    setup = make_setup(config)
    plain = optim.make_optimizer(config.optim, config.total_steps)  # as before bigjax.compress.prune
    assert jax.tree.structure(setup.abstract_state.opt_state) == jax.tree.structure(
        jax.eval_shape(plain.init, setup.abstract_state.params)
    )
    assert prune.from_config(config, setup.task) is None
    ours, _ = run_steps(setup, 3)
    theirs, _ = run_steps(dataclasses.replace(setup, tx=plain), 3)
    jax.tree.map(np.testing.assert_array_equal, ours[-1], theirs[-1])


def test_before_start_step_a_pruned_run_trains_as_an_unpruned_one(tiny_config):
    """The wrapper is transparent while every mask is True: gradients and updates pass through jnp.where unchanged.
    The two programs are fused differently by XLA, which may round their sums apart (seen: 3 of 12288 weights an ulp
    off after 3 steps, with the tests' XLA flags): within the bounds of a reordering, with SGD, whose update is
    linear in the gradient (a masked weight would be off by a whole update)."""
    sgd = ("config.optim.name=sgd", "config.optim.clip=0")
    pruned_setup = make_setup(pruning_config(tiny_config, "unstructured", *sgd, start=3, end=6, every=1))
    dense_setup = make_setup(tiny_config("", *sgd))
    dense_start = dense_setup.init_state()
    initial = jax.device_get(dense_start.params)
    pruned_states, pruned_losses = run_steps(pruned_setup, 3)
    dense_states, dense_losses = run_steps(dense_setup, 3, dense_start)
    config = dense_setup.config
    tolerance = float32_sum_tolerance(*lm_sum_lengths(config, tokens=config.batch_size * config.data.seq_len))
    np.testing.assert_allclose(pruned_losses, dense_losses, rtol=tolerance)
    params = pruned_states[-1].params
    assert_sgd_params_close_after_reordering(params, dense_states[-1].params, initial, tolerance, 3, "params")
    assert all(mask.all() for mask in host_masks(pruned_states[-1]).values())


# --------------------------------------------------------------------------------------------------
# The schedule, exact zeros, 2:4


def test_unstructured_sparsity_follows_the_schedule_and_ends_exactly_at_the_target(tiny_config):
    sparsity, start, end, every = 0.7, 1, 5, 3  # updates at counts 1, 4 and 5 (the end, off the grid)
    setup = make_setup(pruning_config(tiny_config, start=start, end=end, every=every, sparsity=sparsity))
    pruning = prune.from_config(setup.config, setup.task)
    assert set(pruning.layouts) == {  # kernels only: no embedding, norm or bias
        f"layers/{block}/kernel"
        for block in ("attention/query", "attention/key", "attention/value", "attention/out", "mlp/up", "mlp/down")
    }
    states, _ = run_steps(setup, 7)
    # After the step whose optimizer count was t, each layer has the schedule's count of zeros (Zhu & Gupta's cubic
    # ramp, written out here), and no more.
    updates_at = [start, start + every, end]
    for t, state in enumerate(states):
        last = max([u for u in updates_at if u <= t], default=None)
        progress = 0 if last is None else (last - start) / (end - start)
        fraction = 0 if last is None else sparsity * (1 - (1 - progress) ** 3)
        params, masks = params_lib.by_path(state.params), host_masks(state)
        for name, layout in pruning.layouts.items():
            n = layout.slice_size
            want = round(sparsity * n) if last == end else round(fraction * n)
            zeros = (layer_slices(params[name], layout) == 0).sum(axis=1)
            pruned = (~layer_slices(masks[name], layout)).sum(axis=1)
            assert list(pruned) == [want] * len(pruned), f"{name} after count {t}"
            assert list(zeros) == list(pruned), f"{name} after count {t}: zeros are the pruned weights"
            # Pruned weights are +0.0, bit for bit.
            assert (np.asarray(params[name])[~masks[name]].view(np.uint32) == 0).all()
    # Masks only grow: what was pruned stays pruned.
    for before, after in zip(states, states[1:], strict=False):
        for name, mask in host_masks(after).items():
            assert not (mask & ~host_masks(before)[name]).any(), name


def test_the_pruned_weights_are_the_smallest_of_each_layer(tiny_config):
    """One-shot at step 0: the mask comes from the initial weights alone, per layer, smallest |w| first."""
    setup = make_setup(pruning_config(tiny_config, start=0, end=0, sparsity=0.25))
    start = setup.init_state()
    initial = params_lib.by_path(jax.device_get(start.params))
    states, _ = run_steps(setup, 1, start)
    pruning = prune.from_config(setup.config, setup.task)
    for name, mask in host_masks(states[0]).items():
        layout = pruning.layouts[name]
        for weights, kept in zip(layer_slices(initial[name], layout), layer_slices(mask, layout), strict=True):
            k = round(0.25 * weights.size)
            assert np.array_equal(np.sort(np.argsort(np.abs(weights), stable=True)[:k]), np.flatnonzero(~kept)), name


def test_unstructured_ties_are_broken_in_index_order_and_pruned_weights_stay_pruned():
    layout = prune.Layout(shape=(2, 4), layer_axes=(0,), reduction_axes=())
    weights = np.array([[1.0, 1.0, 1.0, 1.0], [0.5, -3.0, 0.5, 2.0]], np.float32)
    keep = np.asarray(prune.unstructured_mask(weights, np.ones((2, 4), bool), layout, 2))
    assert keep.tolist() == [[False, False, True, True], [False, True, False, True]]
    old = np.array([[True, True, True, False], [True, True, True, True]])  # a weight pruned before, whatever it is now
    keep = np.asarray(prune.unstructured_mask(weights, old, layout, 1))
    assert keep.tolist() == [[True, True, True, False], [False, True, True, True]]


def test_two_four_keeps_the_two_largest_of_each_group_the_earlier_on_a_tie():
    layout = prune.Layout(shape=(8, 1), layer_axes=(), reduction_axes=(0,))
    weights = np.array([1.0, -3.0, 2.0, 0.5, 1.0, 1.0, 1.0, 1.0], np.float32)[:, None]
    keep = np.asarray(prune.two_four_mask(weights, np.ones((8, 1), bool), layout))[:, 0]
    assert keep.tolist() == [False, True, True, False, True, True, False, False]


def two_four_groups(array, layout):
    """The groups of 4 along the kernel's innermost reduction axis, as rows of 4."""
    moved = np.moveaxis(array, layout.reduction_axes[-1], -1)
    return moved.reshape(-1, 4)


@pytest.mark.parametrize("variant", ["gpt2", "llama"])
def test_two_four_holds_in_every_group_along_the_reduction_axis(tiny_config, variant):
    config = pruning_config(tiny_config, "2:4", arg="llama=True" if variant == "llama" else "", start=1, end=1)
    setup = make_setup(config)
    pruning = prune.from_config(config, setup.task)
    # The attention output's reduction is over (heads, kv): its groups run along kv, the innermost.
    assert pruning.layouts["layers/attention/out/kernel"].reduction_axes == (1, 2)
    assert pruning.layouts["layers/attention/query/kernel"].reduction_axes == (1,)
    states, _ = run_steps(setup, 3)
    before = params_lib.by_path(states[0].params)  # the weights the count-1 mask was computed from
    for state in states[1:]:
        params, masks = params_lib.by_path(state.params), host_masks(state)
        for name, layout in pruning.layouts.items():
            kept = two_four_groups(masks[name], layout)
            assert (kept.sum(axis=1) == 2).all(), name
            assert ((two_four_groups(params[name], layout) == 0) == ~kept).all(), name
            # The kept two are the two largest |w| of their group at pruning time.
            magnitude = np.abs(two_four_groups(before[name], layout))
            assert (
                np.where(kept, magnitude, np.inf).min(axis=1) >= np.where(kept, -np.inf, magnitude).max(axis=1)
            ).all()


# --------------------------------------------------------------------------------------------------
# Checkpoints and resume

PRUNED_RUN = (
    "config.log_every=1",
    "config.optim.name=sgd",
    "config.optim.clip=0",
    "config.prune.kind=unstructured",
    "config.prune.start_step=1",
    "config.prune.end_step=5",
    "config.prune.every=2",
)


def restored_state(workdir, config, step):
    setup = make_setup(config)
    mngr = checkpoint.manager(workdir, read_only=True)
    return jax.device_get(checkpoint.restore_train_state(mngr, step, setup.state_target()).state)


def test_masks_are_checkpointed_and_a_resumed_run_is_bit_identical(tiny_config, tmp_path):
    config = tiny_config("", *PRUNED_RUN)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train.train(config, straight).step == 8
    assert train.train(config, resumed, stop_at_step=4).status == "preempted"  # masks updated at counts 1, 3 and 5
    at_stop = restored_state(resumed, config, 4)
    masks = host_masks(at_stop)
    assert masks and any((~mask).any() for mask in masks.values())  # the checkpoint holds the masks, some pruned
    params = params_lib.by_path(at_stop.params)
    for name, mask in masks.items():
        assert (params[name][~mask] == 0).all(), name
    assert train.train(config, resumed).step == 8

    losses = lambda workdir: {
        r["step"]: r["loss"] for r in metrics.read_jsonl(workdir / "metrics.jsonl") if "loss" in r
    }
    assert losses(resumed) == losses(straight)  # every step, bitwise
    final = restored_state(resumed, config, 8), restored_state(straight, config, 8)
    jax.tree.map(np.testing.assert_array_equal, *final)  # params, masks, momenta, counts


# --------------------------------------------------------------------------------------------------
# Meshes

MESHES = [(1, 1, 1), (8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 2, 4)]


@pytest.mark.parametrize("kind", ["unstructured", "2:4"])
def test_masks_are_the_same_on_every_mesh_and_sharded_like_their_parameters(tiny_config, kind):
    """The same weights (random, with many ties) placed on each mesh give the same masks bit for bit: the sort and
    the groups run on the logical array, whatever its sharding."""
    config = pruning_config(tiny_config, kind, start=0, end=0)
    reference = None
    for shape in MESHES:
        setup = test_sharding.on_mesh(config, shape)
        pruning = prune.from_config(setup.config, setup.task)
        state = setup.init_state()
        param_shardings = params_lib.by_path(setup.state_shardings.params)
        for name, mask in prune.masks_of(state.opt_state).items():  # each mask sharded as its parameter
            assert mask.sharding.is_equivalent_to(param_shardings[name], mask.ndim), name
        rng = np.random.default_rng(0)
        weights = {
            name: rng.integers(-20, 20, layout.shape).astype(np.float32) for name, layout in pruning.layouts.items()
        }
        shardings = {name: param_shardings[name] for name in weights}

        with setup.sharding.activate():
            masks = jax.device_get(jax.jit(functools.partial(all_masks, pruning))(jax.device_put(weights, shardings)))
        reference = masks if reference is None else reference
        for name, mask in masks.items():
            np.testing.assert_array_equal(mask, reference[name], err_msg=f"{name} on mesh {shape}")


def all_masks(pruning, weights: dict) -> dict:
    """The masks a first pruning (every mask True before) gives `weights`."""
    return {
        name: prune.new_mask(pruning, layout, weights[name], np.ones(layout.shape, bool), 0)
        for name, layout in pruning.layouts.items()
    }


def test_pruned_training_matches_on_every_mesh(tiny_config):
    """One-shot pruning at step 0 from the same initial weights, then 3 SGD steps on (1,1,1), (2,2,2), (1,4,2): the
    same masks bit for bit, the losses and parameters within the bounds of test_sharding's equivalence test."""
    config = pruning_config(tiny_config, "unstructured", "config.optim.name=sgd", "config.optim.clip=0", start=0, end=0)
    batches = [test_sharding.fixed_batch(config, seed) for seed in range(3)]
    reference = None
    for shape in [(1, 1, 1), (2, 2, 2), (1, 4, 2)]:
        setup = test_sharding.on_mesh(config, shape)
        if reference is None:  # one fresh state (masks all True), placed on every mesh
            start = jax.device_get(setup.init_state())
            initial = start.params
        state = jax.device_put(start, setup.state_shardings)
        step, _ = step_lib.compile_train_step(setup)
        losses = []
        for batch in batches:
            state, m = step(state, setup.sharding.global_batch(batch))
            losses.append(m["loss"])
        result = jax.device_get((losses, state.params, host_masks(state)))
        if reference is None:
            reference = result
            continue
        jax.tree.map(np.testing.assert_array_equal, result[2], reference[2])
        tolerance = float32_sum_tolerance(*lm_sum_lengths(config, tokens=config.batch_size * config.data.seq_len))
        np.testing.assert_allclose(result[0], reference[0], rtol=tolerance, err_msg=f"losses on mesh {shape}")
        assert_sgd_params_close_after_reordering(result[1], reference[1], initial, tolerance, 3, f"params {shape}")
        for name, mask in result[2].items():  # the pruned weights are exactly 0 on every mesh
            assert (params_lib.by_path(result[1])[name][~mask] == 0).all()


# --------------------------------------------------------------------------------------------------
# The command line


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["config.prune.sparsity=1.0"], "config.prune.sparsity must be in [0, 1), got 1.0"),
        (["config.prune.kind=2:4", "config.model.d_model=36"], "reduction (input) dimension of layers/attention/out"),
        (["config.prune.kind=2:4", "config.prune.sparsity=0.6"], "sparsity of 0.5"),
        (["config.freeze=attention"], "would prune frozen parameters (layers/attention/"),
        (["config.prune.end_step=8"], "config.prune.end_step=8 is not before config.total_steps=8"),
        (["config.prune.start_step=3", "config.prune.end_step=2"], "0 <= start_step <= end_step"),
        (["config.prune.include=nothing_here"], "matches no parameter"),
    ],
    ids=["sparsity", "2:4-not-multiple-of-4", "2:4-sparsity", "frozen", "end", "order", "include"],
)
def test_a_bad_combination_is_one_error_line(cli_in_process, tmp_path, overrides, message):
    base = ["--config.prune.kind=unstructured"]
    result = cli_in_process(
        "train", "--config", TINY, "--workdir", tmp_path / "w", *base, *("--" + o for o in overrides), check=False
    )
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
    assert not (tmp_path / "w" / "checkpoints").exists()


def test_eval_on_a_pruned_run(cli_in_process, tmp_path):
    workdir = tmp_path / "run"
    prune_args = ["--config.prune.kind=2:4", "--config.prune.start_step=2", "--config.prune.end_step=2"]
    cli_in_process("train", "--config", TINY, "--workdir", workdir, *prune_args)
    out = cli_in_process("eval", "--config", TINY, "--workdir", workdir, "--once", *prune_args).stdout
    assert "validation at step 8" in out and "bits_per_char" in out
    rows = metrics.read_jsonl(workdir / "eval" / "metrics.jsonl")
    assert rows[-1]["step"] == 8 and np.isfinite(rows[-1]["loss"])


def test_under_freeze_pruned_weights_are_zero_and_their_gradients_never_reach_the_optimizer():
    """With a freeze, the pruning wrapper sits in multi_transform's trained branch and still keeps its masks."""
    params = {"frozen": {"kernel": np.ones((4, 4), np.float32)}, "dense": {"kernel": np.arange(16.0).reshape(4, 4)}}
    layout = prune.layout_of(params["dense"]["kernel"])
    pruning = prune.Pruning("unstructured", 0.5, 0, 0, 1, {"dense/kernel": layout})
    config = optim_config()
    tx = optim.make_optimizer(config, 10, frozen=lambda params: params_lib.matches(params, "frozen"), prune=pruning)
    opt_state = tx.init(params)
    grads = jax.tree.map(np.ones_like, params)
    updates, opt_state = tx.update(grads, opt_state, params)
    new = optax.apply_updates(params, updates)
    assert (np.asarray(new["dense"]["kernel"]).ravel()[:8] == 0).all()
    assert (np.asarray(new["dense"]["kernel"]).ravel()[8:] != 0).all()
    np.testing.assert_array_equal(new["frozen"]["kernel"], params["frozen"]["kernel"])
    assert set(prune.masks_of(opt_state)) == {"dense/kernel"}
    # The optimizer never saw the pruned weights' gradients: their first moments are 0, the kept ones' are not.
    (adam,) = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: hasattr(x, "mu")) if hasattr(s, "mu")]
    mu = np.asarray(adam.mu["dense"]["kernel"]).ravel()
    assert (mu[:8] == 0).all() and (mu[8:] != 0).all()


def optim_config():
    from bigjax import config as config_lib

    return config_lib.defaults().optim
