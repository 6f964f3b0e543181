"""Mixture of experts (bigjax.models.moe): the grouped (sorted, ragged_dot) experts equal every expert run on every
token and masked; capacity mode drops exactly the picks it reports; the router's losses are the papers' formulas;
the MoE model trains through scan, remat and gradient accumulation."""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import test_generate
from conftest import REPO, TINY, init_params
from tolerance import (
    EPS32,
    assert_close_after_reordering,
    assert_sgd_params_close_after_reordering,
    float32_sum_tolerance,
    lm_sum_lengths,
)

from bigjax import config as config_lib
from bigjax import errors
from bigjax.deploy import common as deploy_common
from bigjax.models import gpt, layers, moe
from bigjax.ops import metrics
from bigjax.run import state as state_lib
from bigjax.run import step as step_lib
from bigjax.run.setup import make_setup
from bigjax.tasks import make_task

D, F, E, K = 8, 16, 4, 2  # model width, expert width, experts, picks per token


def moe_config(**changes) -> moe.MoeConfig:
    values = dict(
        num_experts=E,
        experts_per_token=K,
        expert_mlp_dim=F,
        num_shared_experts=0,
        first_dense_layers=0,
        capacity_factor=0.0,
        router_aux_loss=0.01,
        router_z_loss=0.001,
        norm_topk_probs=True,
        shared_expert_gate=False,
    )
    return moe.MoeConfig(**{**values, **changes})


def block(cfg: moe.MoeConfig, reference=False, kind="swiglu") -> moe.MoeMlp:
    return moe.MoeMlp(cfg, kind, 0.5, 0.5, jnp.float32, jnp.float32, reference=reference)


def tokens(batch=2, length=6, seed=0):
    return jax.random.normal(jax.random.key(seed), (batch, length, D), jnp.float32)


def init(module, x):
    """The block's parameters, unboxed, initialized under jit (the same values as op by op: the same key)."""
    return nn.unbox(jax.jit(module.init)(jax.random.key(1), x)["params"])


def outputs_and_grads(module, params, x):
    """(the block's output and router losses, the gradients of a scalar of them with respect to every parameter,
    the router's included, and the input). Jitted, as the model runs it: one program, not one per operation."""

    def loss(params, x):
        out, sown = module.apply({"params": params}, x, mutable=["intermediates"])
        stats = moe.model_stats(sown["intermediates"])
        return jnp.sum(jnp.sin(out)) + stats["aux_loss"] + stats["z_loss"], (out, stats)

    (_, outputs), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
    return outputs, grads


# The sums a grouped result goes through that the dense one adds in another order: over the model width (gate and
# up), the expert width (down), the k picks (or all E experts, most of them zero); and for the gradients the
# scalar's sum over the outputs (tokens x width) and each weight's over the tokens.
GROUPED_TOLERANCE = float32_sum_tolerance(D, F, E, 2 * 6 * D, 2 * 6)


@pytest.mark.parametrize("kind", ["swiglu", "gelu"])
@pytest.mark.parametrize("capacity_factor", [0.0, 0.5])
def test_grouped_experts_equal_the_dense_reference(kind, capacity_factor):
    cfg = moe_config(capacity_factor=capacity_factor)
    x = tokens()
    params = init(block(cfg, kind=kind), x)
    grouped = outputs_and_grads(block(cfg, kind=kind), params, x)
    dense = outputs_and_grads(block(cfg, reference=True, kind=kind), params, x)
    assert_close_after_reordering(grouped, dense, GROUPED_TOLERANCE, "outputs and gradients")


