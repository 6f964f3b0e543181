"""Tests for bigjax.run.optim: optimizers, schedules, weight-decay masks, clipping."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from bigjax.config import CHOICES, ConfigError
from bigjax.run.optim import decay_mask, make_optimizer, make_schedule

OPTIMIZERS = CHOICES["optim.name"]


def make_config(**overrides) -> ml_collections.ConfigDict:
    """An optim config with every key present; overrides replace defaults."""
    values = dict(
        name="adamw",
        lr=1e-3,
        schedule="constant",
        warmup_steps=0,
        min_lr_ratio=0.1,
        decay_fraction=0.2,
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        momentum=0.0,
        nesterov=False,
        weight_decay=0.0,
        decay_embeddings=False,
        clip=0.0,
        l1_penalty=0.0,
        l2_penalty=0.0,
        mu_dtype="float32",
    )
    unknown = set(overrides) - set(values)
    assert not unknown, f"test passed unknown config keys {unknown}"
    values.update(overrides)
    return ml_collections.ConfigDict(values)


# --------------------------------------------------------------------------- #
# Every optimizer makes progress
# --------------------------------------------------------------------------- #

# Per-optimizer peak lr chosen so 50 steps robustly cut the loss; the problem is
# well conditioned, so these are far from the divergence edge.
LEARNING_RATES = {
    "adamw": 0.1,
    "adam": 0.1,
    "sgd": 0.1,
    "adagrad": 0.5,
    "rmsprop": 0.01,
    "adafactor": 0.1,
    "lion": 0.05,
}


def least_squares_problem():
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.normal(size=(64, 8)) / math.sqrt(8), jnp.float32)
    target = jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)
    # Nonzero init: adafactor scales steps by the parameter RMS.
    params = {"dense": {"kernel": jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)}}

    def loss_fn(p):
        return jnp.mean((a @ p["dense"]["kernel"] - a @ target) ** 2)

    return params, loss_fn


def run_steps(tx, params, loss_fn, steps):
    @jax.jit
    def step(params, opt_state):
        grads = jax.grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    opt_state = tx.init(params)
    for _ in range(steps):
        params, opt_state = step(params, opt_state)
    return params


def test_learning_rate_table_covers_every_optimizer():
    assert set(LEARNING_RATES) == set(OPTIMIZERS)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_optimizer_reduces_least_squares_loss(name):
    params, loss_fn = least_squares_problem()
    tx = make_optimizer(make_config(name=name, lr=LEARNING_RATES[name], momentum=0.9), 50)
    final = run_steps(tx, params, loss_fn, 50)
    assert loss_fn(final) < 0.3 * loss_fn(params)


# --------------------------------------------------------------------------- #
# Schedules
# --------------------------------------------------------------------------- #

TOTAL, WARMUP, PEAK, MIN_RATIO, DECAY_FRACTION = 100, 10, 2.0, 0.1, 0.2
FLOOR = PEAK * MIN_RATIO
DECAY_START = round((1 - DECAY_FRACTION) * TOTAL)


def expected_lr(schedule: str, step: int) -> float:
    """The schedule definitions, written out independently of optax."""
    if step < WARMUP:
        return PEAK * step / WARMUP
    progress = (step - WARMUP) / (TOTAL - WARMUP)
    if schedule == "constant":
        return PEAK
    if schedule == "cosine":
        return FLOOR + (PEAK - FLOOR) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "linear":
        return PEAK + (FLOOR - PEAK) * progress
    if step < DECAY_START:
        return PEAK
    return PEAK + (FLOOR - PEAK) * (step - DECAY_START) / (TOTAL - DECAY_START)


def schedule_config(schedule):
    return make_config(
        lr=PEAK,
        schedule=schedule,
        warmup_steps=WARMUP,
        min_lr_ratio=MIN_RATIO,
        decay_fraction=DECAY_FRACTION,
    )


@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear", "wsd"])
@pytest.mark.parametrize("step", [0, WARMUP // 2, WARMUP, 55, DECAY_START, 90, TOTAL])
def test_schedule_matches_definition(schedule, step):
    lr = make_schedule(schedule_config(schedule), TOTAL)
    assert float(lr(step)) == pytest.approx(expected_lr(schedule, step), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "wsd"])
def test_decaying_schedules_end_at_min_lr(schedule):
    lr = make_schedule(schedule_config(schedule), TOTAL)
    assert float(lr(TOTAL)) == pytest.approx(FLOOR, rel=1e-5)


def test_wsd_is_flat_until_decay_start():
    lr = make_schedule(schedule_config("wsd"), TOTAL)
    values = np.asarray(jax.vmap(lr)(jnp.arange(WARMUP, DECAY_START + 1)))
    np.testing.assert_allclose(values, PEAK, rtol=1e-6)
    assert float(lr(DECAY_START + 1)) < PEAK


def test_schedule_works_on_traced_steps():
    lr = make_schedule(schedule_config("cosine"), TOTAL)
    assert float(jax.jit(lr)(jnp.int32(55))) == pytest.approx(expected_lr("cosine", 55), rel=1e-5)


def test_zero_warmup_starts_at_peak():
    config = schedule_config("cosine")
    config.warmup_steps = 0
    assert float(make_schedule(config, TOTAL)(0)) == pytest.approx(PEAK)


# --------------------------------------------------------------------------- #
# Weight-decay mask
# --------------------------------------------------------------------------- #


def stacked_params():
    """Params shaped like an nn.scan-stacked transformer (leading layer dim)."""
    layers, d, heads, head_dim, vocab, seq = 2, 4, 2, 2, 8, 6
    return {
        "embed": {"embedding": jnp.ones((vocab, d))},
        "pos_embed": {"embedding": jnp.ones((seq, d))},
        "layers": {
            "attn": {"query": {"kernel": jnp.ones((layers, d, heads, head_dim))}},
            "ln1": {"scale": jnp.ones((layers, d)), "bias": jnp.zeros((layers, d))},
            "mlp": {"kernel": jnp.ones((layers, d, 4 * d)), "bias": jnp.zeros((layers, 4 * d))},
        },
        "final_norm": {"scale": jnp.ones((d,))},
    }


@pytest.mark.parametrize("decay_embeddings", [False, True])
def test_decay_mask_decides_by_name(decay_embeddings):
    mask = decay_mask(stacked_params(), decay_embeddings=decay_embeddings)
    assert mask == {
        "embed": {"embedding": decay_embeddings},
        "pos_embed": {"embedding": decay_embeddings},
        "layers": {
            "attn": {"query": {"kernel": True}},
            "ln1": {"scale": False, "bias": False},
            "mlp": {"kernel": True, "bias": False},
        },
        "final_norm": {"scale": False},
    }


def decay_probe_params():
    return {
        "dense": {"kernel": jnp.ones((4, 4))},
        "norm": {"scale": jnp.ones((4,))},
        "embed": {"embedding": jnp.ones((8, 4))},
    }


def apply_zero_gradient_steps(config, params, steps=3):
    tx = make_optimizer(config, total_steps=10)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    opt_state = tx.init(params)
    for _ in range(steps):
        updates, opt_state = tx.update(zeros, opt_state, params)
        params = optax.apply_updates(params, updates)
    return params


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_weight_decay_only_touches_masked_leaves(name):
    params = decay_probe_params()
    config = make_config(name=name, lr=0.1, weight_decay=0.1, momentum=0.9)
    after = apply_zero_gradient_steps(config, params)
    assert bool(jnp.all(after["dense"]["kernel"] < params["dense"]["kernel"]))
    np.testing.assert_array_equal(after["norm"]["scale"], params["norm"]["scale"])
    np.testing.assert_array_equal(after["embed"]["embedding"], params["embed"]["embedding"])


def test_decay_embeddings_flag_decays_embeddings():
    params = decay_probe_params()
    config = make_config(name="adamw", lr=0.1, weight_decay=0.1, decay_embeddings=True)
    after = apply_zero_gradient_steps(config, params)
    assert bool(jnp.all(after["embed"]["embedding"] < params["embed"]["embedding"]))
    np.testing.assert_array_equal(after["norm"]["scale"], params["norm"]["scale"])


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_zero_weight_decay_leaves_params_alone(name):
    params = decay_probe_params()
    after = apply_zero_gradient_steps(make_config(name=name, lr=0.1, weight_decay=0.0), params)
    jax.tree_util.tree_map(np.testing.assert_array_equal, after, params)


# --------------------------------------------------------------------------- #
# Clipping
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("clip", [1.0, 0.0])
def test_global_norm_clipping(clip):
    params = decay_probe_params()
    huge = jax.tree_util.tree_map(lambda p: jnp.full_like(p, 1e6), params)
    tx = make_optimizer(make_config(name="sgd", lr=1.0, momentum=0.0, clip=clip), 10)
    updates, _ = tx.update(huge, tx.init(params), params)
    norm = float(optax.tree.norm(updates))
    if clip > 0:
        assert norm == pytest.approx(clip, rel=1e-5)
    else:
        assert norm == pytest.approx(float(optax.tree.norm(huge)), rel=1e-5)


# --------------------------------------------------------------------------- #
# bfloat16 first moment
# --------------------------------------------------------------------------- #


def moments(opt_state, name: str) -> list:
    return [leaf for _, tree in optax.tree.get_all_with_path(opt_state, name) for leaf in jax.tree.leaves(tree)]


@pytest.mark.parametrize("name", ["adamw", "adam", "lion"])
def test_mu_dtype_bfloat16_keeps_the_first_moment_in_bfloat16(name):
    params = decay_probe_params()
    tx = make_optimizer(make_config(name=name, mu_dtype="bfloat16", lr=0.1), 10)
    opt_state = tx.init(params)
    first = moments(opt_state, "mu")
    assert len(first) == 3 and all(m.dtype == jnp.bfloat16 for m in first)
    assert all(v.dtype == jnp.float32 for v in moments(opt_state, "nu"))  # adam's second moment stays fp32
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
    updates, opt_state = tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    assert all(m.dtype == jnp.bfloat16 for m in moments(opt_state, "mu"))  # still bf16 after an update
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(new_params))
    # The update itself matches the fp32-moment optimizer's (0.5 is exact in bfloat16).
    reference = make_optimizer(make_config(name=name, lr=0.1), 10)
    expected, _ = reference.update(grads, reference.init(params), params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), updates, expected)


def test_mu_dtype_default_is_float32():
    opt_state = make_optimizer(make_config(name="adamw"), 10).init(decay_probe_params())
    assert all(m.dtype == jnp.float32 for m in moments(opt_state, "mu"))


# --------------------------------------------------------------------------- #
# Bad values
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("key, value", [("name", "nadamx"), ("schedule", "exponential")], ids=["optimizer", "schedule"])
def test_an_unknown_optimizer_or_schedule_is_refused_by_the_config_with_the_choices(tiny_config, key, value):
    with pytest.raises(ConfigError, match=f"config.optim.{key}='{value}' is not one of") as excinfo:
        tiny_config("", f"config.optim.{key}={value}")
    assert ", ".join(CHOICES[f"optim.{key}"]) in str(excinfo.value)
