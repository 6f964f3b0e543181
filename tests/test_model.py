"""Model details: FLOPs accounting matches the real parameters, presets, remat, dropout, precision, rotary positions
(and their scaling), bias switches."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, TINY, init_params
from tolerance import (
    EPS32,
    assert_close_after_reordering,
    float32_sum_tolerance,
    image_sum_lengths,
    lm_sum_lengths,
)

from bigjax import config as config_lib
from bigjax.models import layers
from bigjax.models.gpt import GPTConfig, parameter_count
from bigjax.tasks.causal_lm import CausalLM, flops_per_token


@pytest.mark.parametrize("arg", ["", "llama=True"])
def test_matmul_parameter_count_matches_the_initialized_model(tiny_config, arg):
    config = tiny_config(arg)
    task = CausalLM(config)
    params = nn.unbox(jax.eval_shape(lambda: task.init_variables(jax.random.key(0))["params"]))
    sizes = {jax.tree_util.keystr(path): leaf.size for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    kernels = sum(size for name, size in sizes.items() if "kernel" in name)
    embedding = sizes["['embed']['embedding']"]
    # A tied embedding does matmul work as the output projection; an untied one is only a lookup.
    assert parameter_count(task.model_config)["matmul"] == kernels + (embedding if config.model.tie_embeddings else 0)


def test_gpt2_124m_preset_has_124m_parameters_and_known_flops():
    config = config_lib.load(str(REPO / "experiments" / "gpt2_124m.py"))
    cfg = GPTConfig.from_config(config.model)
    counts = parameter_count(cfg)
    total = counts["layers"] + counts["embedding"]
    assert cfg.vocab_size == 50304
    assert 123e6 < total < 125.5e6
    # nanoGPT's estimate for the same model: 6N + 12*L*H*Q*T with N = all weights less positions.
    expected = 6 * (counts["layers"] + 50304 * 768) + 12 * 12 * 12 * 64 * 1024
    assert flops_per_token(cfg, 1024) == expected


def test_palm_and_causal_flops_by_hand_for_the_tiny_gpt(tiny_config):
    task = CausalLM(tiny_config())
    # tiny: L=2 layers, d=32, H=4 heads of Q=8, MLP 4d=128, vocabulary 260 padded to 384 (tied), T=32.
    attention_weights = 32 * 8 * (4 + 2 * 4) + 4 * 8 * 32  # q, k, v in; output projection
    mlp_weights = 2 * 32 * 128
    n = 2 * (attention_weights + mlp_weights) + 384 * 32  # the tied embedding counts once, as the unembedding
    assert n == 36_864
    palm = 6 * n + 12 * 2 * 4 * 8 * 32  # 6N + 12·L·H·Q·T
    causal = 6 * n + 6 * 2 * 4 * 8 * 32  # the attention term halved
    assert task.flops_per_example() == palm * 32 == 7_864_320
    assert task.causal_flops_per_example() == causal * 32 == 7_471_104


def test_llama_1b_preset_is_about_a_billion_parameters():
    config = config_lib.load(str(REPO / "experiments" / "llama_1b.py"))
    counts = parameter_count(GPTConfig.from_config(config.model))
    assert 1.05e9 < counts["layers"] + counts["embedding"] < 1.15e9  # TinyLlama: 1.1B


def _loss_and_grads_fn(config, train=False):
    """(params, jitted (params, batch, rng) -> (mean loss, grads)) for the config's model."""
    task = CausalLM(config)
    params = init_params(task)

    def loss(p, batch, rng):
        sums, _ = task.loss_sums(p, {}, batch, rng, train=train)
        return sums["loss"] / sums["count"]

    return params, jax.jit(jax.value_and_grad(loss))


def _loss_and_grads(config, batch):
    params, fn = _loss_and_grads_fn(config)
    return params, fn(params, batch, None)


