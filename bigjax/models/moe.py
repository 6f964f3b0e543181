"""Mixture of experts: the feed-forward block of a MoE Transformer (Mixtral, DeepSeek, Qwen-MoE), set by
config.model.moe.

Each token's router (a float32 Dense onto the experts) picks its `experts_per_token` (top-k) experts; the token goes
through those experts' SwiGLU (or GELU) MLPs and their outputs are added, weighted by the router's probabilities
(renormalised over the k picked when `norm_topk_probs`). `num_shared_experts` more experts (DeepSeek, Qwen) see
every token: one MLP of that many experts' width, added to the routed output; with `shared_expert_gate` (Qwen2-MoE)
first scaled per token by sigmoid(x . w), w a learned [d, 1] kernel (`shared_gate`).

Dropless (capacity_factor = 0): every pick is computed. The token-expert pairs are sorted by expert, so that each
expert's tokens are consecutive rows, and multiplied by the experts' stacked weights with `jax.lax.ragged_dot` (a
grouped matmul: rows in group e times expert e's matrix), then put back in token order by the inverse permutation.
ragged_dot is XLA's own primitive (on GPU and TPU a grouped GEMM, on CPU a loop over the groups); MaxText's Megablox
and Tokamax kernels are TPU/Pallas-only, so the primitive is the one path that runs everywhere.

Capacity mode (capacity_factor > 0): each expert takes at most ceil(capacity_factor * T * k / E) of a batch's T
tokens; picks beyond that are dropped (their weight is zero: the token keeps its residual and its other picks) and
counted. Priority goes by rank, then by position: every token's first choice before any token's second (GShard).

`dense_reference` runs every expert on every token and masks by the same weights: the tests' ground truth.

The losses, both in float32 over the layer's tokens (padding included: the router sees it), load balancing and
z-loss: see router_stats. Each MoE layer sows the sums they are made of (router_sums; sums, so that a pipeline adds
its micro-batches' into the whole batch's), in the collection "intermediates"; bigjax.tasks.causal_lm averages the
statistics over the layers (model_stats) and adds `router_aux_loss` and `router_z_loss` times them to the loss.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bigjax.models import layers

Dtype = Any
STATS = "moe_stats"  # the name each MoE layer sows its statistics under, in the "intermediates" collection


@dataclasses.dataclass(frozen=True)
class MoeConfig:
    """config.model.moe resolved (hashable, part of GPTConfig); None in GPTConfig when num_experts = 0."""

    num_experts: int
    experts_per_token: int
    expert_mlp_dim: int
    num_shared_experts: int
    first_dense_layers: int
    capacity_factor: float
    router_aux_loss: float
    router_z_loss: float
    norm_topk_probs: bool
    shared_expert_gate: bool = False

    @classmethod
    def from_config(cls, moe, mlp_dim: int) -> MoeConfig | None:
        if not moe.num_experts:
            return None
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in moe.items() if k in fields}
        values["expert_mlp_dim"] = moe.expert_mlp_dim or mlp_dim
        return cls(**values)

    def capacity(self, tokens: int) -> int:
        """The most token picks one expert takes from `tokens` tokens in capacity mode."""
        return math.ceil(self.capacity_factor * tokens * self.experts_per_token / self.num_experts)


# --------------------------------------------------------------------------------------------------
# Routing and its losses: pure functions of float32 router logits [T, E].


def route(logits, k: int, normalize: bool):
    """(probabilities [T, E], the k picked experts' weights [T, k] and indices [T, k]) of router logits [T, E]."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, k)
    if normalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return probs, weights, experts


def within_capacity(experts, num_experts: int, capacity: int):
    """[T, k] booleans: whether each pick fits in its expert's capacity, first choices of all tokens first."""
    by_rank = experts.T.reshape(-1)  # [k * T]: rank 0 of every token, then rank 1, ...
    one_hot = jax.nn.one_hot(by_rank, num_experts, dtype=jnp.int32)
    place = jnp.sum((jnp.cumsum(one_hot, axis=0) - 1) * one_hot, axis=-1)  # the pick's place in its expert's queue
    return (place < capacity).reshape(experts.shape[::-1]).T


# --------------------------------------------------------------------------------------------------
# The experts: weights gate/up [E, d, f], down [E, f, d] (gate only for SwiGLU).


def expert_hidden(kind: str, gate, up):
    return nn.silu(gate) * up if kind == "swiglu" else layers.gelu(kind, up)


def grouped_experts(x, experts, weights, kernels: dict, kind: str, num_experts: int):
    """sum_j weights[t, j] * expert_{experts[t, j]}(x[t]) for x [T, d], by sorting the T*k picks by expert and
    multiplying each expert's run of rows with ragged_dot. A pick whose expert is `num_experts` (dropped) sorts last,
    outside every group: ragged_dot leaves it zero."""
    tokens, k = experts.shape
    picks = experts.reshape(-1)  # pick p = t * k + j
    order = jnp.argsort(picks, stable=True)
    rows = x[order // k]  # [T*k, d], grouped by expert
    sizes = jnp.bincount(picks, length=num_experts).astype(jnp.int32)  # the dropped (== num_experts) are not counted
    up = jax.lax.ragged_dot(rows, kernels["up"], sizes)
    gate = jax.lax.ragged_dot(rows, kernels["gate"], sizes) if kind == "swiglu" else None
    out = jax.lax.ragged_dot(expert_hidden(kind, gate, up), kernels["down"], sizes)
    out = out[jnp.argsort(order)].reshape(tokens, k, -1)  # back in pick order: the inverse permutation
    return jnp.einsum("tkd,tk->td", out, weights.astype(out.dtype))


def dense_reference(x, experts, weights, kernels: dict, kind: str, num_experts: int):
    """What grouped_experts computes, by running every expert on every token and weighting by the picks (zero for
    the experts a token did not pick, and for dropped picks, whose expert is `num_experts`)."""
    mask = jax.nn.one_hot(experts, num_experts, dtype=x.dtype)  # dropped picks: all zeros
    combine = jnp.einsum("tke,tk->te", mask, weights.astype(x.dtype))
    up = jnp.einsum("td,edf->etf", x, kernels["up"])
    gate = jnp.einsum("td,edf->etf", x, kernels["gate"]) if kind == "swiglu" else None
    out = jnp.einsum("etf,efd->etd", expert_hidden(kind, gate, up), kernels["down"])
    return jnp.einsum("etd,te->td", out, combine)


class MoeMlp(nn.Module):
    """The MoE feed-forward block: x [batch, length, d] -> [batch, length, d]. Sows its statistics (see the module
    docstring). `reference=True` computes the routed experts densely (dense_reference), for tests."""

    cfg: MoeConfig
    kind: str  # swiglu | gelu | gelu_exact: each expert's MLP, as model.mlp
    init_std: float
    out_init_std: float
    dtype: Dtype
    param_dtype: Dtype
    reference: bool = False

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        batch, length, d_model = x.shape
        tokens = x.reshape(batch * length, d_model)
        router = nn.Dense(
            c.num_experts,
            use_bias=False,
            dtype=jnp.float32,  # routing decisions and the losses are precision-sensitive: float32 always
            param_dtype=jnp.float32,
            kernel_init=layers.logical(layers.normal(self.init_std), "embed", None),
            name="router",
        )
        logits = router(tokens.astype(jnp.float32))
        probs, weights, experts = route(logits, c.experts_per_token, c.norm_topk_probs)
        routed = experts
        if c.capacity_factor:
            fits = within_capacity(experts, c.num_experts, c.capacity(tokens.shape[0]))
            routed = jnp.where(fits, experts, c.num_experts)  # a dropped pick: an expert that is not there
        stds = self.init_std, self.out_init_std
        kernels = ExpertKernels(c.num_experts, c.expert_mlp_dim, self.kind, *stds, self.param_dtype, name="experts")(
            d_model
        )
        kernels = {name: kernel.astype(self.dtype) for name, kernel in kernels.items()}
        experts_fn = dense_reference if self.reference else grouped_experts
        out = experts_fn(tokens.astype(self.dtype), routed, weights, kernels, self.kind, c.num_experts)
        self.sow("intermediates", STATS, router_sums(logits, probs, experts, routed, c.num_experts))
        out = out.reshape(batch, length, d_model)
        if c.num_shared_experts:
            shared_dim = c.num_shared_experts * c.expert_mlp_dim
            shared = layers.Mlp(self.kind, shared_dim, False, *stds, self.dtype, self.param_dtype, name="shared")(x)
            if c.shared_expert_gate:
                gate = nn.Dense(
                    1,
                    use_bias=False,
                    dtype=self.dtype,
                    param_dtype=self.param_dtype,
                    kernel_init=layers.logical(layers.normal(self.init_std), "embed", None),
                    name="shared_gate",
                )
                shared = nn.sigmoid(gate(x)) * shared
            out = out + shared
        return out.astype(x.dtype)


class ExpertKernels(nn.Module):
    """The routed experts' stacked kernels, in their own scope: `experts/gate` and `experts/up` [E, d, f],
    `experts/down` [E, f, d] (no gate for a GELU MLP); the expert dimension is named `experts`."""

    num_experts: int
    mlp_dim: int
    kind: str
    init_std: float
    out_init_std: float
    param_dtype: Dtype

    @nn.compact
    def __call__(self, d_model: int) -> dict:
        e, f = self.num_experts, self.mlp_dim
        specs = {  # name: (shape, logical names after `experts`, init std)
            "gate": ((e, d_model, f), ("embed", "mlp"), self.init_std),
            "up": ((e, d_model, f), ("embed", "mlp"), self.init_std),
            "down": ((e, f, d_model), ("mlp", "embed"), self.out_init_std),
        }
        wanted = ("gate", "up", "down") if self.kind == "swiglu" else ("up", "down")
        return {
            name: self.param(name, layers.logical(layers.normal(std), "experts", *names), shape, self.param_dtype)
            for name, (shape, names, std) in specs.items()
            if name in wanted
        }


def router_sums(logits, probs, experts, routed, num_experts: int) -> dict:
    """One MoE layer's float32 sums over its tokens, from which its statistics follow (router_stats): sums, so that
    those of the parts of a batch (a pipeline's micro-batches) add up to the whole batch's. For each expert: its picks
    and its router probabilities; the tokens, their squared logsumexps, and the picks dropped."""
    return {
        "tokens": jnp.asarray(logits.shape[0], jnp.float32),
        "picks": jnp.bincount(experts.reshape(-1), length=num_experts).astype(jnp.float32),  # before any drop
        "probs": jnp.sum(probs, axis=0),
        "squared_logsumexp": jnp.sum(jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1) ** 2),
        "dropped": jnp.sum((routed == num_experts).astype(jnp.float32)),
    }


def router_stats(sums) -> dict:
    """The statistics of router_sums (of one layer, or stacked [layers, ...]): its two losses, the fraction of picks
    dropped, and each expert's load (its picks over the mean picks per expert: 1 everywhere is perfect balance).
    * load balancing (Switch Transformer, eq. 4; GShard for top-k): E * sum_e f_e * P_e, where f_e is the fraction of
      tokens that picked expert e among their k (so sum_e f_e = k, as transformers' Mixtral counts) and P_e the mean
      router probability of e. Balanced routing gives k.
    * z-loss (ST-MoE, eq. 5): the mean over tokens of logsumexp(router logits)^2."""
    tokens, picks = sums["tokens"][..., None], sums["picks"]
    num_experts, all_picks = picks.shape[-1], jnp.sum(picks, axis=-1, keepdims=True)  # tokens x k
    return {
        "aux_loss": num_experts * jnp.sum((picks / tokens) * (sums["probs"] / tokens), axis=-1),
        "z_loss": sums["squared_logsumexp"] / sums["tokens"],
        "dropped": sums["dropped"] / all_picks[..., 0],
        "load": picks * num_experts / all_picks,
    }


def model_stats(intermediates) -> dict:
    """The MoE layers' sums sown into `intermediates` (scanned: stacked over layers; unrolled: one per layer) ->
    float32 scalars: the two losses and the dropped fraction averaged over the layers, and the least and most loaded
    expert of any layer (`load_min`, `load_max`; 1 = an even share)."""
    found = []

    def collect(node):
        for key, value in node.items():
            if key == STATS:
                found.extend(value)  # sow keeps a tuple of what was sown
            elif isinstance(value, dict):
                collect(value)

    collect(dict(intermediates))
    if not found:
        raise ValueError("no MoE layer sowed its statistics: was the model applied with mutable=['intermediates']?")
    per_layer = [router_stats(sums) for sums in found]
    flat = lambda key: jnp.concatenate([jnp.reshape(stats[key], (-1,)) for stats in per_layer])
    load = flat("load")
    return {
        "aux_loss": jnp.mean(flat("aux_loss")),
        "z_loss": jnp.mean(flat("z_loss")),
        "dropped": jnp.mean(flat("dropped")),
        "load_min": jnp.min(load),
        "load_max": jnp.max(load),
    }
