"""Pieces shared by every model family: embeddings and the output layer, attention, MLP, norms, rotary positions,
the layer stack (remat and scan), convolutions, the classifier head.

Every parameter is created with logical axis names (`embed`, `heads`, `kv_heads`, `kv`, `mlp`, `vocab`) and
key activations carry `activation_*` names; `bigjax.parallel.mesh` maps both onto the device mesh. No mesh here.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bigjax.config import ConfigError
from bigjax.parallel import context

Dtype = Any


def logical(init, *names):
    """An initializer whose parameter carries logical axis names."""
    return nn.with_logical_partitioning(init, names)


def constrain(x, *names):
    return nn.with_logical_constraint(x, names)


def constrain_hidden(x):
    """The [batch, length, d_model] activations between layers: features whole (the default rules), the layout
    every layer starts from."""
    return constrain(x, "activation_batch", "activation_length", "activation_embed")


def normal(std: float):
    return nn.initializers.normal(stddev=std)


class Norm(nn.Module):
    """LayerNorm (GPT-2) or RMSNorm (Llama); statistics in fp32 whatever the compute dtype.

    `variance` is how LayerNorm computes the variance: "one_pass", E[x^2] - E[x]^2 (Flax's default, one reduction
    fewer), or "two_pass", E[(x - E[x])^2] (torch's: what a BERT or ViT trained in PyTorch saw).
    """

    kind: str
    eps: float
    use_bias: bool
    dtype: Dtype
    param_dtype: Dtype
    variance: str = "one_pass"

    @nn.compact
    def __call__(self, x):
        scale_init = logical(nn.initializers.ones, "embed")
        if self.kind == "rmsnorm":
            norm = nn.RMSNorm(
                epsilon=self.eps, dtype=self.dtype, param_dtype=self.param_dtype, scale_init=scale_init, name="norm"
            )
        else:
            norm = nn.LayerNorm(
                epsilon=self.eps,
                use_bias=self.use_bias,
                use_fast_variance=self.variance == "one_pass",
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                scale_init=scale_init,
                bias_init=logical(nn.initializers.zeros, "embed"),
                name="norm",
            )
        return norm(x)


class FloatDense(nn.Dense):
    """nn.Dense whose matmul stays float when the model is quantized or given LoRA adapters: an output layer or a
    head, whose errors go straight into the logits (bigjax.compress.quantized reads `keeps_float`, whatever the
    layer is called)."""

    keeps_float = True


class FloatEmbed(nn.Embed):
    """nn.Embed kept float under quantization: a table lookup, not a matmul, and (tied) the output layer."""

    keeps_float = True


class Embedder(nn.Module):
    """Token embeddings plus learned positions and token types (each optional), and the output layer onto the
    vocabulary: the token embedding itself (tied) or a Dense of its own. GPT and BERT share it, so a classifier
    built on either loads a pretrained model's embeddings by path (init_from).

    Its parameters sit in its caller's scope, under the names GPT and BERT have always given them (`embed`,
    `position_embed`, `token_type_embed`, `unembed`), not under a name of its own: checkpoints keep their paths.
    """

    vocab_size: int
    d_model: int
    num_positions: int  # rows of the learned position table; 0 = none (rotary, or no positions)
    type_vocab_size: int  # token types (BERT's sentence A/B); 0 = none
    tie: bool
    init_std: float
    dtype: Dtype
    param_dtype: Dtype

    def setup(self):
        nn.share_scope(self.parent, self)  # first, so that the tables below are created in the caller's scope
        self.embed = self._table(self.vocab_size, "vocab")
        if self.num_positions:
            self.position_embed = self._table(self.num_positions, "positions")
        if self.type_vocab_size:
            self.token_type_embed = self._table(self.type_vocab_size, None)
        if not self.tie:
            self.unembed = FloatDense(
                self.vocab_size,
                use_bias=False,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                kernel_init=logical(normal(self.init_std), "embed", "vocab"),
            )

    def _table(self, rows: int, row_name: str | None) -> nn.Embed:
        init = logical(normal(self.init_std), row_name, "embed")
        return FloatEmbed(rows, self.d_model, dtype=self.dtype, param_dtype=self.param_dtype, embedding_init=init)

    def __call__(self, tokens, positions, token_types=None):
        x = self.embed(tokens)
        if self.num_positions:
            x = x + self.position_embed(positions)
        if self.type_vocab_size:
            x = x + self.token_type_embed(jnp.zeros_like(tokens) if token_types is None else token_types)
        return x

    def attend(self, x):
        """Logits [..., vocab] of hidden states x [..., d_model], in the compute dtype."""
        return self.embed.attend(x) if self.tie else self.unembed(x)

    def output_kernel(self):
        """The [d_model, vocab] kernel `attend` multiplies by, for a loss that takes the vocabulary a piece at a time.
        Reads the parameters without calling the layer: apply only."""
        return self.embed.embedding.T if self.tie else self.get_variable("params", "unembed")["kernel"]


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """How the rotary frequencies are stretched for contexts longer than the model was pretrained on
    (config.model.rope_scaling; bigjax.families.rope_scaling says what each field means)."""

    type: str  # none | linear | llama3 | yarn
    factor: float
    original_max_len: int
    low_freq_factor: float
    high_freq_factor: float
    beta_fast: float
    beta_slow: float
    attention_factor: float  # yarn; 0 = 0.1 ln(factor) + 1


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None):
    """(inverse frequencies [head_dim // 2] float32, the factor on cos and sin) of the rotary embedding: pair i turns
    by position * theta^(-2i/head_dim), stretched as `scaling` says. The same float32 arithmetic as transformers'
    rope initializers (modeling_rope_utils), so that an imported model turns its pairs by the same angles. A function
    of the config alone: inside jit, XLA folds it into a constant."""
    half = head_dim // 2
    powers = theta ** (jnp.arange(half, dtype=jnp.float32) / half)
    kind = "none" if scaling is None else scaling.type
    if kind == "none":
        return 1.0 / powers, 1.0
    if kind == "linear":  # positions divided by factor, as every frequency is
        return (1.0 / powers) / scaling.factor, 1.0
    if kind == "llama3":
        return llama3_frequencies(1.0 / powers, scaling), 1.0
    if kind == "yarn":
        return yarn_frequencies(powers, head_dim, theta, scaling), yarn_attention_factor(scaling)
    raise ConfigError(f"config.model.rope_scaling.type={kind!r} is not one of none, linear, llama3, yarn")


def llama3_frequencies(inv_freq, s: RopeScaling):
    """Llama 3.1's scaling: wavelengths shorter than original_max_len / high_freq_factor keep their frequency, those
    longer than original_max_len / low_freq_factor are divided by factor, and those between move smoothly from one
    to the other."""
    wavelength = 2 * jnp.pi / inv_freq
    stretched = jnp.where(wavelength > s.original_max_len / s.low_freq_factor, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_len / wavelength - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * stretched / s.factor + smooth * stretched
    between = (wavelength >= s.original_max_len / s.high_freq_factor) & (
        wavelength <= s.original_max_len / s.low_freq_factor
    )
    return jnp.where(between, smoothed, stretched)


def yarn_frequencies(powers, head_dim: int, theta: float, s: RopeScaling):
    """YaRN (Peng et al. 2023): pairs that turn more than beta_fast times within original_max_len keep their
    frequency (extrapolation), those that turn fewer than beta_slow times are divided by factor (interpolation),
    and a linear ramp over the pairs between mixes the two."""

    def pair_turning(turns: float) -> float:  # the pair index that turns `turns` times within original_max_len
        return head_dim * math.log(s.original_max_len / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(pair_turning(s.beta_fast)), 0)
    high = min(math.ceil(pair_turning(s.beta_slow)), head_dim - 1)
    if low == high:
        high += 0.001  # no ramp of width zero
    ramp = jnp.clip((jnp.arange(head_dim // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # the weight of the unscaled frequency
    return (1.0 / (s.factor * powers)) * (1 - keep) + (1.0 / powers) * keep


def yarn_attention_factor(s: RopeScaling) -> float:
    """YaRN scales cos and sin (so the attention logits by its square) by 0.1 ln(factor) + 1, unless set explicitly."""
    return s.attention_factor or 0.1 * math.log(s.factor) + 1.0


def rotary(x, positions, frequencies):
    """Rotary position embedding of x: [batch, length, heads, head_dim] at integer `positions`: [batch, length], with
    `frequencies` = rope_frequencies(head_dim, theta, scaling)."""
    inv_freq, cos_sin_factor = frequencies
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [b, t, half]
    sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
    if cos_sin_factor != 1.0:
        sin, cos = sin * cos_sin_factor, cos * cos_sin_factor
    first, second = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return rotated.astype(x.dtype)


class Attention(nn.Module):
    """Self-attention with grouped-query heads, through jax.nn.dot_product_attention: causal (GPT) or
    bidirectional (BERT, ViT), and confined to each token's own segment when `segment_ids` are given, so that
    examples packed into one row never see each other.

    Written with nn.Einsum rather than nn.MultiHeadDotProductAttention: the latter flattens 3-D kernels and
    loses their logical axis names under a mesh.

    `decode=True` is the causal model with a KV cache (bigjax.generate): each call writes its keys and values
    into the "cache" collection at the columns its `positions` name (column = position), and its queries attend
    to the cache's columns up to their own position. The cache is sized by `model.init` in decode mode, from the
    keys of that call: [batch, columns, kv_heads, head_dim]. Keys are cached after the rotary embedding.

    Where the rules and the mesh split the sequence (`activation_length`) over devices, `context_parallel` says how
    each device's queries see the keys of the whole sequence: "all_gather" or "ring" (bigjax.parallel.context);
    "" never splits attention's sequence (the other families, which refuse a split sequence).
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    use_bias: bool  # biases on every projection, unless qkv_bias / out_bias say otherwise
    rope_theta: float | None  # None = no rotary (learned absolute positions are added elsewhere)
    implementation: str | None  # "xla", "cudnn" (see resolve_attention), or None to let JAX choose
    init_std: float
    out_init_std: float
    dtype: Dtype
    param_dtype: Dtype
    causal: bool = True
    decode: bool = False
    qkv_bias: bool | None = None  # biases on the query, key and value projections; None = use_bias
    out_bias: bool | None = None  # a bias on the output projection; None = use_bias
    rope_scaling: RopeScaling | None = None  # None = the plain rotary embedding
    context_parallel: str = ""  # all_gather | ring | "" (see above)
    # Under quantization its own products (q.k and the weighted sum of v: activations against activations) stay float;
    # its projections are Einsum layers of their own, quantized (bigjax.compress.quantized).
    keeps_float = True

    def _project(self, x, heads: int, head_names: str, name: str):
        return nn.Einsum(
            shape=(x.shape[-1], heads, self.head_dim),
            einsum_str="btd,dnh->btnh",
            use_bias=self.use_bias if self.qkv_bias is None else self.qkv_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=logical(normal(self.init_std), "embed", head_names, "kv"),
            bias_init=logical(nn.initializers.zeros, head_names, "kv"),
            name=name,
        )(x)

    @nn.compact
    def __call__(self, x, positions, segment_ids=None):
        q = self._project(x, self.num_heads, "heads", "query")
        k = self._project(x, self.num_kv_heads, "kv_heads", "key")
        v = self._project(x, self.num_kv_heads, "kv_heads", "value")
        if self.rope_theta is not None:
            frequencies = rope_frequencies(self.head_dim, self.rope_theta, self.rope_scaling)
            q, k = rotary(q, positions, frequencies), rotary(k, positions, frequencies)
        q = constrain(q, "activation_batch", "activation_length", "activation_heads", None)
        k = constrain(k, "activation_batch", "activation_length", "activation_kv_heads", None)
        v = constrain(v, "activation_batch", "activation_length", "activation_kv_heads", None)
        split_over = None if self.decode or not self.context_parallel else context.sequence_axis()
        strategy = self.context_parallel if split_over else ""
        mask = mask_beyond_causal(
            decode=self.decode, strategy=strategy, causal=self.causal, packed=segment_ids is not None
        )
        implementation, reason = attention_kernel(self.implementation, mask)
        if reason:
            log_once(reason)
        if split_over:
            out = context.context_attention(
                q,
                k,
                v,
                positions,
                segment_ids,
                causal=self.causal,
                strategy=self.context_parallel,
                axis_name=split_over,
                implementation=implementation,
            )
        else:
            if self.decode:
                k, v = self._through_cache(k, v, positions)
                mask, causal = visible_in_cache(positions, k.shape[1]), False
            else:
                mask, causal = None if segment_ids is None else same_segment_mask(segment_ids), self.causal
            out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, implementation=implementation)
        out = constrain(out, "activation_batch", "activation_length", "activation_heads", None)
        return nn.Einsum(
            shape=(self.num_heads, self.head_dim, x.shape[-1]),
            einsum_str="btnh,nhd->btd",
            use_bias=self.use_bias if self.out_bias is None else self.out_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=logical(normal(self.out_init_std), "heads", "kv", "embed"),
            bias_init=logical(nn.initializers.zeros, "embed"),
            name="out",
        )(out)

    def _through_cache(self, k, v, positions):
        """This call's keys and values written into the layer's cache at their positions; returns the whole cache.

        A row's tokens in one call are consecutive, so each row writes one slice, from its first position: a
        prefill writes columns 0.. of every row, a decode step one column per row, each at its own length.
        """
        sizing = not self.has_variable("cache", "cached_key")  # model.init in decode mode: create the cache, empty
        cached_k = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
        cached_v = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
        if sizing:
            return k, v
        write = jax.vmap(lambda cache, new, start: jax.lax.dynamic_update_slice_in_dim(cache, new, start, axis=0))
        cached_k.value = write(cached_k.value, k, positions[:, 0])
        cached_v.value = write(cached_v.value, v, positions[:, 0])
        return cached_k.value, cached_v.value


def resolve_attention(choice: str, dtype: str, device_kind: str | None = None) -> str:
    """The attention implementation `model.attention` names: "auto" -> cuDNN flash attention on an NVIDIA GPU with
    16-bit compute, XLA's attention elsewhere; "cudnn" where it cannot run is an error. `device_kind` (bigjax plan)
    asks about a device that may not be here; by default, this process's backend."""
    if device_kind is None:
        on_gpu, where = jax.default_backend() == "gpu", f"the backend is {jax.default_backend()}"
    else:
        on_gpu, where = "nvidia" in device_kind.lower(), f"the device is {device_kind}"
    sixteen_bit = dtype in ("bfloat16", "float16")
    if choice == "auto":
        return "cudnn" if on_gpu and sixteen_bit else "xla"
    if choice == "cudnn" and not on_gpu:
        raise ConfigError(f"config.model.attention='cudnn' needs a GPU, but {where}; use 'auto' or 'xla'")
    if choice == "cudnn" and not sixteen_bit:
        raise ConfigError("cuDNN attention needs config.model.dtype='bfloat16' (or float16); use 'auto' or 'xla'")
    return choice


def mask_beyond_causal(*, decode: bool, strategy: str, causal: bool, packed: bool) -> str | None:
    """What an attention call must hide from its queries beyond jax.nn.dot_product_attention's own causal triangle
    (`is_causal`, by place), in words; None where nothing is. `strategy` is the context-parallel strategy of a split
    sequence ("" where it is whole): all_gather masks by the tokens' positions (they may be in zig-zag order, and a
    device's queries are a slice of the sequence) and segments; the ring masks its blocks itself and calls no kernel."""
    if decode:
        return "the KV cache's filled columns (generation)"
    if strategy == "ring":
        return None
    if strategy == "all_gather" and (causal or packed):
        return "positions and segments across context shards"
    return "packed segments" if packed else None


def attention_kernel(implementation: str | None, mask: str | None) -> tuple[str | None, str | None]:
    """(the kernel one attention call runs, why it is not `implementation` or None): `implementation` (what
    resolve_attention chose), except cuDNN's for a call that needs `mask` (mask_beyond_causal's words).

    cuDNN's flash kernel masks by causality and sequence lengths only. jax.nn.dot_product_attention (jax 0.10) hands it
    any other mask as a dense additive bias [batch, 1, queries, keys], and returns that bias's gradient as large: not
    the flash kernel's memory, and a path no test of bigjax has run on a GPU (MaxText's cuDNN path once dropped the
    segments of packed rows). XLA's attention applies the mask as the CPU suite proves it, at the cost of its float32
    scores (bigjax plan counts them), so such calls run there and the mask is never dropped.
    """
    if implementation == "cudnn" and mask:
        return "xla", (
            f"config.model.attention is cuDNN's flash kernel, which cannot take the mask of {mask}: that attention "
            "runs on XLA's kernel instead (it keeps float32 scores: more memory)"
        )
    return implementation, None


@functools.cache
def log_once(message: str) -> None:
    """`message` in the log (a run's WORKDIR/logs/) the first time this process says it: attention is traced once
    per layer and per compile, and the choice it reports is the same each time."""
    logging.getLogger(__name__).warning(message)


def visible_in_cache(positions, columns: int):
    """[batch, 1, length, columns] booleans: a query at position p sees the cache's columns 0..p.

    Columns past p hold nothing yet, or padding that the row overwrites with its own tokens before it gets there.
    """
    return positions[:, None, :, None] >= jnp.arange(columns)[None, None, None, :]


def same_segment_mask(segment_ids):
    """[batch, 1, length, length] booleans: query i may attend to key j iff both are in the same segment.

    Padding (segment 0) attends to padding only, so no row of the attention matrix is empty (no NaN).
    """
    return segment_ids[:, None, :, None] == segment_ids[:, None, None, :]


def pool_segments(x, segment_ids, positions, num_segments: int, token: str):
    """One vector per packed example: [batch, length, d] -> [batch, num_segments, d].

    `token` picks which token of segment k represents it: "first" (BERT's cls token, position 0) or "last"
    (a causal model, whose last token has seen the whole example). A one-hot matmul rather than a gather:
    exact, and it shards like any matmul. Segments a row does not have come out as zeros.
    """
    if token == "first":
        picked = positions == 0
    else:  # the next token starts another segment, or the row ends
        next_segment = jnp.pad(segment_ids[:, 1:], ((0, 0), (0, 1)))
        picked = segment_ids != next_segment
    ids = jnp.arange(1, num_segments + 1)
    select = (segment_ids[:, None, :] == ids[None, :, None]) & picked[:, None, :]  # [batch, segments, length]
    return jnp.einsum("bst,btd->bsd", select.astype(x.dtype), x)


def gelu(kind: str, x):
    """The GELU of `model.mlp`: "gelu_exact" is the erf form (transformers' "gelu": BERT, ViT); any other kind the
    tanh approximation (GPT-2's "gelu_new", bigjax's default)."""
    return nn.gelu(x, approximate=kind != "gelu_exact")


class Mlp(nn.Module):
    """GELU MLP (GPT-2: tanh GELU; BERT, ViT: exact GELU) or SwiGLU (Llama)."""

    kind: str
    hidden_dim: int
    use_bias: bool
    init_std: float
    out_init_std: float
    dtype: Dtype
    param_dtype: Dtype

    def _dense(self, x, features, names, std, name):
        return nn.Dense(
            features,
            use_bias=self.use_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=logical(normal(std), *names),
            bias_init=logical(nn.initializers.zeros, names[-1]),
            name=name,
        )(x)

    @nn.compact
    def __call__(self, x):
        d_model = x.shape[-1]
        up = self._dense(x, self.hidden_dim, ("embed", "mlp"), self.init_std, "up")
        if self.kind == "swiglu":
            gate = self._dense(x, self.hidden_dim, ("embed", "mlp"), self.init_std, "gate")
            hidden = nn.silu(gate) * up
        else:
            hidden = gelu(self.kind, up)
        hidden = constrain(hidden, "activation_batch", "activation_length", "activation_mlp")
        return self._dense(hidden, d_model, ("mlp", "embed"), self.out_init_std, "down")


REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the whole block
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat_and_scan(block, remat: str, length: int = 0):
    """The module class `block`, whose call returns (x, None), rematerialized by policy (`remat`: "none" or a key of
    REMAT_POLICIES) and, with a `length`, scanned: `length` layers compiled once, each variable (parameters, a KV
    cache, BatchNorm statistics) stacked along a leading `layers` axis. The scanned layers all get the same
    arguments after x (positions, masks)."""
    if remat != "none":
        # prevent_cse only matters outside scan, where XLA could otherwise undo the rematerialization.
        block = nn.remat(block, policy=REMAT_POLICIES[remat], prevent_cse=not length)
    if not length:
        return block
    return nn.scan(
        block,
        # "intermediates": what a layer sows (a MoE layer's statistics), stacked over the layers like its weights.
        variable_axes={"params": 0, "cache": 0, "batch_stats": 0, "intermediates": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=nn.broadcast,
        length=length,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )


# --------------------------------------------------------------------------------------------------
# Convolutions and the norms that follow them (ResNet, the CNN, ViT's patch embedding).
#
# A conv kernel is [height, width, in_channels, out_channels]. The spatial dims are never split; the channel dims
# are named `conv_in` and `conv_out`. The default rules split kernels over fsdp by their output channels and keep
# activations' channels whole (`activation_conv`): convolutions run data-parallel over the batch, and FSDP gathers
# each kernel just before use. Per-channel vectors (conv biases, norm scales and biases, BatchNorm statistics) take
# `conv_out`, so they split like the channels they describe.
#
# Why not also split in-channels over another axis, as Dense kernels do (embed -> fsdp, mlp -> tensor)? With
# kernels split over fsdp and tensor at once, XLA's SPMD partitioner (jax 0.10, CPU) returns wrong gradients for
# a strided convolution followed by another one (the mesh-equivalence test in tests/test_vision.py found it). One
# mesh axis per kernel is both correct and all that data-parallel convolutional nets need.


LECUN_NORMAL = nn.initializers.lecun_normal()  # Flax's default for convolutions


def conv(
    features: int,
    kernel_size: int,
    *,
    strides: int = 1,
    padding: str = "SAME",
    use_bias: bool = False,
    init=LECUN_NORMAL,
    in_name: str | None = "conv_in",
    dtype: Dtype,
    param_dtype: Dtype,
    name: str,
) -> nn.Conv:
    """A square 2-D convolution with logical names on its kernel (`in_name=None` for a stem that sees 1 or 3
    image channels, which no mesh axis divides)."""
    return nn.Conv(
        features,
        (kernel_size, kernel_size),
        strides=(strides, strides),
        padding=padding,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=logical(init, None, None, in_name, "conv_out"),
        bias_init=logical(nn.initializers.zeros, "conv_out"),
        name=name,
    )


class BatchNorm(nn.BatchNorm):
    """nn.BatchNorm whose running mean and variance carry the channels' logical name, so that they are sharded
    and checkpointed like the scale and bias beside them (Flax creates them without names, i.e. replicated).

    No `axis_name` is needed: under jit the batch is one global array split over data x fsdp, so the mean and
    variance computed here are those of the whole global batch (XLA inserts the cross-device reduction), and
    every device updates the running statistics with the same values.
    """

    def variable(self, col, name, init_fn=None, *init_args, **init_kwargs):
        if col == "batch_stats":
            init_fn = logical(init_fn, "conv_out")
        return super().variable(col, name, init_fn, *init_args, **init_kwargs)


def channel_norm(
    kind: str,
    train: bool,
    *,
    groups: int,
    momentum: float,
    eps: float,
    dtype: Dtype,
    param_dtype: Dtype,
    zero_init: bool = False,
    name: str,
):
    """The norm after a convolution, as a module to call on x: "batchnorm" (batch statistics in training, the
    running averages in eval), "groupnorm" (no batch statistics at all), or "none" (the identity).

    `zero_init` starts the scale at 0: the last norm of a residual branch, so that every block begins as the
    identity (Goyal et al., "Accurate, Large Minibatch SGD").
    """
    scale = nn.initializers.zeros if zero_init else nn.initializers.ones
    common = dict(
        epsilon=eps,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=logical(scale, "conv_out"),
        bias_init=logical(nn.initializers.zeros, "conv_out"),
        name=name,
    )
    if kind == "batchnorm":
        return BatchNorm(use_running_average=not train, momentum=momentum, **common)
    if kind == "groupnorm":
        return nn.GroupNorm(num_groups=groups, **common)
    return lambda x: x


def classifier_head(x, num_classes: int, *, in_name: str, dtype: Dtype, param_dtype: Dtype, name: str = "head"):
    """fp32 class logits from a new Dense initialized to zero (big_vision's default): training starts from the
    uniform prediction, and a new head on a fine-tuned backbone starts without noise. `in_name` is the logical name
    of x's features. Called inside a compact method."""
    head = FloatDense(
        num_classes,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=logical(nn.initializers.zeros, in_name, "classes"),
        bias_init=logical(nn.initializers.zeros, "classes"),
        name=name,
    )
    return head(x).astype(jnp.float32)