def test_capacity_mode_drops_the_picks_over_capacity_and_counts_them():
    # 4 tokens, top-2 of 4 experts, capacity 2 picks per expert. First choices go first: tokens 0, 1, 2 all put
    # expert 0 first, so token 2's first pick is the third in expert 0's queue: dropped. Second choices: token 3's
    # second pick (expert 0) comes after three first picks: dropped. Everything else fits.
    experts = jnp.array([[0, 1], [0, 2], [0, 1], [3, 0]])
    fits = jax.jit(moe.within_capacity, static_argnums=(1, 2))(experts, 4, 2)  # one program, not one per operation
    np.testing.assert_array_equal(fits, [[True, True], [True, True], [False, True], [True, False]])

    # And the output is that of the dense reference with those two picks' weights zeroed by hand.
    x = tokens(batch=1, length=4)[0]
    weights = jnp.full((4, 2), 0.5)
    kernels = {name: jax.random.normal(jax.random.key(i), shape) for i, (name, shape) in enumerate(KERNEL_SHAPES)}
    routed = jnp.where(fits, experts, 4)
    kept = jnp.array([[0.5, 0.5], [0.5, 0.5], [0.0, 0.5], [0.5, 0.0]])
    got = jax.jit(moe.grouped_experts, static_argnums=(4, 5))(x, routed, weights, kernels, "swiglu", 4)
    want = jax.jit(moe.dense_reference, static_argnums=(4, 5))(x, experts, kept, kernels, "swiglu", 4)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert float(router_stats(jnp.zeros((4, 4)), jnp.full((4, 4), 0.25), experts, routed)["dropped"]) == 2 / 8


def test_capacity_is_the_factor_times_the_even_share():
    assert moe_config(capacity_factor=1.0).capacity(tokens=12) == 6  # 12 tokens * 2 picks / 4 experts
    assert moe_config(capacity_factor=1.25).capacity(tokens=12) == 8  # 7.5, rounded up


KERNEL_SHAPES = [("gate", (4, D, F)), ("up", (4, D, F)), ("down", (4, F, D))]


def router_stats(logits, probs, experts, routed=None):
    """One layer's statistics, through the sums it sows."""
    routed = experts if routed is None else routed
    return moe.router_stats(moe.router_sums(logits, probs, experts, routed, probs.shape[-1]))


def test_load_balancing_loss_is_the_switch_formula():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, E)).astype(np.float32)
    probs, _, experts = moe.route(jnp.asarray(logits), K, normalize=True)
    probs, experts = np.asarray(probs, np.float64), np.asarray(experts)
    # By hand: f_e = the fraction of the 6 tokens that picked e, P_e = e's mean router probability; E * sum f_e P_e.
    f = [sum(e in experts[t] for t in range(6)) / 6 for e in range(E)]
    p = [sum(probs[t, e] for t in range(6)) / 6 for e in range(E)]
    want = E * sum(f[e] * p[e] for e in range(E))
    got = router_stats(jnp.zeros((6, E)), jnp.asarray(probs), jnp.asarray(experts))["aux_loss"]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # Perfectly balanced routing (each expert picked by half the tokens, uniform probabilities) gives k.
    even = jnp.full((4, E), 1 / E)
    assert float(router_stats(even, even, jnp.array([[0, 1], [2, 3], [0, 1], [2, 3]]))["aux_loss"]) == pytest.approx(K)


def test_z_loss_is_the_mean_squared_logsumexp():
    logits = np.array([[0.0, 1.0, 2.0, 3.0], [1.0, 1.0, 1.0, 1.0]], np.float32)
    want = np.mean([np.log(np.sum(np.exp(row))) ** 2 for row in logits.astype(np.float64)])
    experts = jnp.zeros((2, 1), jnp.int32)
    np.testing.assert_allclose(router_stats(jnp.asarray(logits), logits, experts)["z_loss"], want, rtol=4 * EPS32)


def test_top_k_probabilities_are_renormalised_when_asked():
    logits = jnp.array([[2.0, 1.0, 0.5, -1.0]])
    probs, weights, experts = moe.route(logits, 2, normalize=True)
    np.testing.assert_array_equal(experts, [[0, 1]])
    np.testing.assert_allclose(weights, probs[:, :2] / jnp.sum(probs[:, :2]), rtol=EPS32)
    np.testing.assert_allclose(jnp.sum(weights), 1.0, rtol=EPS32)
    _, raw, _ = moe.route(logits, 2, normalize=False)
    np.testing.assert_allclose(raw, probs[:, :2], rtol=0)


