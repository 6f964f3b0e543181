"""Context parallelism (bigjax.parallel.context): attention over a sequence split across the mesh axis `context`, by
all-gather or round a ring, equals dense single-device attention (jax.nn.dot_product_attention with the equivalent
mask) in its output and its gradients w.r.t. q, k and v, within tests/tolerance.py's attention_tolerance; planted
bugs make it differ; the compiled programs communicate as each strategy says.

Every case is grouped-query (4 query heads on 2 key heads) with rotary positions applied before attention, as the
model does, so that positions that did not travel with their tokens change the result twice. The factors are the
strategy, context in {2, 4, 8}, zig-zag order, packed rows (documents that span shards, padding) and causal or not.
Not all 48 combinations: each strategy runs each context size twice, with complementary settings of the three
on/off factors, chosen so that every pair of values of two on/off factors occurs and each context size sees both
values of each: 12 cases, plus data=2 x context=4 with the batch split over data. Zig-zag order is data (the tokens,
positions and segment ids are reordered before the step, as the data layer will), so cases that differ only in it
share one compiled program.
"""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY
from jax.sharding import AxisType, NamedSharding, PartitionSpec
from tolerance import assert_close_after_reordering, attention_tolerance

from bigjax.models.layers import rope_frequencies, rotary, same_segment_mask
from bigjax.parallel import context as cp

BATCH, LENGTH, HEADS, KV_HEADS, HEAD_DIM = 2, 64, 4, 2, 8
# Row 0: documents of 13, 30 and 9 tokens, then 12 of padding; row 1: 40 and 24. Each spans shards for every context.
DOCUMENTS = ([13, 30, 9, 12], [40, 24])


def packed_rows():
    """(segment ids, positions) [BATCH, LENGTH] of DOCUMENTS: segments 1, 2, ... and 0 for a row's padding (row 0's
    last run), positions counted from 0 within each run (the condition under which the causal mask by positions is
    the causal mask by place; bigjax.parallel.context says what happens to the padding's otherwise)."""
    segments, positions = [], []
    for row, lengths in enumerate(DOCUMENTS):
        ids = [(0 if row == 0 and i == len(lengths) - 1 else i + 1) for i in range(len(lengths))]
        segments.append(np.repeat(ids, lengths))
        positions.append(np.concatenate([np.arange(n) for n in lengths]))
    return np.array(segments, np.int32), np.array(positions, np.int32)


@functools.cache
def inputs(packed: bool) -> dict:
    """q [b, t, heads, d], k, v [b, t, kv_heads, d], the cotangent of the output, positions and segment ids."""
    rng = np.random.default_rng(0)
    normal = lambda heads: rng.normal(size=(BATCH, LENGTH, heads, HEAD_DIM)).astype(np.float32)
    arrays = dict(q=normal(HEADS), k=normal(KV_HEADS), v=normal(KV_HEADS), d_out=normal(HEADS))
    if packed:
        arrays["segments"], arrays["positions"] = packed_rows()
    else:
        arrays["segments"], arrays["positions"] = (
            None,
            np.broadcast_to(np.arange(LENGTH, dtype=np.int32), (BATCH, LENGTH)),
        )
    return arrays


def rotated(q, k, positions):
    frequencies = rope_frequencies(HEAD_DIM, 10_000.0)
    return rotary(q, positions, frequencies), rotary(k, positions, frequencies)


def dense_attention(q, k, v, positions, segments, d_out, causal):
    """The reference: one device, tokens in order, jax.nn.dot_product_attention's own causal mask by place."""
    q, k = rotated(q, k, positions)
    mask = None if segments is None else same_segment_mask(segments)
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal)
    return jnp.sum(out * d_out), out


@functools.cache
def dense_result(causal: bool, packed: bool) -> dict:
    a = inputs(packed)
    run = jax.jit(jax.value_and_grad(dense_attention, argnums=(0, 1, 2), has_aux=True), static_argnums=6)
    (_, out), (dq, dk, dv) = run(a["q"], a["k"], a["v"], a["positions"], a["segments"], a["d_out"], causal)
    return dict(out=out, dq=dq, dk=dk, dv=dv)


MESHES = {  # name: (axis sizes, axis names, the mesh axis the batch is split over)
    "context2": ((2,), ("context",), None),
    "context4": ((4,), ("context",), None),
    "context8": ((8,), ("context",), None),
    "data2_context4": ((2, 4), ("data", "context"), "data"),
}


