"""Context (sequence) parallelism: self-attention over a sequence split across the mesh axis `context`.

Every other layer of a Transformer treats its tokens one by one, so a sequence split over devices needs
communication only in attention, where a query must see the keys of the whole sequence. Two strategies:

- `all_gather`: each device gathers the keys and values of the whole sequence (with their positions and segment
  ids) and attends with its own queries: one collective, then ordinary attention (jax.nn.dot_product_attention,
  on each device's own queries: a kernel such as cuDNN's sees no split sequence).
  The whole sequence's K/V lives on every device; queries, scores and everything else stay split.
- `ring`: K/V blocks travel around the ring of `context` devices with `ppermute`; each device attends to the block it
  holds and accumulates as flash attention does (running max and sum, float32). A device holds the block it
  works on and the one in transit, whatever the length of the ring, and each transfer can overlap the work on the
  block before. The backward pass goes round the ring again (custom_vjp), see `_ring_backward` for why.

Masks come from the tokens' own positions and segment ids, which travel with their keys: a query sees the keys at
its position or before (causal), in its own segment (packed). Never from places in a local array, so they hold in
any token order (zig-zag) and whichever device a key came from. The causal mask by positions is exact where positions
increase along each segment, as in every bigjax batch (0..T-1 per row, or counted from 0 in each packed segment),
except a packed row's padding (segment 0, every position 0): its tokens see each other, rather than the padding
before them, which changes nothing that a loss sees, as padding sees only padding.

Zig-zag order: with a causal mask the device that holds the end of the sequence has the most work. `zigzag` cuts a
sequence into 2n chunks so that device i holds chunks i and 2n-1-i (an early and a late one), `unzigzag` undoes it.
The reordering happens once, in the data, with positions and segment ids moved along with their tokens.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

CONTEXT_AXIS = "context"
STRATEGIES = ("all_gather", "ring")


def zigzag_indices(length: int, ways: int) -> np.ndarray:
    """[length] ints: the original place of each token in zig-zag order. The sequence is cut into 2 x `ways` equal
    chunks and the i-th of `ways` equal parts of the reordered sequence (device i's) holds chunks i and 2 ways-1-i."""
    if length % (2 * ways):
        raise ValueError(f"{length} tokens do not split into 2 x {ways} equal chunks for zig-zag order")
    chunk = length // (2 * ways)
    chunks = [c for i in range(ways) for c in (i, 2 * ways - 1 - i)]
    return (np.array(chunks)[:, None] * chunk + np.arange(chunk)).reshape(-1)


def zigzag(x, ways: int, axis: int = 1):
    """x (a numpy or jax array) with its sequence axis in zig-zag order for `ways` devices."""
    return x.take(zigzag_indices(x.shape[axis], ways), axis=axis)


def unzigzag(x, ways: int, axis: int = 1):
    """x in zig-zag order back in the original order: the inverse of `zigzag`."""
    return x.take(np.argsort(zigzag_indices(x.shape[axis], ways)), axis=axis)


def sequence_axis(logical_name: str = "activation_length") -> str | None:
    """The mesh axis that splits the sequence of activations (the logical axis `logical_name`, under the current
    logical rules and mesh), or None where nothing does: no mesh, no rule, or an axis of one device."""
    axes = nn.logical_to_mesh_axes((logical_name,))[0]
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    mesh = jax.sharding.get_abstract_mesh()
    split = [axis for axis in axes if mesh.shape.get(axis, 1) > 1]
    if len(split) > 1:
        raise ValueError(f"the sequence is split over mesh axes {split}; context parallelism takes one")
    return split[0] if split else None


def visible(q_positions, k_positions, q_segments, k_segments, causal: bool):
    """[batch, queries, keys] booleans: the keys each query may attend to, or None for all of them. Causal: keys at
    the query's position or before; segment ids given (packed rows): keys of the query's own segment."""
    mask = q_positions[:, :, None] >= k_positions[:, None, :] if causal else None
    if q_segments is not None:
        same = q_segments[:, :, None] == k_segments[:, None, :]
        mask = same if mask is None else mask & same
    return mask


def context_attention(
    q,
    k,
    v,
    positions,
    segment_ids=None,
    *,
    causal: bool,
    strategy: str = "all_gather",
    axis_name: str = CONTEXT_AXIS,
    implementation: str | None = None,
):
    """Self-attention of q [batch, length, heads, head_dim] over k, v [batch, length, kv_heads, head_dim] (kv_heads
    divides heads: grouped-query attention) whose length axis is split over the mesh axis `axis_name` of the current
    mesh (jax.set_mesh). The tokens may be in any order: `positions` [batch, length] say where each one is, and
    `segment_ids` [batch, length] (None: one sequence per row) which packed document it is in. Returns [batch, length,
    heads, head_dim], split as q is. The other mesh axes stay automatic (the batch over data, heads over tensor).

    `implementation` is jax.nn.dot_product_attention's, for `all_gather` (the caller's choice: layers.attention_kernel
    never picks cuDNN's for a call with a mask); `ring` computes its blocks itself.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"context parallel strategy {strategy!r} is not one of {', '.join(STRATEGIES)}")
    if axis_name not in jax.sharding.get_abstract_mesh().axis_names:
        raise ValueError(f"context_attention needs a mesh with an axis {axis_name!r} (jax.set_mesh)")
    split = PartitionSpec(None, axis_name)  # [batch, length, ...] split along the length; the rest automatic
    if strategy == "ring":
        on_device = lambda *arrays: _ring_attention(*arrays, causal, axis_name)
        in_specs, arrays = split, (q, k, v, positions, segment_ids)
    else:
        on_device = functools.partial(_attention_to_gathered, causal=causal, implementation=implementation)
        gathered = [_gathered(x, axis_name) for x in (k, v, positions, segment_ids)]
        in_specs, arrays = (split,) * 3 + (PartitionSpec(),) * 4, (q, positions, segment_ids, *gathered)
    in_context = jax.shard_map(on_device, in_specs=in_specs, out_specs=split, axis_names={axis_name})
    return in_context(*arrays)


def _gathered(x, axis_name: str):
    """x [batch, length, ...] whole along its length and as it was along its other axes: XLA all-gathers it over
    `axis_name` (and, going back, sums its gradient over it). A sharding constraint, outside the region that is
    manual over `axis_name`: jax.lax.all_gather inside it (jax 0.10) first gathers the automatic axes too, so that
    every device would hold the whole batch."""
    if x is None:
        return None
    free = (PartitionSpec.UNCONSTRAINED,) * (x.ndim - 2)
    x = jax.lax.with_sharding_constraint(x, PartitionSpec(PartitionSpec.UNCONSTRAINED, axis_name, *free))
    return jax.lax.with_sharding_constraint(x, PartitionSpec(PartitionSpec.UNCONSTRAINED, None, *free))


def _attention_to_gathered(q, positions, segments, k, v, k_positions, k_segments, *, causal, implementation):
    """On one device: its queries against the whole sequence's keys, with the keys' positions and segments."""
    mask = visible(positions, k_positions, segments, k_segments, causal)
    mask = None if mask is None else mask[:, None]  # [batch, 1 (every head), queries, keys]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)


def _rotate(tree, axis_name: str):
    """Every array of `tree` sent one step around the ring: device i's to device i+1, the last device's to the first."""
    n = jax.lax.axis_size(axis_name)
    ring = [(i, (i + 1) % n) for i in range(n)]
    return jax.tree.map(lambda x: jax.lax.ppermute(x, axis_name, ring), tree)


def _round_the_ring(visit, block, state, axis_name: str):
    """`state` after `visit(block, state)` with the key block of every device of the ring in turn, this device's own
    first; each block is sent on to the next device while it is visited here, so that the transfer can overlap the
    work.

    A scan of n steps, so that a step's temporaries (a block's scores) are freed before the next step begins: with
    the steps unrolled, XLA fuses the running sums across steps and keeps every step's scores alive at once. The
    n-th transfer brings each block back home, which the forward pass does not need; a loop of n-1 steps and a last
    visit apart would save it, but XLA unrolls a loop of one step (n = 2), and memory doubles again.
    """

    def step(carry, _):
        block, state = carry
        return (_rotate(block, axis_name), visit(block, state)), None

    (_, state), _ = jax.lax.scan(step, (block, state), length=jax.lax.axis_size(axis_name))
    return state


def _varying(tree, axis_name: str):
    """Fresh arrays (zeros, -inf) typed as differing between the devices of `axis_name`, as the running sums they
    start will: a scan's carry keeps its type."""
    return jax.tree.map(lambda x: jax.lax.pcast(x, axis_name, to="varying"), tree)