def test_shared_experts_add_a_dense_mlp_of_their_width():
    cfg = moe_config(num_shared_experts=2)
    x = tokens()
    params = init(block(cfg), x)
    with_shared = jax.jit(block(cfg).apply)({"params": params}, x)  # each one program, not one per operation
    routed_only = jax.jit(block(moe_config()).apply)({"params": {k: v for k, v in params.items() if k != "shared"}}, x)
    shared = layers.Mlp("swiglu", 2 * F, False, 0.5, 0.5, jnp.float32, jnp.float32)
    assert params["shared"]["up"]["kernel"].shape == (D, 2 * F)
    want = routed_only + jax.jit(shared.apply)({"params": params["shared"]}, x)
    np.testing.assert_allclose(with_shared, want, rtol=1e-5, atol=1e-6)


def test_a_shared_expert_gate_scales_the_shared_experts_by_a_sigmoid_of_the_token():
    """Qwen2-MoE's gate: routed + sigmoid(x . w) * shared(x), w one column [d, 1] of its own."""
    x = tokens()
    gated = block(moe_config(num_shared_experts=1, shared_expert_gate=True))
    params = nn.unbox(gated.init(jax.random.key(1), x)["params"])
    assert params["shared_gate"]["kernel"].shape == (D, 1)
    ungated = block(moe_config(num_shared_experts=1))
    routed_only = block(moe_config()).apply({"params": {k: v for k, v in params.items() if "shared" not in k}}, x)
    shared = ungated.apply({"params": {k: v for k, v in params.items() if k != "shared_gate"}}, x) - routed_only
    want = routed_only + jax.nn.sigmoid(x @ params["shared_gate"]["kernel"]) * shared
    np.testing.assert_allclose(gated.apply({"params": params}, x), want, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# The model: a dense first layer and MoE layers after it, in the train step and on meshes with an expert axis.

MOE = (
    "config.model.num_layers=3",
    "config.model.moe.num_experts=8",
    "config.model.moe.expert_mlp_dim=48",  # unlike any other width: its kernels are told apart
    "config.model.moe.first_dense_layers=1",
    "config.model.moe.num_shared_experts=1",
    "config.model.moe.router_z_loss=0.001",
)
SGD = ("config.optim.name=sgd", "config.optim.warmup_steps=0", "config.optim.clip=0", "config.optim.weight_decay=0")


def moe_sum_lengths(config, tokens: int) -> list:
    """lm_sum_lengths, with each MoE layer's own sums: its router's (the width, the experts: softmax and losses)
    and the experts' (the width, the expert width, the k picks and the shared experts' width) in place of the MLP."""
    m = config.model
    layer = 3 * m.d_model + config.data.seq_len + m.d_model + m.moe.num_experts
    layer += m.moe.expert_mlp_dim * (1 + m.moe.num_shared_experts) + m.moe.experts_per_token
    return lm_sum_lengths(config, tokens) + [layer] * (m.num_layers - m.moe.first_dense_layers)


def fixed_batch(config, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 256, (config.batch_size, config.data.seq_len + 1), dtype=np.int32)
    weights = (rng.random((config.batch_size, config.data.seq_len)) > 0.1).astype(np.float32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": weights}


def loss_grads_and_stats(setup, params, batch):
    """(training loss: cross-entropy and the router losses, its gradients, the router statistics) on setup's mesh."""

    def mean_loss(p, b):
        sums, _ = setup.task.loss_sums(p, {}, b, train=True)
        return sums["loss"] / sums["count"], {k: v / sums["count"] for k, v in sums.items() if k.startswith("moe_")}

    fn = jax.jit(jax.value_and_grad(mean_loss, has_aux=True), in_shardings=(setup.state_shardings.params, None))
    with setup.sharding.activate():
        (loss, stats), grads = fn(params, setup.sharding.global_batch(batch))
    return jax.device_get((loss, grads, stats))


# The MoE model of the equivalence tests: MOE with two dense layers, then two MoE layers, so that both scanned stacks
# also split over a pipeline's stage=2 (test_pipeline runs it beside the expert axis against the same one device).
MOE_STACKS = (*MOE, "config.model.num_layers=4", "config.model.moe.first_dense_layers=2")


def moe_stacks_config():
    return config_lib.load(f"{TINY}:llama=True", list(MOE_STACKS))


@functools.cache
def one_device_moe():
    """(parameters of a fresh init on the host, (training loss, gradients, router statistics) on fixed_batch) of
    MOE_STACKS' model on one device: the reference of the expert axis's meshes here and of test_pipeline's pipeline
    beside experts, computed once per process. Read it, never change it."""
    config = moe_stacks_config()
    setup = on_mesh(config, (1, 1, 1, 1))
    params = jax.device_get(init_params(setup.task))
    return params, loss_grads_and_stats(setup, params, fixed_batch(config))


def one_sgd_step(config, batch, params):
    """(metrics, initial state on the host, parameters after one compiled SGD step) of `config` on `batch`, from
    `params` (a host copy) and a fresh optimizer state."""
    setup = make_setup(config, jax.devices()[: int(np.prod(list(config.mesh.values())))])  # every axis set
    step, _ = step_lib.compile_train_step(setup)
    fresh = lambda p: state_lib.TrainState(jnp.zeros((), jnp.int32), p, setup.tx.init(p), {})
    state = jax.jit(fresh, out_shardings=setup.state_shardings)(params)
    initial = jax.device_get(state)
    state, metrics = step(state, setup.sharding.global_batch(batch))
    return jax.device_get(metrics), initial, jax.device_get(state.params)


def test_moe_model_trains_with_a_dense_prefix_through_remat_and_gradient_accumulation(tiny_config):
    """Scanned dense and MoE stacks, rematerialized: k microbatches give one big batch's update (dropless routing
    is per token, so with the router losses off the loss is a sum over tokens; they are averaged per microbatch).
    Both steps start from the same parameters (a fresh init of MOE_STACKS' model: one_device_moe's, which neither
    router losses nor remat change)."""
    results = []
    for accum in (1, 2):
        no_router_losses = ("config.model.moe.router_aux_loss=0", "config.model.moe.router_z_loss=0")
        config = tiny_config(
            "llama=True",
            *MOE_STACKS,
            *no_router_losses,
            *SGD,
            "config.model.remat=full",
            f"config.optim.grad_accum={accum}",
            "config.mesh.data=2",
        )
        results.append(one_sgd_step(config, fixed_batch(config), one_device_moe()[0]))
    (m1, initial, p1), (m2, _, p2) = results
    initial = initial.params
    assert set(p1) == {"dense_layers", "moe_layers", "embed", "unembed", "final_norm"}
    assert p1["moe_layers"]["mlp"]["experts"]["up"].shape == (2, 8, 32, 48)  # 2 MoE layers of 8 experts
    tolerance = float32_sum_tolerance(*moe_sum_lengths(config, tokens=config.batch_size * config.data.seq_len))
    np.testing.assert_allclose(m2["loss"], m1["loss"], rtol=tolerance)
    assert_sgd_params_close_after_reordering(p2, p1, initial, tolerance, 1, "parameters after one step")
    # The router's statistics reach the step's metrics.
    assert m1["moe_dropped"] == 0 and 0 <= m1["moe_load_min"] <= 1 <= m1["moe_load_max"] <= 8
    assert m1["moe_aux_loss"] >= 2 - 1e-5  # k = 2 at best (perfect balance)


# data x fsdp x tensor x expert (x context): experts split 1, 2, 4 and 8 ways, alone and beside every other axis.
EXPERT_MESHES = [(1, 1, 1, 1), (2, 2, 2, 1), (1, 1, 1, 8), (2, 1, 1, 2, 2), (1, 2, 1, 4), (1, 2, 2, 2)]


def on_mesh(config, shape):
    config.mesh.update(dict(zip(("data", "fsdp", "tensor", "expert", "context"), (*shape, 1)[:5], strict=False)))
    return make_setup(config, jax.devices()[: int(np.prod(shape))])


def training_loss_and_grads(setup, params, batch):
    """(the training loss (cross-entropy and the router losses), its gradients), jitted on the setup's mesh, and the
    compiled program's text."""

    def mean_loss(p, b):
        sums, _ = setup.task.loss_sums(p, {}, b, train=True)
        return sums["loss"] / sums["count"]

    fn = jax.jit(jax.value_and_grad(mean_loss), in_shardings=(setup.state_shardings.params, setup.sharding.batch))
    with setup.sharding.activate():
        batch = setup.sharding.global_batch(batch)
        compiled = fn.lower(params, batch).compile()
        return compiled(params, batch), compiled.as_text()


# The result part of an HLO collective's line: one shape, or a tuple of them (XLA combines collectives).
COLLECTIVE = re.compile(r"= (.*?) (?:all-gather|all-reduce|all-to-all|reduce-scatter|collective-permute)(?:-start)?\(")


def assert_tokens_move_to_the_experts(program: str, config, batch) -> None:
    """In the compiled program, no collective carries a whole expert kernel [experts, ...] (each device keeps its
    experts' weights: expert parallelism, not FSDP of the experts), and one carries the token picks [tokens * k, ...]
    (XLA's dispatch under the sharding rules: the sorted picks summed over the devices into each one's experts)."""
    moe_cfg = config.model.moe
    e, d, f = moe_cfg.num_experts, config.model.d_model, moe_cfg.expert_mlp_dim
    shapes = [
        tuple(int(n) for n in dims.split(",") if n)
        for result in COLLECTIVE.findall(program)
        for dims in re.findall(r"\[([0-9,]*)\]", result)
    ]
    assert shapes, "no collectives at all"
    assert not [s for s in shapes if s[-3:] in ((e, d, f), (e, f, d))], "an expert kernel moved between devices"
    picks = batch["inputs"].size * moe_cfg.experts_per_token
    assert any(s and s[0] == picks for s in shapes), f"no collective moves the {picks} token picks: {set(shapes)}"


def test_loss_and_every_gradient_match_with_experts_split_over_devices():
    config = moe_stacks_config()
    batch = fixed_batch(config)
    tolerance = float32_sum_tolerance(*moe_sum_lengths(config, tokens=batch["weights"].size))
    host_params, (reference_loss, reference_grads, _) = one_device_moe()  # EXPERT_MESHES[0]: one device
    assert EXPERT_MESHES[0] == (1, 1, 1, 1) and host_params["moe_layers"]["mlp"]["experts"]["up"].shape[1] == 8
    assert np.abs(reference_grads["moe_layers"]["mlp"]["router"]["kernel"]).max() > 0  # the router learns
    for shape in EXPERT_MESHES[1:]:
        setup = on_mesh(config, shape)
        params = jax.device_put(host_params, setup.state_shardings.params)
        expert_kernel = params["moe_layers"]["mlp"]["experts"]["up"]
        assert expert_kernel.addressable_shards[0].data.shape[1] == 8 // shape[3]  # each device: its experts only
        (loss, grads), program = training_loss_and_grads(setup, params, batch)
        loss, grads = jax.device_get((loss, grads))
        if shape[3] > 1:
            assert_tokens_move_to_the_experts(program, config, batch)
        np.testing.assert_allclose(loss, reference_loss, rtol=tolerance, err_msg=f"loss on mesh {shape}")
        assert_close_after_reordering(grads, reference_grads, tolerance, f"gradients on mesh {shape}")


# What a training run logs that the expert axis must leave alone: the loss and the router's losses, the gradient's
# norm (which a change in routing or dropped picks moves even where the loss barely does), and the dropped fraction.
LOGGED_LOSSES = ("loss", "moe_aux_loss", "moe_z_loss", "moe_dropped", "grad_norm")


def test_cli_training_logs_the_same_losses_with_the_experts_over_4_devices(cli_in_process, tmp_path):
    """The issue's run, at test size: `bigjax train --config experiments/moe_tiny.py --config.mesh.expert=4` on the
    8 devices logs the losses of `--config.mesh.expert=1` to 1e-4 relative. moe_tiny's layout (a dense first layer,
    then MoE layers of 8 experts, top-2, a shared one), shrunk on the command line: 2 layers of width 32, experts of
    width 16, 3 steps of 8 rows of 32 bytes."""
    logged = {}
    for expert in (1, 4):
        workdir = tmp_path / f"expert_{expert}"
        cli_in_process(
            "train",
            "--config", REPO / "experiments/moe_tiny.py:steps=3,d=32,expert_dim=16",
            "--workdir", workdir,
            f"--config.mesh.expert={expert}",
            "--config.model.num_layers=2", "--config.batch_size=8", "--config.data.seq_len=32",
            "--config.log_every=1", "--config.eval_every=0", "--config.checkpoint_every=3",
            "--config.optim.warmup_steps=0",  # steps 2 and 3 start from the full-rate updates of the steps before
        )  # fmt: skip
        rows = [row for row in metrics.read_jsonl(workdir / "metrics.jsonl") if "loss" in row]
        logged[expert] = {key: [row[key] for row in rows] for key in ("step", *LOGGED_LOSSES)}
    assert logged[1]["step"] == logged[4]["step"] == [1, 2, 3]
    for key in LOGGED_LOSSES:
        np.testing.assert_allclose(logged[4][key], logged[1][key], rtol=1e-4, atol=1e-6, err_msg=key)


def test_flops_count_the_active_parameters_and_the_total_counts_every_expert(tiny_config):
    config = tiny_config("llama=True", *MOE)
    task = make_task(config)
    counts = gpt.parameter_count(task.model_config)
    params = jax.eval_shape(lambda: nn.unbox(task.init_variables(jax.random.key(0))["params"]))
    # The matrices, stacked over the layers (the norms' scales are vectors, stacked: 2 dimensions).
    kernels = lambda tree: sum(leaf.size for leaf in jax.tree.leaves(tree) if leaf.ndim >= 3)
    assert counts["layers_total"] == kernels(params["dense_layers"]) + kernels(params["moe_layers"])
    # By hand, active per token: each MoE layer's attention, router, 2 of its 8 experts and its shared expert.
    d, f, e = 32, 48, 8
    attention = d * 8 * (4 + 2 * 2) + 4 * 8 * d  # head_dim 8, 4 query heads, 2 key/value heads
    moe_layer = attention + d * e + 3 * d * f * (2 + 1)
    dense_layer = attention + 3 * d * 64  # the tiny model's mlp_dim
    assert counts["layers"] == dense_layer + 2 * moe_layer
    assert task.flops_per_example() == config.data.seq_len * (
        6 * (counts["layers"] + 384 * d) + 12 * 3 * 4 * 8 * config.data.seq_len  # vocab padded to 384
    )


@pytest.mark.parametrize(
    "experiment, overrides, message",
    [
        ("tiny.py", ["config.model.moe.num_experts=4", "config.model.moe.experts_per_token=5"], "experts_per_token=5"),
        ("tiny.py", ["config.model.moe.num_experts=6", "config.mesh.expert=4"], "expert=4 does not divide"),
        ("tiny.py", ["config.mesh.expert=2"], "config.model has none"),
        ("tiny.py", ["config.model.moe.num_experts=4", "config.model.moe.first_dense_layers=3"], "exceeds model.num"),
        ("tiny.py", ["config.model.moe.capacity_factor=-1.0"], "capacity_factor must be >= 0"),
        (
            "tiny.py",
            ["config.model.moe.num_experts=4", "config.model.moe.shared_expert_gate=True"],
            "shared_expert_gate=True gates no shared expert",
        ),
        ("bert_tiny_mlm.py", ["config.model.moe.num_experts=4"], "unknown config key config.model.moe"),
    ],
)
def test_bad_moe_settings_are_one_error_naming_the_fix(experiment, overrides, message):
    with pytest.raises(config_lib.ConfigError, match=re.escape(message)):
        config = config_lib.load(f"experiments/{experiment}", overrides)
        config_lib.check_against_devices(config, 8)


@pytest.mark.parametrize("override", ["config.quant.bits=8", "config.lora.rank=4"])
def test_quantization_and_lora_refuse_a_mixture_of_experts_in_one_line(tiny_config, override):
    with pytest.raises(config_lib.ConfigError, match=r"does not cover the experts of a mixture of experts"):
        tiny_config("llama=True", "config.model.moe.num_experts=4", override)


@pytest.mark.parametrize("fmt", ["onnx", "stablehlo"])
def test_export_refuses_a_mixture_of_experts_in_one_line(tiny_config, fmt):
    config = tiny_config("llama=True", "config.model.moe.num_experts=4")
    with pytest.raises(errors.UserError, match=rf"W trained a mixture of experts.*--format {fmt} does not export"):
        deploy_common.check_exportable(config, fmt, "W")


def test_generating_through_the_kv_cache_gives_the_full_forward_logits(tiny_config):
    """Dropless routing is per token: a MoE model decodes one token at a time as its full forward pass computes."""
    with_moe = lambda arg="", *overrides: tiny_config(arg, *MOE, *overrides)
    test_generate.test_prefill_and_cached_steps_give_the_logits_of_the_full_forward(with_moe, "llama=True", True)


def test_a_moe_run_resumes_bit_exact_and_onto_another_expert_size(tiny_config, tmp_path):
    """Experts over 2 devices, stopped at step 2 and resumed: the losses and the final parameters are the
    uninterrupted run's, bit for bit. The same checkpoint resumed with the experts over 4 devices: within the bound
    of the expert axis's equivalence (SGD without clipping, so that the update is linear in the gradient)."""
    import shutil

    from test_train import LINEAR_UPDATES, final_params
    from tolerance import assert_sgd_params_close_after_reordering

    from bigjax.run import train

    def on_experts(expert):
        return tiny_config(
            "llama=True", *MOE, *SGD, *LINEAR_UPDATES, "config.log_every=1", "config.total_steps=4",
            "config.checkpoint_every=2", "config.eval_every=0", f"config.mesh.expert={expert}",
        )  # fmt: skip

    def losses(workdir):
        return {row["step"]: row["loss"] for row in metrics.read_jsonl(workdir / "metrics.jsonl") if "loss" in row}

    two, four = on_experts(2), on_experts(4)
    straight, resumed, moved = tmp_path / "straight", tmp_path / "resumed", tmp_path / "moved"
    train.train(two, straight)
    train.train(two, resumed, stop_at_step=2)
    shutil.copytree(resumed, moved)
    train.train(two, resumed)
    train.train(four, moved)

    assert losses(resumed) == losses(straight) and sorted(losses(straight)) == [1, 2, 3, 4]
    reference = final_params(straight, two)
    jax.tree.map(np.testing.assert_array_equal, final_params(resumed, two), reference)
    tolerance = float32_sum_tolerance(*moe_sum_lengths(two, tokens=two.batch_size * two.data.seq_len))
    np.testing.assert_allclose(
        [losses(moved)[s] for s in (3, 4)], [losses(straight)[s] for s in (3, 4)], rtol=tolerance
    )
    initial = jax.device_get(init_params(make_task(two), two.seed))
    params = final_params(moved, two)
    assert_sgd_params_close_after_reordering(params, reference, initial, tolerance, 4, "parameters at step 4")