def make_mesh(name: str):
    sizes, names, batch_axis = MESHES[name]
    mesh = jax.make_mesh(
        sizes, names, axis_types=(AxisType.Auto,) * len(sizes), devices=jax.devices()[: math.prod(sizes)]
    )
    return mesh, NamedSharding(mesh, PartitionSpec(batch_axis, "context"))


def compile_attention(mesh_name: str, strategy: str, causal: bool, packed: bool):
    """The compiled step of a case: context-parallel attention's (output, gradients w.r.t. q, k, v), its inputs
    split along their length over `context`."""
    mesh, split = make_mesh(mesh_name)

    def attention(q, k, v, positions, segments, d_out):
        q, k = rotated(q, k, positions)
        out = cp.context_attention(q, k, v, positions, segments, causal=causal, strategy=strategy)
        return jnp.sum(out * d_out), out

    a = inputs(packed)
    arguments = [jax.ShapeDtypeStruct(a[name].shape, a[name].dtype, sharding=split) for name in ("q", "k", "v")]
    arguments += [
        None if a[name] is None else jax.ShapeDtypeStruct(a[name].shape, a[name].dtype, sharding=split)
        for name in ("positions", "segments", "d_out")
    ]
    step = jax.jit(jax.value_and_grad(attention, argnums=(0, 1, 2), has_aux=True))
    with jax.set_mesh(mesh):
        return step.lower(*arguments).compile()


compiled_attention = functools.cache(compile_attention)  # cases that differ only in their data share a program


def context_result(mesh_name, strategy, causal, packed, zigzag, *, compiled=None, undo=cp.unzigzag, new_places=False):
    """(output, gradients) of context-parallel attention, in the original token order. With `zigzag`, the inputs
    go in zig-zag order and the results are taken back by `undo`; `new_places` plants the bug of positions taken
    from the reordered tokens' new places rather than moved along with them."""
    compiled = compiled or compiled_attention(mesh_name, strategy, causal, packed)
    ways = make_mesh(mesh_name)[0].shape["context"]
    a = dict(inputs(packed))
    if zigzag:
        a = {name: None if x is None else cp.zigzag(x, ways) for name, x in a.items()}
    if new_places:
        a["positions"] = np.broadcast_to(np.arange(LENGTH, dtype=np.int32), (BATCH, LENGTH))
    (_, out), (dq, dk, dv) = compiled(*(a[name] for name in ("q", "k", "v", "positions", "segments", "d_out")))
    result = dict(out=out, dq=dq, dk=dk, dv=dv)
    return {name: undo(np.asarray(x), ways) if zigzag else x for name, x in result.items()}


def tolerance(mesh_name: str, packed: bool) -> float:
    """attention_tolerance of the cases' shapes: the scores are bounded by |q| |k| / sqrt(head_dim) (rotary turns
    pairs of features, which keeps the norms), and the rotary's backward pass sums 2 terms."""
    a = inputs(packed)
    largest = lambda x: float(np.linalg.norm(x, axis=-1).max())
    logit_bound = largest(a["q"]) * largest(a["k"]) / math.sqrt(HEAD_DIM)
    ways = make_mesh(mesh_name)[0].shape["context"]
    groups = HEADS // KV_HEADS
    return attention_tolerance(HEAD_DIM, LENGTH, groups, ways, logit_bound) + attention_tolerance(1, 2, 1, 1, 0)


def assert_matches_dense(result, causal, packed, mesh_name, what):
    assert_close_after_reordering(result, dense_result(causal, packed), tolerance(mesh_name, packed), what)


# (context, zigzag, packed, causal): per context size a complementary pair; together every pair of on/off values.
GRID = [
    (2, True, False, False),
    (2, False, True, True),
    (4, True, False, True),
    (4, False, True, False),
    (8, True, True, True),
    (8, False, False, False),
]


@pytest.mark.parametrize("strategy", cp.STRATEGIES)
@pytest.mark.parametrize("context, zigzag, packed, causal", GRID)
def test_context_attention_equals_dense(strategy, context, zigzag, packed, causal):
    result = context_result(f"context{context}", strategy, causal, packed, zigzag)
    what = f"{strategy}, context={context}, zigzag={zigzag}, packed={packed}, causal={causal}"
    assert_matches_dense(result, causal, packed, f"context{context}", what)