def _grouped(x, kv_heads: int):
    """[batch, length, heads, head_dim] -> [batch, length, kv_heads, groups, head_dim]: the query heads that share
    each key head side by side (jax.nn.dot_product_attention's grouping: query head h uses key head h // groups)."""
    b, t, heads, d = x.shape
    return x.reshape(b, t, kv_heads, heads // kv_heads, d)


def _scores(qg, k, mask):
    """float32 scores [batch, queries, kv_heads, groups, keys] of grouped queries against a key block; -inf where
    `mask` [batch, queries, keys] hides the key."""
    scores = jnp.einsum("bqkgd,bskd->bqkgs", qg, k, preferred_element_type=jnp.float32) / math.sqrt(qg.shape[-1])
    return scores if mask is None else jnp.where(mask[:, :, None, None, :], scores, -jnp.inf)


def _accumulate(qg, q_positions, q_segments, block, stats, causal: bool):
    """One step of the online softmax: the running (weighted sum of values, max score, sum of exp(score - max)) of
    each query, float32, updated with the key block (k, v, positions, segments) this device holds now."""
    k, v, k_positions, k_segments = block
    weighted, top, total = stats
    scores = _scores(qg, k, visible(q_positions, k_positions, q_segments, k_segments, causal))
    # The max cancels between the sums, so no gradient needs to flow through it. It is finite from the first step
    # on: a device visits its own block first, where each query sees itself; a later block that hides all its keys
    # from a query leaves the max as it was and adds exp(-inf - max) = 0 (no inf - inf, no NaN).
    new_top = jax.lax.stop_gradient(jnp.maximum(top, scores.max(axis=-1)))
    p = jnp.exp(scores - new_top[..., None])
    rescale = jnp.exp(top - new_top)  # the sums so far, moved onto the new max (exp(-inf) = 0 at the first step)
    total = total * rescale + p.sum(axis=-1)
    values = jnp.einsum("bqkgs,bskd->bqkgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return weighted * rescale[..., None] + values, new_top, total


def _ring_forward(q, k, v, positions, segments, causal: bool, axis_name: str):
    """On one device: its queries' attention output and their log-sum-exp of scores [batch, length, kv_heads, groups]
    (float32), after the key blocks of all devices went past."""
    qg = _grouped(q, k.shape[2])
    stats = (jnp.zeros(qg.shape, jnp.float32), jnp.full(qg.shape[:-1], -jnp.inf), jnp.zeros(qg.shape[:-1], jnp.float32))
    visit = lambda block, stats: _accumulate(qg, positions, segments, block, stats, causal)
    weighted, top, total = _round_the_ring(visit, (k, v, positions, segments), _varying(stats, axis_name), axis_name)
    out = weighted / total[..., None]  # total > 0: a query always sees itself, at its own position in its own segment
    return out.reshape(q.shape).astype(q.dtype), top + jnp.log(total)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _ring_attention(q, k, v, positions, segments, causal: bool, axis_name: str):
    """On one device: ring attention of its queries, differentiable (the backward pass goes round the ring again)."""
    return _ring_forward(q, k, v, positions, segments, causal, axis_name)[0]


def _ring_attention_fwd(q, k, v, positions, segments, causal, axis_name):
    out, log_sum_exp = _ring_forward(q, k, v, positions, segments, causal, axis_name)
    return out, (q, k, v, positions, segments, out, log_sum_exp)


def _ring_backward(causal, axis_name, residuals, d_out):
    """The gradients of ring attention, going round the ring again (as flash attention's backward pass goes over
    the blocks again): each device keeps its queries' gradient, while each key block travels with the gradients of
    its keys and values, which the blocks' visits add to, and one last step brings those home.

    Why not autodiff through the forward scan: it keeps every step's residuals, so its memory grows with n. With
    each step rematerialized, those are the K/V block that went past and the float32 running sums: on Llama-3-8B's
    shape at 128k tokens over 8 devices, 16k x (8 KV heads x 128 x 2 bf16 x 2 + 32 heads x 128 x 4 float32 output)
    ~ 320 MiB a step, 2.5 GiB in all for one layer. This pass keeps the device's own q, k, v, output and log-sum-exp,
    whatever n. Measured (benchmarks/context_memory.py: XLA's compiled memory analysis of the gradient, temporaries
    per device, 2048 float32 tokens per device, 8 heads of 64, context = 2, 4, 8): this custom_vjp 668, 668, 668 MiB;
    autodiff with each step rematerialized 680, 696, 729 MiB; autodiff alone 744, 1081, 1753 MiB; all_gather
    1040, 2080, 4160 MiB. (One block's [2048 x 2048 x 8] float32 scores, 128 MiB, is held by every ring variant.)
    """
    q, k, v, positions, segments, out, log_sum_exp = residuals
    kv_heads = k.shape[2]
    qg, d_outg = _grouped(q, kv_heads), _grouped(d_out, kv_heads)
    # Each query's sum of d_out x out: the softmax's own term in the gradient of its scores.
    delta = jnp.sum(d_outg.astype(jnp.float32) * _grouped(out, kv_heads).astype(jnp.float32), axis=-1)
    state = (jnp.zeros(qg.shape, jnp.float32), (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)))

    def visit(block, state):  # the block's gradients, added to, travel on with it
        dq, grads = _accumulate_gradients(qg, d_outg, log_sum_exp, delta, positions, segments, block, *state, causal)
        return dq, _rotate(grads, axis_name)

    # n rotations of the gradients, the last after the last visit: each block's are back on the device it came from.
    block = (k, v, positions, segments)
    dq, (dk, dv) = _round_the_ring(visit, block, _varying(state, axis_name), axis_name)
    return dq.reshape(q.shape).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


def _accumulate_gradients(qg, d_outg, log_sum_exp, delta, q_positions, q_segments, block, dq, grads, causal):
    """One step of the backward pass: the key block's part of dq, added to dq, and of its dk, dv, added to the
    gradients that travel with it."""
    k, v, k_positions, k_segments = block
    dk, dv = grads
    scores = _scores(qg, k, visible(q_positions, k_positions, q_segments, k_segments, causal))
    p = jnp.exp(scores - log_sum_exp[..., None])  # the attention weights, as the forward pass ended with them
    dv = dv + jnp.einsum("bqkgs,bqkgd->bskd", p.astype(d_outg.dtype), d_outg, preferred_element_type=jnp.float32)
    dp = jnp.einsum("bqkgd,bskd->bqkgs", d_outg, v, preferred_element_type=jnp.float32)
    d_scores = p * (dp - delta[..., None]) / math.sqrt(qg.shape[-1])
    dq = dq + jnp.einsum("bqkgs,bskd->bqkgd", d_scores.astype(k.dtype), k, preferred_element_type=jnp.float32)
    dk = dk + jnp.einsum("bqkgs,bqkgd->bskd", d_scores.astype(qg.dtype), qg, preferred_element_type=jnp.float32)
    return dq, (dk, dv)


_ring_attention.defvjp(_ring_attention_fwd, _ring_backward)