def _batch(seed=0):
    tokens = np.random.default_rng(seed).integers(0, 256, (4, 33), dtype=np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": np.ones((4, 32), np.float32)}


@pytest.fixture(scope="module")
def llama_without_remat():
    return _loss_and_grads(config_lib.load(TINY + ":llama=True"), _batch())[1]


@pytest.mark.parametrize("policy", [name for name in config_lib.CHOICES["model.remat"] if name != "none"])
def test_remat_policies_do_not_change_the_gradients(tiny_config, llama_without_remat, policy):
    loss, grads = llama_without_remat
    config = tiny_config("llama=True", f"config.model.remat={policy}")
    _, (loss_remat, grads_remat) = _loss_and_grads(config, _batch())
    # Recomputed rather than kept, the activations may be fused and summed in another order.
    tolerance = float32_sum_tolerance(*lm_sum_lengths(config, tokens=_batch()["weights"].size))
    np.testing.assert_allclose(loss_remat, loss, rtol=tolerance)
    assert_close_after_reordering(grads_remat, grads, tolerance, f"gradients with remat={policy}")


def test_dropout_acts_in_training_only(tiny_config):
    config = tiny_config("", "config.model.dropout=0.5")
    params, eval_fn = _loss_and_grads_fn(config, train=False)
    _, train_fn = _loss_and_grads_fn(config, train=True)
    eval_a, eval_b = (eval_fn(params, _batch(), None)[0] for _ in range(2))
    train_a, train_b = (train_fn(params, _batch(), jax.random.key(seed))[0] for seed in (1, 2))
    assert eval_a == eval_b
    assert train_a != train_b and train_a != eval_a


def test_bfloat16_compute_keeps_float32_parameters_and_loss(tiny_config):
    params, (loss_bf16, grads) = _loss_and_grads(tiny_config("", "config.model.dtype=bfloat16"), _batch())
    _, (loss_fp32, _) = _loss_and_grads(tiny_config(), _batch())
    assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(params))
    assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(grads))
    assert loss_bf16.dtype == np.float32
    # Not a reordering but a precision bound: bfloat16 keeps 8 significant bits, each rounding within 2^-9 of what it
    # rounds; along the tiny model's forward pass (embedding, per layer q/k/v, attention, MLP in and out, the logits)
    # about ten roundings compound, each of activations no larger than the loss: within 10 x 2^-9 ~ 2e-2.
    np.testing.assert_allclose(loss_bf16, loss_fp32, rtol=10 * 2.0**-9)


def test_cudnn_attention_on_a_cpu_is_a_clear_error(tiny_config):
    with pytest.raises(config_lib.ConfigError, match="needs a GPU"):
        CausalLM(tiny_config("", "config.model.attention=cudnn", "config.model.dtype=bfloat16"))


@pytest.mark.parametrize(
    "decode, strategy, causal, packed, kernel",
    [
        (False, "", True, False, "cudnn"),  # causal by place: jax's is_causal, which the flash kernel takes
        (False, "", False, False, "cudnn"),
        (False, "", True, True, "xla"),  # packed rows: the segments' mask
        (False, "", False, True, "xla"),
        (True, "", True, False, "xla"),  # generation: the KV cache's filled columns
        (False, "all_gather", True, False, "xla"),  # a split sequence: causal by the tokens' positions
        (False, "all_gather", False, True, "xla"),
        (False, "all_gather", False, False, "cudnn"),  # bidirectional, unpacked: no mask at all
        (False, "ring", True, True, "cudnn"),  # the ring's blocks are its own einsums: the kernel is never called
    ],
)
def test_cudnn_attention_is_never_handed_a_mask(decode, strategy, causal, packed, kernel):
    mask = layers.mask_beyond_causal(decode=decode, strategy=strategy, causal=causal, packed=packed)
    chosen, reason = layers.attention_kernel("cudnn", mask)
    assert chosen == kernel and (reason is None) == (kernel == "cudnn")
    assert layers.attention_kernel("xla", mask) == ("xla", None)