@pytest.mark.parametrize("strategy", cp.STRATEGIES)
def test_context_beside_data_axis(strategy):
    """data=2 x context=4: the batch split over data, automatic, around the shard_map that is manual over context."""
    result = context_result("data2_context4", strategy, causal=True, packed=True, zigzag=True)
    assert_matches_dense(result, True, True, "data2_context4", f"{strategy} on data=2 x context=4")


def test_zigzag_layout_and_inverse():
    """Device i of n holds chunks i and 2n-1-i of the sequence, and unzigzag undoes it exactly, on any axis."""
    x = np.arange(2 * 16 * 3).reshape(2, 16, 3)
    reordered = cp.zigzag(x, 4)
    chunks = x.reshape(2, 8, 2, 3)  # 2 x 4 chunks of 2 tokens
    for device, part in enumerate(np.split(reordered, 4, axis=1)):
        np.testing.assert_array_equal(part, np.concatenate([chunks[:, device], chunks[:, 7 - device]], axis=1))
    np.testing.assert_array_equal(cp.unzigzag(reordered, 4), x)
    by_time = jnp.asarray(x.transpose(1, 0, 2))  # a jax array, its sequence on axis 0
    np.testing.assert_array_equal(cp.unzigzag(cp.zigzag(by_time, 2, axis=0), 2, axis=0), by_time)
    with pytest.raises(ValueError, match="2 x 4 equal chunks"):
        cp.zigzag(np.zeros((1, 12)), 4)


def assert_differs_from_dense(result, causal, packed, mesh_name):
    with pytest.raises(AssertionError):
        assert_matches_dense(result, causal, packed, mesh_name, "planted bug")


def test_planted_ring_skipping_one_rotation(monkeypatch):
    """A ring of 2 devices whose forward pass skips its one rotation (the first call of `_rotate` traced: each
    device attends to its own block twice and never to the other one) differs from dense attention."""
    rotate, calls = cp._rotate, []

    def skip_first(tree, axis_name):
        calls.append(axis_name)
        return tree if len(calls) == 1 else rotate(tree, axis_name)

    monkeypatch.setattr(cp, "_rotate", skip_first)
    planted = compile_attention("context2", "ring", causal=True, packed=False)
    result = context_result("context2", "ring", True, False, False, compiled=planted)
    assert_differs_from_dense(result, True, False, "context2")


def test_planted_segment_mask_dropped_on_blocks_from_other_devices(monkeypatch):
    """A ring that applies the segment mask only to each device's own block lets packed documents see each other
    across shards, forward and backward: differs from dense attention. The own block is told apart by its positions:
    no other block of DOCUMENTS' rows has the same."""
    visible = cp.visible

    def own_block_only(q_positions, k_positions, q_segments, k_segments, causal):
        own = jnp.all(q_positions == k_positions)
        with_segments = visible(q_positions, k_positions, q_segments, k_segments, causal)
        return jnp.where(own, with_segments, visible(q_positions, k_positions, None, None, causal))

    monkeypatch.setattr(cp, "visible", own_block_only)
    planted = compile_attention("context4", "ring", causal=True, packed=True)
    result = context_result("context4", "ring", True, True, True, compiled=planted)
    assert_differs_from_dense(result, True, True, "context4")


@pytest.mark.parametrize("strategy", cp.STRATEGIES)
def test_planted_zigzag_not_undone(strategy):
    keep_order = lambda x, ways: x
    result = context_result("context4", strategy, True, False, True, undo=keep_order)
    assert_differs_from_dense(result, True, False, "context4")


@pytest.mark.parametrize("strategy", cp.STRATEGIES)
def test_planted_positions_from_new_places(strategy):
    """Reordered tokens whose positions (rotary and causal mask) are their new places, not their own."""
    result = context_result("context4", strategy, True, False, True, new_places=True)
    assert_differs_from_dense(result, True, False, "context4")


def collectives(hlo: str) -> list:
    """(operation, result shape without layout) of each collective in an optimized HLO text."""
    ops = "all-gather|collective-permute|all-to-all|reduce-scatter|all-reduce"
    return re.findall(rf"= (\w+\[[\d,]*\])(?:\{{[^}}]*\}})? ({ops})(?:-start)?\(", hlo)


@pytest.mark.parametrize("mesh_name", ["context4", "data2_context4"])
def test_compiled_collectives(mesh_name):
    """Under `ring` the optimized program (forward and backward) sends key/value blocks by collective-permutes and
    gathers nothing; under `all_gather` it gathers whole keys and values and permutes nothing. Beside a data axis,
    each device's part of the batch stays its own (jax.lax.all_gather inside the shard_map gathered the batch too)."""
    batch = BATCH // make_mesh(mesh_name)[0].shape.get("data", 1)
    block = f"f32[{batch},{LENGTH // 4},{KV_HEADS},{HEAD_DIM}]"
    whole = f"f32[{batch},{LENGTH},{KV_HEADS},{HEAD_DIM}]"
    ring = collectives(compiled_attention(mesh_name, "ring", True, True).as_text())
    gathered = collectives(compiled_attention(mesh_name, "all_gather", True, True).as_text())
    assert (block, "collective-permute") in ring and not [op for _, op in ring if op == "all-gather"], ring
    assert (whole, "all-gather") in gathered, gathered
    assert not [op for _, op in gathered if op == "collective-permute"], gathered
    assert all(shape.split("[")[1].startswith(f"{batch},") for shape, op in gathered if op == "all-gather"), gathered


# --------------------------------------------------------------------------------------------------
# The model: config.mesh.context splits the sequence of every activation, model.context_parallel picks how attention
# sees the whole of it, and the data puts each sequence in zig-zag order (data.context_load_balance). One train
# step's loss and every parameter's gradient equal those of the original order on one device.

MODEL_MESHES = {  # name: config.mesh
    "data2_context4": dict(data=2, fsdp=1, tensor=1, context=4),
    "data2_fsdp2_context2": dict(data=2, fsdp=2, tensor=1, context=2),
    "fsdp2_tensor2_context2": dict(data=1, fsdp=2, tensor=2, context=2),
    # Inside a pipeline (2 micro-batches): attention's shard_map over `context` within the pipeline's over `stage`.
    "data2_context2_stage2": dict(data=2, fsdp=1, tensor=1, context=2, stage=2),
}


BERT = TINY.replace("tiny.py", "bert_tiny_mlm.py")
GENRE = TINY.replace("tiny.py", "finetune_genre.py")
# The tiny Llama with Llama 3.1's rope scaling: of head_dim 8's wavelengths (2 pi x 1, 10, 100, 1000), those above
# original_max_len=16 are divided by factor, 2 pi is blended between (above 16 / high_freq_factor = 4).
ROPE_SCALED = ["type=llama3", "factor=8.0", "original_max_len=16", "low_freq_factor=1.0", "high_freq_factor=4.0"]
VARIANTS = {  # name: (experiment, overrides)
    "gpt2": (f"{TINY}:llama=False", []),
    "llama": (f"{TINY}:llama=True", []),
    "llama_rope_scaled": (f"{TINY}:llama=True", [f"--config.model.rope_scaling.{kv}" for kv in ROPE_SCALED]),
    # Dropout (on the embeddings and each residual branch; no model of bigjax drops attention weights) in training
    "gpt2_dropout": (f"{TINY}:llama=False", ["--config.model.dropout=0.1"]),
    # BERT's masked LM, bidirectional over packed rows, as tiny as the tiny GPT
    "bert": (f"{BERT}:layers=2,d=32,seq=32", ["--config.batch_size=8"]),
    # BERT's classifier of packed examples (each from its first token), on the same encoder
    "bert_classifier": (
        f"{GENRE}:init=none,batch=8",
        [f"--config.{key}" for key in ("model.num_layers=2", "model.d_model=32", "model.max_len=32", "data.seq_len=32")]
        + ["--config.model.dropout=0.0"],
    ),
}


def model_config(variant: str, strategy: str = "all_gather", mesh=None, balance: bool = True):
    from bigjax import config as config_lib

    experiment, overrides = VARIANTS[variant]
    overrides = [*overrides, f"--config.model.context_parallel={strategy}"]
    config = config_lib.load(experiment, [*overrides, f"--config.data.context_load_balance={balance}"])
    config.mesh.update(mesh or dict(data=1, context=1))
    return config