def test_packed_attention_configured_for_cudnn_runs_xla_and_says_so_once(caplog):
    """On a CPU, where cuDNN's kernel would fail ("cuDNN is not detected"): a packed call of a layer configured for
    cuDNN runs XLA's attention, with the segments' mask, and the log says so once however often it is traced."""
    settings = dict(num_heads=2, num_kv_heads=2, head_dim=8, use_bias=False, rope_theta=10_000.0, init_std=0.02)
    settings.update(out_init_std=0.02, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    cudnn, xla = (layers.Attention(implementation=kernel, **settings) for kernel in ("cudnn", "xla"))
    x = jax.random.normal(jax.random.key(0), (1, 8, 16))
    positions, segments = jnp.array([[0, 1, 2, 0, 1, 2, 3, 4]]), jnp.array([[1, 1, 1, 2, 2, 2, 2, 2]])
    params = jax.jit(xla.init)(jax.random.key(1), x, positions, segments)
    layers.log_once.cache_clear()
    # Each call compiled as one program (not op by op); a new jit of its own each time: traced twice, as two layers are.
    with caplog.at_level("WARNING", logger=layers.__name__):
        outputs = [jax.jit(lambda p: cudnn.apply(p, x, positions, segments))(params) for _ in range(2)]
    np.testing.assert_array_equal(outputs[0], jax.jit(lambda p: xla.apply(p, x, positions, segments))(params))
    said = [r.getMessage() for r in caplog.records if "cuDNN" in r.getMessage()]
    assert len(said) == 1 and "packed segments" in said[0], said


# --------------------------------------------------------------------------------------------------
# Rotary positions (RoPE), in Hugging Face's / Llama's convention, so that imported Llama weights mean the same


def rotary_reference(x, positions, theta):
    """Llama's rotary embedding in float64: x * cos + rotate_half(x) * sin, where rotate_half(x) = [-x2, x1] for
    the halves x1, x2 of the head dimension d, and the angle of pair i at position p is p * theta^(-2i/d)."""
    d = x.shape[-1]
    inv_freq = float(theta) ** (-np.arange(0, d, 2, dtype=np.float64) / d)
    angles = np.asarray(positions, np.float64)[..., None] * inv_freq  # [batch, length, d/2]
    cos = np.cos(np.concatenate([angles, angles], -1))[:, :, None, :]  # one angle per head, for every head
    sin = np.sin(np.concatenate([angles, angles], -1))[:, :, None, :]
    x1, x2 = np.split(np.asarray(x, np.float64), 2, axis=-1)
    return x * cos + np.concatenate([-x2, x1], -1) * sin


def rotary_tolerance(max_angle: float) -> float:
    """How far a float32 rotation may be from the exact one, relative to the rotated pair's norm: its angle
    p * theta^(-2i/d) is off by at most a few roundings of the angle (the power, the division, the product:
    <= 2 eps * angle), sin and cos by a few eps each, and each output by the roundings of two products and a sum:
    together under eps * (2 * angle + 8)."""
    return EPS32 * (2 * max_angle + 8)


def test_rotary_rotates_each_pair_of_halves_forward_by_position_times_frequency():
    from bigjax.models.layers import rope_frequencies, rotary

    # By hand, one pair (d=2, frequency 1): (1, 0) at position 1 turns to (cos 1, sin 1), counterclockwise.
    turned = rotary(np.array([[[[1.0, 0.0]]]], np.float32), np.array([[1]]), rope_frequencies(2, 10_000.0))
    np.testing.assert_allclose(turned[0, 0, 0], [np.cos(1.0), np.sin(1.0)], atol=rotary_tolerance(1.0))
    # And the convention at a real head size: 2 rows of 6 positions up to 60, 3 heads of 16.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 6, 3, 16)).astype(np.float32)
    positions = rng.integers(0, 61, (2, 6))
    got = np.asarray(rotary(x, positions, rope_frequencies(16, 10_000.0)), np.float64)
    want = rotary_reference(x, positions, 10_000.0)
    pair_norm = np.sqrt(np.sum(np.stack(np.split(x.astype(np.float64) ** 2, 2, axis=-1)), axis=0))  # [..., d/2]
    bound = rotary_tolerance(positions.max()) * np.concatenate([pair_norm, pair_norm], -1)
    assert (np.abs(got - want) <= bound).all(), np.max(np.abs(got - want) / bound)


def attention_scores(monkeypatch, attention, params, x, positions):
    """The scores q.k [batch, heads, queries, keys] and the norms |q|, |k| that a layer's attention sees, in
    float64, from the queries and keys it hands to jax.nn.dot_product_attention (after the rotary embedding)."""
    seen = {}
    real = jax.nn.dot_product_attention

    def spy(q, k, v, **options):
        seen.update(q=np.asarray(q, np.float64), k=np.asarray(k, np.float64))
        return real(q, k, v, **options)

    monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
    attention.apply({"params": params}, x, positions)
    monkeypatch.undo()
    q, k = seen["q"], seen["k"]
    norms = np.einsum("bqh,bkh->bhqk", np.linalg.norm(q, axis=-1), np.linalg.norm(k, axis=-1))
    return np.einsum("bqhd,bkhd->bhqk", q, k), norms


def test_rotary_attention_scores_depend_on_relative_positions_only(monkeypatch):
    """Queries and keys both rotated: the same tokens at positions shifted by 37 give the same scores; at positions
    twice as far apart, other scores. (Queries rotated alone would make the scores depend on the shift.)"""
    from bigjax.models.layers import Attention

    attention = Attention(
        num_heads=2, num_kv_heads=2, head_dim=16, use_bias=False, rope_theta=10_000.0, implementation="xla",
        init_std=0.5, out_init_std=0.02, dtype=jnp.float32, param_dtype=jnp.float32, causal=False,
    )  # fmt: skip
    x = np.random.default_rng(0).normal(size=(1, 8, 16)).astype(np.float32)
    positions = np.arange(8)[None]
    params = nn.unbox(attention.init(jax.random.key(0), x, positions)["params"])
    scores, norms = attention_scores(monkeypatch, attention, params, x, positions)
    shifted, _ = attention_scores(monkeypatch, attention, params, x, positions + 37)
    # Each rotated query and key is within rotary_tolerance(angle) * its norm of the exact rotation (the largest
    # angle is the largest position, 44, times frequency 1), so each score within twice that times |q| |k|, and two
    # scores of the same exact value within 4 times.
    bound = 4 * rotary_tolerance(44) * norms
    assert (np.abs(shifted - scores) <= bound).all(), f"off by up to {np.max(np.abs(shifted - scores) / bound):.3g}x"
    stretched, _ = attention_scores(monkeypatch, attention, params, x, positions * 2)
    assert np.abs(stretched - scores).max() > 0.1 * norms.max()


# --------------------------------------------------------------------------------------------------
# The defaults of every family stay what they were: the parameter tree (paths, shapes, initial values) bit for bit,
# and the forward pass of a small model of each within float32 reordering. The figures were recorded with the code
# before the Hugging Face encoder settings (model.mlp="gelu_exact", model.norm_variance, model.conv_padding)
# existed; a setting whose default changed anything moves them far past the bound. Initial values are the random
# generator's, the same bits on every machine; logits are not: XLA vectorizes for the CPU it runs on (AVX2 or
# AVX-512), which reorders sums, so they are compared within the sums' float32 bound (tests/tolerance.py), at 16
# fixed places. After a jax upgrade that changes the initializers, record them again from a commit known to be
# unchanged (print `fingerprints` below).


def small_default_configs() -> dict:
    transformer = dict(num_layers=2, d_model=32, num_heads=4)
    configs = {}
    for name, (family, task) in {
        "gpt": ("gpt", "causal_lm"),
        "bert_mlm": ("bert", "masked_lm"),
        "bert_classifier": ("bert", "classification"),
        "vit": ("vit", "classification"),
        "resnet": ("resnet", "classification"),
    }.items():
        c = config_lib.defaults(family, task)
        c.task.num_classes = 3
        c.data.seq_len = 16
        if family in ("gpt", "bert"):
            c.model.update(transformer, max_len=16)
        if family == "bert":
            c.model.type_vocab_size = 2
        if family == "vit":
            c.model.update(transformer, patch_size=4)
            c.data.image_size = 8
        if family == "resnet":
            c.model.update(depth=10, width=8, stem="cifar")
            c.data.image_size = 8
        configs[name] = c
    llama = config_lib.load(TINY + ":llama=True")
    configs["llama"] = llama
    return configs


def forward_fingerprint(config) -> tuple[str, list, float]:
    """(sha256 of the initial variables, the logits at 16 fixed places and their largest magnitude), the logits
    computed after every parameter is perturbed at random."""
    import hashlib

    from bigjax import tasks
    from bigjax.params import by_path

    task = tasks.make_task(config)
    variables = jax.jit(lambda: nn.unbox(task.init_variables(jax.random.key(0))))()
    init_hash = hashlib.sha256()
    for path, leaf in sorted(by_path(variables).items()):
        array = np.asarray(leaf)
        init_hash.update(f"{path}{array.shape}{array.dtype}".encode() + array.tobytes())
    leaves, tree = jax.tree.flatten(variables)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    # The noise drawn compiled, one program per shape, and added in numpy: the same float32 bits as drawing and
    # adding op by op, without compiling each of normal's operations for each shape.
    normal = jax.jit(jax.random.normal, static_argnums=1)
    noise = [np.asarray(normal(k, x.shape)) for x, k in zip(leaves, keys, strict=True)]
    variables = jax.tree.unflatten(
        tree, [np.asarray(x) + np.float32(0.3) * n for x, n in zip(leaves, noise, strict=True)]
    )
    rng = np.random.default_rng(0)
    if config.model.family in ("gpt", "bert"):
        tokens = rng.integers(0, 200, (2, config.data.seq_len)).astype(np.int32)
        segments = np.ones_like(tokens)
        positions = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)
        inputs = (tokens,) if config.task.name == "causal_lm" else (tokens, segments, positions)
    else:
        inputs = (rng.normal(size=(2, 8, 8, 3)).astype(np.float32),)
    logits = np.asarray(jax.jit(lambda v, *x: task.model.apply(v, *x))(variables, *inputs)).ravel()
    places = np.linspace(0, logits.size - 1, 16).astype(int)
    return init_hash.hexdigest()[:16], [float(x) for x in logits[places]], float(np.abs(logits).max())