# BERT's rows: packed examples of these lengths (0: the row's padding), each starting with the cls token; with 4
# devices of 8 tokens, most examples span shards.
BERT_ROWS = ([5, 20, 7], [32], [10, 10, 8, -4], [3, 25, -4], [12, 12, -8], [31, -1], [6, 6, 6, 6, 8], [17, 15])


def mlm_batch(config) -> dict:
    """A fixed batch of packed BERT rows (BERT_ROWS): random ordinary tokens, segment ids 1, 2, ... (0 for padding,
    the pad token), positions counted within each example (0 for padding), as bigjax.data packs them."""
    from bigjax.data import make_tokenizer

    special = make_tokenizer(config.data.tokenizer).special_ids
    rng = np.random.default_rng(0)
    rows = {key: [] for key in ("tokens", "segment_ids", "positions")}
    for lengths in BERT_ROWS:
        segments, positions, tokens = [], [], []
        for i, n in enumerate(lengths):
            pad = n < 0
            segments += [0 if pad else i + 1] * abs(n)
            positions += [0] * abs(n) if pad else list(range(n))
            example = [special["pad"]] * abs(n) if pad else [special["cls"], *rng.integers(0, 256, n - 1)]
            tokens += example
        for key, row in zip(rows, (tokens, segments, positions), strict=True):
            rows[key].append(row)
    assert len(BERT_ROWS) == config.batch_size and all(len(r) == config.data.seq_len for r in rows["tokens"])
    return {key: np.array(value, np.int32) for key, value in rows.items()}


def lm_batch(config) -> dict:
    """A fixed batch of config's shape in the original order: random tokens, some padding (as test_sharding's)."""
    if config.task.name == "masked_lm":
        return mlm_batch(config)
    if config.task.name == "classification":  # BERT's packed rows, a label for each example
        batch = mlm_batch(config)
        examples = np.array(
            [[i < len(lengths) and lengths[i] > 0 for i in range(config.data.max_segments)] for lengths in BERT_ROWS]
        )
        labels = np.random.default_rng(1).integers(0, 2, examples.shape)
        return {**batch, "labels": labels.astype(np.int32), "label_weights": examples.astype(np.float32)}
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, (config.batch_size, config.data.seq_len + 1), dtype=np.int32)
    weights = np.ones((config.batch_size, config.data.seq_len), np.float32)
    weights[0, -5:] = 0
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": weights}


def as_the_data_layer_gives_it(batch: dict, config) -> dict:
    """The batch in the order, and with the keys, that bigjax.data gives `config`'s train step."""
    from bigjax import config as config_lib
    from bigjax.data import pipeline

    return pipeline.context_order(batch, config.mesh.context) if config_lib.balances_context(config) else batch


@functools.cache
def compiled_model_step(variant: str, strategy: str, mesh_name: str | None, balance: bool = True):
    """(setup, the compiled (loss, gradients) of one step of the tiny model) on MODEL_MESHES[mesh_name], or on one
    device (None)."""
    from bigjax.run.setup import make_setup

    config = model_config(variant, strategy, MODEL_MESHES.get(mesh_name), balance)
    setup = make_setup(config, jax.devices() if mesh_name else jax.devices()[:1])

    # BERT's masking as in training (from an rng, not the eval's keys of each row's tokens); dropout where the model
    # has it (train=True): the same rng on every mesh
    train = config.model.dropout > 0
    rng = jax.random.key(1) if config.task.name == "masked_lm" or train else None

    def mean_loss(p, b):
        sums, _ = setup.task.loss_sums(p, {}, b, rng=rng, train=train)
        return sums["loss"] / sums["count"]

    step = jax.jit(jax.value_and_grad(mean_loss), in_shardings=(setup.state_shardings.params, setup.sharding.batch))
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), setup.abstract_state.params)
    batch = setup.task.batch_spec(config.batch_size)
    with setup.sharding.activate():
        return setup, step.lower(params, batch).compile()


def loss_and_grads(variant, strategy, mesh_name, balance=True, batch=None):
    """(loss, gradients) of the compiled step on the fixed batch (in the data layer's order, unless given), from
    the parameters of a fresh init (the same on every mesh)."""
    setup, compiled = compiled_model_step(variant, strategy, mesh_name, balance)
    params = reference_params(variant)
    batch = as_the_data_layer_gives_it(lm_batch(setup.config), setup.config) if batch is None else batch
    with setup.sharding.activate():
        loss, grads = compiled(jax.device_put(params, setup.state_shardings.params), setup.sharding.global_batch(batch))
    return jax.device_get(loss), jax.device_get(grads)


@functools.cache
def reference_params(variant: str):
    from conftest import init_params

    setup, _ = compiled_model_step(variant, "all_gather", None)
    params = jax.device_get(init_params(setup.task))
    # A classifier's head starts at zero, which would stop every gradient below it: a random one instead
    rng = np.random.default_rng(2)
    new_head = lambda path, x: rng.normal(0, 0.1, x.shape).astype(x.dtype) if "classifier" in str(path) else x
    return jax.tree_util.tree_map_with_path(new_head, params)


@functools.cache
def one_device(variant: str):
    return loss_and_grads(variant, "all_gather", None)


def model_tolerance(variant: str, mesh_name: str) -> float:
    """tolerance.py's bound for the Transformer's sums plus, in each layer, attention_tolerance's terms that bound
    does not count: the ring's product of `context` rescalings, the exponentials' arguments (scores of the tiny
    model at init are far below 1: weights of std 0.02) and two exps of an ulp."""
    from tolerance import EPS32, float32_sum_tolerance, lm_sum_lengths

    config = model_config(variant, mesh=MODEL_MESHES[mesh_name])
    tolerance = float32_sum_tolerance(*lm_sum_lengths(config, tokens=config.batch_size * config.data.seq_len))
    return tolerance + config.model.num_layers * (config.mesh.context + 1 + 2) * EPS32


def assert_model_matches_one_device(result, variant, mesh_name, what):
    loss, grads = one_device(variant)
    tolerance = model_tolerance(variant, mesh_name)
    np.testing.assert_allclose(result[0], loss, rtol=tolerance, err_msg=f"loss, {what}")
    assert_close_after_reordering(result[1], grads, tolerance, f"gradients, {what}")


MODEL_CASES = [  # (variant, strategy, mesh, zig-zag order): GPT-2 has learned positions, Llama rotary and GQA
    # (data.context_load_balance; a causal LM's only)
    ("llama", "ring", "data2_context4", True),
    ("llama", "all_gather", "data2_context4", False),
    ("gpt2", "ring", "data2_context4", True),
    ("llama", "ring", "data2_fsdp2_context2", True),
    ("gpt2", "all_gather", "fsdp2_tensor2_context2", True),
    ("llama", "ring", "data2_context2_stage2", True),
    ("llama", "all_gather", "data2_context2_stage2", True),
    # Llama 3.1's rope scaling: the stretched frequencies of each token's own position, in zig-zag order
    ("llama_rope_scaled", "ring", "data2_context4", True),
    # BERT: bidirectional over packed rows, whose examples span shards; data.context_load_balance on (the default),
    # and ignored: no causal mask to balance, the masked LM's rows stay in order
    ("bert", "ring", "data2_context4", True),
    ("bert", "all_gather", "data2_context4", True),
    ("bert_classifier", "ring", "data2_context4", True),
    # Dropout's masks are drawn for the whole [batch, length] array (jax's random bits depend on the key and the
    # global shape, never on how the array is split), so the split sequence drops what one device drops. In zig-zag
    # order masks go by place in the reordered sequence: as random, but another draw (seen to differ beyond the
    # bound), hence zig-zag off here.
    ("gpt2_dropout", "ring", "data2_context4", False),
]