def forward_sum_lengths(config) -> list:
    """The float32 sums a small default model's logits go through (one example: no sum over the batch)."""
    if config.model.family in ("gpt", "bert"):
        return lm_sum_lengths(config, tokens=1)
    return image_sum_lengths(config)


DEFAULT_FINGERPRINTS = {  # (initial parameters' sha256, logits at 16 places, largest |logit|)
    "gpt": (
        "6b8f9fe44763e21f",
        [
            -3.7306664,
            0.126116872,
            2.50658345,
            -1.02403283,
            1.96261954,
            -1.01817954,
            -0.711539328,
            0.311578333,
            -0.268976182,
            0.102402113,
            -0.0210697558,
            1.42973363,
            0.324138433,
            0.436556458,
            0.0491669737,
            -2.07779694,
        ],
        7.23924541,
    ),
    "bert_mlm": (
        "f0101386625ed1e9",
        [
            -2.69705009,
            -0.184527799,
            -0.406879753,
            0.85025984,
            -2.37476611,
            -2.28294468,
            -0.321574271,
            0.27851972,
            0.0290666521,
            3.08952761,
            0.364877343,
            2.70676589,
            -0.478526294,
            0.531003892,
            -3.44930959,
            1.51263809,
        ],
        6.6379385,
    ),
    "bert_classifier": (
        "400ba44e50165e9d",
        [
            0.591661453,
            0.939653516,
            0.939653516,
            0.939653516,
            0.939653516,
            0.939653516,
            0.939653516,
            0.939653516,
            -0.993831277,
            0.164749473,
            0.164749473,
            0.164749473,
            0.164749473,
            0.164749473,
            0.164749473,
            0.235497385,
        ],
        0.993831277,
    ),
    "vit": (
        "105683549e67798f",
        [
            2.46994019,
            2.46994019,
            2.46994019,
            0.659118593,
            0.659118593,
            0.659118593,
            0.440714061,
            0.440714061,
            0.440714061,
            4.80964851,
            4.80964851,
            4.80964851,
            -1.97472072,
            -1.97472072,
            -1.97472072,
            0.665619969,
        ],
        4.80964851,
    ),
    "resnet": (
        "74c1d5723a386831",
        [
            -20.7545624,
            -20.7545624,
            -20.7545624,
            15.5688324,
            15.5688324,
            15.5688324,
            -75.7042313,
            -75.7042313,
            -75.7042313,
            11.5355711,
            11.5355711,
            11.5355711,
            7.88903475,
            7.88903475,
            7.88903475,
            31.686224,
        ],
        75.7042313,
    ),
    "llama": (
        "88193356f651c385",
        [
            1.12611914,
            0.746128082,
            1.37102652,
            -1.79840755,
            0.0379489474,
            -0.00841464289,
            -2.07256722,
            2.14990044,
            -0.196861118,
            1.16093636,
            1.26437807,
            1.30162609,
            -0.464098543,
            1.39343297,
            1.05378401,
            1.0859766,
        ],
        7.17581987,
    ),
}


def test_every_familys_defaults_compute_what_they_did():
    fingerprints = {name: forward_fingerprint(config) for name, config in small_default_configs().items()}
    print(fingerprints)
    for name, config in small_default_configs().items():
        init_digest, logits, largest = fingerprints[name]
        want_digest, want_logits, want_largest = DEFAULT_FINGERPRINTS[name]
        assert init_digest == want_digest, f"{name}: the initial parameters changed"
        bound = float32_sum_tolerance(*forward_sum_lengths(config)) * want_largest
        np.testing.assert_allclose(logits, want_logits, rtol=0, atol=bound, err_msg=f"{name}: the logits changed")


def test_default_rope_and_biases_compute_what_they_did_before_scaling_and_switches_existed(tiny_config):
    """No scaling is the expression bigjax always used, bit for bit; switches set to what use_bias says give the
    default's parameter tree and logits, bit for bit. (The whole models of tiny, shakespeare_char, llama_1b,
    gpt2_124m, bert_tiny_mlm and vit_digits were compared once against the code before, bit for bit.)"""
    from bigjax.models.layers import rope_frequencies, rotary

    inv_freq, factor = rope_frequencies(16, 5e5)
    before = 1.0 / (5e5 ** (jnp.arange(8, dtype=jnp.float32) / 8))  # the code before rope_scaling
    assert factor == 1.0 and np.array_equal(inv_freq, before)
    x, positions = np.random.default_rng(0).normal(size=(2, 6, 3, 16)).astype(np.float32), np.arange(12).reshape(2, 6)
    angles = positions[..., None].astype(jnp.float32) * before
    sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
    first, second = jnp.split(x, 2, axis=-1)
    np.testing.assert_array_equal(
        rotary(x, positions, (inv_freq, factor)),
        jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1),
    )
    tokens = np.arange(32, dtype=np.int32)[None] % 200
    for arg in ("", "llama=True"):
        default = tiny_config(arg)
        use_bias = default.model.use_bias
        explicit = tiny_config(arg, *[f"--config.model.{key}={use_bias}" for key in config_lib.BIAS_SWITCHES])
        params = init_params(CausalLM(default))
        assert jax.tree.structure(params) == jax.tree.structure(init_params(CausalLM(explicit)))
        np.testing.assert_array_equal(  # each compiled as one program, not op by op
            jax.jit(CausalLM(explicit).model.apply)({"params": params}, tokens),
            jax.jit(CausalLM(default).model.apply)({"params": params}, tokens),
        )


def test_bias_switches_add_exactly_their_biases(tiny_config):
    """Qwen2's q/k/v biases on the tiny Llama (no biases): three bias arrays per layer more, with the paths GPT-2's
    biases have, so that checkpoints keep their layout."""
    plain = nn.unbox(jax.eval_shape(lambda: CausalLM(tiny_config("llama=True")).init_variables(jax.random.key(0))))
    qwen2 = tiny_config("llama=True", "--config.model.qkv_bias=True")
    biased = nn.unbox(jax.eval_shape(lambda: CausalLM(qwen2).init_variables(jax.random.key(0))))
    paths = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(biased["params"])[0]}
    before = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(plain["params"])[0]}
    assert paths - before == {f"['layers']['attention']['{n}']['bias']" for n in ("query", "key", "value")}