@pytest.mark.parametrize("variant, strategy, mesh_name, balance", MODEL_CASES)
def test_train_step_with_context_equals_one_device(variant, strategy, mesh_name, balance):
    """The loss and every parameter's gradient of the tiny GPT-2 (learned positions), Llama (rotary, grouped-query;
    with Llama 3.1's rope scaling) or BERT (bidirectional masked LM over packed rows, in their order), its sequence
    split over `context` beside data, fsdp and tensor, the data in zig-zag order or not, within the bound of the
    one-device step's; the ring's program sends blocks around it, the all-gather's gathers whole keys
    and values."""
    what = f"{variant}, {strategy}, {mesh_name}, zig-zag {balance}"
    assert_model_matches_one_device(loss_and_grads(variant, strategy, mesh_name, balance), variant, mesh_name, what)
    setup, compiled = compiled_model_step(variant, strategy, mesh_name, balance)
    c, mesh = setup.config, setup.config.mesh
    kv_heads = (c.model.num_kv_heads or c.model.num_heads) // mesh.tensor  # one device's keys and values
    head_dim = c.model.d_model // c.model.num_heads
    microbatches = c.model.get("pipeline", {}).get("microbatches", 0) or mesh.stage
    local = c.batch_size // (mesh.data * mesh.fsdp) // microbatches  # a micro-batch
    kv = lambda length: f"f32[{local},{length},{kv_heads},{head_dim}]"
    ops = collectives(compiled.as_text())
    gathered = [shape for shape, op in ops if op == "all-gather" and shape == kv(c.data.seq_len)]
    permuted = [
        shape for shape, op in ops if op == "collective-permute" and shape == kv(c.data.seq_len // mesh.context)
    ]
    assert (bool(permuted), bool(gathered)) == ((True, False) if strategy == "ring" else (False, True)), ops


def test_planted_zigzag_not_undone_for_the_loss(monkeypatch):
    """Targets and weights left in the original order while the inputs go in zig-zag order: each prediction is
    scored against another token's target, and the loss and gradients differ from one device's."""
    from bigjax.data import pipeline

    setup, _ = compiled_model_step("llama", "ring", "data2_context4")
    monkeypatch.setattr(pipeline, "SEQUENCE_KEYS", ("inputs", "positions"))
    batch = as_the_data_layer_gives_it(lm_batch(setup.config), setup.config)
    result = loss_and_grads("llama", "ring", "data2_context4", batch=batch)
    with pytest.raises(AssertionError):
        assert_model_matches_one_device(result, "llama", "data2_context4", "planted")


@pytest.mark.parametrize("variant", ["llama", "gpt2"])
def test_planted_model_positions_from_new_places(variant):
    """Reordered tokens whose positions (rotary for Llama, learned for GPT-2) are their new places 0..T-1 rather than
    their own: the loss and gradients differ from one device's."""
    setup, _ = compiled_model_step(variant, "ring", "data2_context4")
    batch = as_the_data_layer_gives_it(lm_batch(setup.config), setup.config)
    batch["positions"] = np.broadcast_to(np.arange(setup.config.data.seq_len, dtype=np.int32), batch["inputs"].shape)
    result = loss_and_grads(variant, "ring", "data2_context4", batch=batch)
    with pytest.raises(AssertionError):
        assert_model_matches_one_device(result, variant, "data2_context4", "planted")


def test_data_in_zigzag_order_with_positions(tiny_config):
    """data.context_load_balance: the train and eval batches are those of the original order, each sequence in
    zig-zag order for config.mesh.context devices (-1 resolved as the mesh resolves it) with its positions; off, or
    with context=1, the batches are as they were."""
    from bigjax.data import pipeline

    synthetic = ["--config.data.source=synthetic", "--config.eval_batches=1"]
    plain = tiny_config("", *synthetic)
    first = lambda config: (next(pipeline.train_batches(config)), pipeline.eval_data(config).batches[0])
    original = first(plain)
    assert all("positions" not in batch for batch in original)
    positions = np.broadcast_to(np.arange(32, dtype=np.int32), (8, 32))
    for mesh, ways in (["--config.mesh.context=4"], 4), (["--config.mesh.data=1", "--config.mesh.context=-1"], 8):
        for batch, reference in zip(first(tiny_config("", *synthetic, *mesh)), original, strict=True):
            assert batch.keys() == {*reference, "positions"}
            np.testing.assert_array_equal(cp.unzigzag(batch["positions"], ways), positions)
            for key, value in reference.items():
                np.testing.assert_array_equal(cp.unzigzag(batch[key], ways), value, err_msg=key)
    off = first(tiny_config("", *synthetic, "--config.mesh.context=4", "--config.data.context_load_balance=False"))
    for batch, reference in zip(off, original, strict=True):
        jax.tree.map(np.testing.assert_array_equal, batch, reference)


# --------------------------------------------------------------------------------------------------
# The command line: bad settings refused before anything compiles; a run with its sequence split logs one device's
# losses, and resumes onto another context size and strategy.

VIT = TINY.replace("tiny.py", "vit_digits.py")
BAD_CONTEXT_SETTINGS = [  # (experiment, overrides, what the error says)
    (TINY, ["--config.mesh.context=4", "--config.data.seq_len=20"], "seq_len=20 does not split into 8 equal pieces"),
    (
        TINY,
        ["--config.mesh.context=4", "--config.data.seq_len=30", "--config.data.context_load_balance=False"],
        "seq_len=30 does not split into 4 equal pieces",
    ),
    (VIT, ["--config.mesh.context=2"], "family='vit' does not support (only 'gpt' and 'bert' do: vit, cnn and resnet"),
]


@pytest.mark.parametrize("experiment, overrides, message", BAD_CONTEXT_SETTINGS, ids=["zigzag", "split", "vit"])
def test_bad_context_settings_are_one_error_line(cli_in_process, tmp_path, experiment, overrides, message):
    workdir = tmp_path / "run"
    refused = cli_in_process("train", "--config", experiment, "--workdir", workdir, *overrides, check=False)
    assert refused.returncode == 2 and message in refused.stderr, refused.stderr
    assert [line for line in refused.stderr.splitlines() if line.strip()] == [refused.stderr.strip()], refused.stderr
    assert refused.stderr.startswith("error:") and not workdir.exists()


def test_cli_run_with_ring_context_logs_one_device_losses_and_resumes_onto_another_context(
    cli_in_process, tiny_run, tmp_path
):
    """`bigjax train` on 8 devices with the sequence split over context=4 (ring, zig-zag order) logs the losses of
    the same run on data=8 (the shared tiny_run) to 1e-4 relative, and resumed at its step-4 checkpoint with
    context=2 and all_gather, the rest of them; its checkpoints generate text."""
    from bigjax import config as config_lib
    from bigjax.ops import metrics
    from bigjax.run import train

    losses = lambda run: {
        row["step"]: row["loss"] for row in metrics.read_jsonl(run / "metrics.jsonl") if "loss" in row
    }
    workdir = tmp_path / "run"
    ring = ["--config.mesh.context=4", "--config.model.context_parallel=ring"]
    cli_in_process("train", "--config", TINY, "--workdir", workdir, *ring, "--stop-at-step", "4")
    assert sorted(losses(workdir)) == [2, 4]
    train.train(config_lib.load(TINY, ["--config.mesh.context=2"]), workdir)
    reference = losses(tiny_run)
    assert sorted(losses(workdir)) == sorted(reference) == [2, 4, 6, 8]
    np.testing.assert_allclose([losses(workdir)[s] for s in reference], list(reference.values()), rtol=1e-4)
    # Generation needs no parallelism: it samples on one device, whatever the run's mesh (context included).
    from bigjax import generate

    assert isinstance(generate.load(workdir).complete(["ROMEO:"], generate.Sampling(max_new_tokens=3))[0], str)


# --------------------------------------------------------------------------------------------------
# `bigjax plan` with the sequence split: activations per device fall with context.

LONG = TINY.replace("tiny.py", "long_context.py")


def test_plan_of_llama3_8b_at_128k_tokens_fits_8_h100s_with_context_8_not_without():
    from bigjax import config as config_lib
    from bigjax import plan

    split, whole = (
        plan.make_plan(config_lib.load(f"{LONG}:size=8b,context={c}"), num_devices=8, device_kind="h100")
        for c in (8, 1)
    )
    assert split.mesh["context"] == 8 and {axis: n for axis, n in whole.mesh.items() if n > 1} == dict(fsdp=8)
    assert split.fits and not whole.fits
    # The same weights and optimizer state per device (split over context as over fsdp); a device's activations are
    # those of 131072 / 8 tokens instead of 131072.
    assert split.per_device["parameters"] == whole.per_device["parameters"]
    assert 4 < whole.per_device["activations"] / split.per_device["activations"] < 8


@pytest.mark.parametrize("strategy", cp.STRATEGIES)
def test_plan_models_the_split_activations_near_xla(tiny_config, strategy):
    """The plan's model of the activations of data=2 x context=4 against XLA's compiled figure (within 3x, as
    test_plan's for the other axes)."""
    from bigjax import plan

    config = tiny_config("llama=True", "--config.mesh.context=4", f"--config.model.context_parallel={strategy}")
    compiled = plan.make_plan(config)
    modelled = plan.make_plan(config, num_devices=8, device_kind="h100")
    assert modelled.mesh["context"] == 4 and compiled.source == "compiled"
    assert modelled.per_device["batch"] == compiled.per_device["batch"]  # positions included
    assert 1 / 3 < modelled.per_device["activations"] / compiled.per_device["activations"] < 3
