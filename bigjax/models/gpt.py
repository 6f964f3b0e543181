"""Decoder-only Transformer: GPT-2 (learned positions, LayerNorm, GELU) and Llama (RoPE, RMSNorm, SwiGLU,
grouped-query attention; scaled RoPE, Qwen2's q/k/v-only biases) are the same module with different config values.

    model = GPT(GPTConfig.from_config(config.model))
    variables = model.init(rng, tokens)            # tokens: int32 [batch, length]
    logits = model.apply(variables, tokens)         # float32 [batch, length, padded_vocab]

`decoding_model(cfg)` is the same model, with the same parameters, running on a KV cache (bigjax.generate).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from bigjax import config as config_lib
from bigjax.models import layers, moe
from bigjax.parallel import pipeline as pipeline_lib


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """The resolved, hashable model config (zeros in the experiment config mean "derive it")."""

    vocab_size: int  # padded
    max_len: int
    num_layers: int
    d_model: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    positions: str
    rope_theta: float
    rope_scaling: layers.RopeScaling
    norm: str
    norm_eps: float
    norm_variance: str
    mlp: str
    use_bias: bool  # the norms' biases (the projections' are the three below)
    qkv_bias: bool
    out_bias: bool
    mlp_bias: bool
    tie_embeddings: bool
    dropout: float
    dtype: str
    param_dtype: str
    attention: str
    context_parallel: str  # all_gather | ring where the mesh splits the sequence; "" = never (ViT)
    scan_layers: bool
    remat: str
    init_std: float
    pipeline: pipeline_lib.PipelineConfig  # how the layers run where config.mesh.stage > 1
    moe: moe.MoeConfig | None  # None: every layer's MLP is dense

    @classmethod
    def from_config(cls, m) -> GPTConfig:
        head_dim = m.head_dim or m.d_model // m.num_heads
        if m.mlp_dim:
            mlp_dim = m.mlp_dim
        elif m.mlp == "swiglu":  # Llama: 2/3 of 4*d keeps the parameter count of a GELU MLP
            mlp_dim = round_up(int(8 * m.d_model / 3), 256)
        else:
            mlp_dim = 4 * m.d_model
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in m.items() if k in fields}
        qkv_bias, out_bias, mlp_bias = config_lib.linear_biases(m)
        values.update(
            vocab_size=round_up(m.vocab_size, m.vocab_multiple),
            num_kv_heads=m.num_kv_heads or m.num_heads,
            head_dim=head_dim,
            mlp_dim=mlp_dim,
            rope_scaling=layers.RopeScaling(**m.rope_scaling),
            qkv_bias=qkv_bias,
            out_bias=out_bias,
            mlp_bias=mlp_bias,
            context_parallel=m.get("context_parallel", ""),
            pipeline=pipeline_lib.PipelineConfig(**m.get("pipeline", {})),
            moe=moe.MoeConfig.from_config(m.moe, mlp_dim) if "moe" in m else None,
        )
        values["attention"] = layers.resolve_attention(m.attention, m.dtype)
        return cls(**values)


def norm(c: GPTConfig, name: str) -> layers.Norm:
    """The LayerNorm or RMSNorm of c, as every norm of the family (blocks, final, BERT's embedding and head) is."""
    dtype, param_dtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
    return layers.Norm(c.norm, c.norm_eps, c.use_bias, dtype, param_dtype, variance=c.norm_variance, name=name)


def embedder(c: GPTConfig, type_vocab_size: int = 0) -> layers.Embedder:
    """The token (and position, and token-type) embeddings and the output layer of c's model."""
    return layers.Embedder(
        vocab_size=c.vocab_size,
        d_model=c.d_model,
        num_positions=c.max_len if c.positions == "learned" else 0,
        type_vocab_size=type_vocab_size,
        tie=c.tie_embeddings,
        init_std=c.init_std,
        dtype=jnp.dtype(c.dtype),
        param_dtype=jnp.dtype(c.param_dtype),
        name="embedder",
    )


class Block(nn.Module):
    """Residual attention + MLP block. Returns (x, None) so that nn.scan can stack it.

    Pre-norm (GPT-2, Llama, modern encoders) normalizes each sublayer's input; post-norm (the original
    Transformer and BERT) normalizes after each residual sum. `causal=False` is the bidirectional encoder;
    `decode=True` attends through a KV cache (layers.Attention).
    """

    cfg: GPTConfig
    train: bool
    causal: bool = True
    post_norm: bool = False
    decode: bool = False
    sparse: bool = False  # a mixture of experts (cfg.moe) in place of the MLP

    @nn.compact
    def __call__(self, x, positions, segment_ids):
        c = self.cfg
        dtype, param_dtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        # GPT-2's scaled init of the projections back into the residual stream.
        out_std = c.init_std / (2 * c.num_layers) ** 0.5
        dropout = nn.Dropout(c.dropout, deterministic=not self.train)

        attention = layers.Attention(
            num_heads=c.num_heads,
            num_kv_heads=c.num_kv_heads,
            head_dim=c.head_dim,
            use_bias=c.use_bias,
            qkv_bias=c.qkv_bias,
            out_bias=c.out_bias,
            rope_theta=c.rope_theta if c.positions == "rope" else None,
            rope_scaling=c.rope_scaling,
            implementation=c.attention,
            context_parallel=c.context_parallel,
            init_std=c.init_std,
            out_init_std=out_std,
            dtype=dtype,
            param_dtype=param_dtype,
            causal=self.causal,
            decode=self.decode,
            name="attention",
        )
        if self.sparse:
            mlp = moe.MoeMlp(c.moe, c.mlp, c.init_std, out_std, dtype, param_dtype, name="mlp")
        else:
            mlp = layers.Mlp(c.mlp, c.mlp_dim, c.mlp_bias, c.init_std, out_std, dtype, param_dtype, name="mlp")
        if self.post_norm:
            x = norm(c, "attention_norm")(x + dropout(attention(x, positions, segment_ids)))
            x = layers.constrain_hidden(x)
            x = norm(c, "mlp_norm")(x + dropout(mlp(x)))
        else:
            x = x + dropout(attention(norm(c, "attention_norm")(x), positions, segment_ids))
            x = layers.constrain_hidden(x)
            x = x + dropout(mlp(norm(c, "mlp_norm")(x)))
        return layers.constrain_hidden(x), None


def run_blocks(cfg: GPTConfig, x, positions, segment_ids, train: bool, *, causal=True, post_norm=False, decode=False):
    """The stack of blocks, scanned (one compiled layer; weights and a KV cache stacked over layers) or unrolled,
    rematerialized by cfg.remat; called from inside a module's compact method. Where config.mesh.stage > 1, the
    scanned stack runs as a pipeline (run_pipelined): with cfg.moe each of the two stacks, one after the other.

    With cfg.moe, the first `first_dense_layers` blocks keep a dense MLP and the rest are MoE blocks: scanned, two
    stacks, `dense_layers` and `moe_layers`; unrolled, `layers_{i}` numbered through both."""
    for name, start, stop, sparse in layer_stacks(cfg.num_layers, cfg.moe.first_dense_layers if cfg.moe else None):
        blocks = layers.remat_and_scan(Block, cfg.remat, stop - start if cfg.scan_layers else 0)
        if cfg.scan_layers:
            stack = blocks(cfg, train, causal, post_norm, decode, sparse, name=name)
            if pipeline_lib.stage_count() > 1 and not decode and not stack.is_initializing():
                x = run_pipelined(stack, cfg, x, positions, segment_ids, train, causal, post_norm, sparse)
            else:
                x = stack(x, positions, segment_ids)[0]
            continue
        for i in range(start, stop):
            x, _ = blocks(cfg, train, causal, post_norm, decode, sparse, name=f"layers_{i}")(x, positions, segment_ids)
    return x


def layer_stacks(num_layers: int, first_dense_layers: int | None) -> list[tuple[str, int, int, bool]]:
    """The stacks the layers are scanned in, as (name, first layer, end, MoE or not), empty ones left out: one stack
    `layers` without MoE (first_dense_layers None), else `dense_layers` then `moe_layers`."""
    if first_dense_layers is None:
        stacks = [("layers", 0, num_layers, False)]
    else:
        stacks = [("dense_layers", 0, first_dense_layers, False), ("moe_layers", first_dense_layers, num_layers, True)]
    return [stack for stack in stacks if stack[2] > stack[1]]


def run_pipelined(stack, cfg: GPTConfig, x, positions, segment_ids, train: bool, causal: bool, post_norm: bool, sparse):
    """The scanned `stack` of blocks run as a pipeline over the mesh axis `stage` (bigjax.parallel.pipeline). Its
    weights [layers, ...] are read as they are, so that the parameters (and the checkpoint) are the unpipelined
    model's; each stage applies its groups of layers with the same scanned block, each block rematerialized by
    cfg.remat. (Rematerializing whole iterations instead keeps less between them, but a whole group's activations
    while one is rebuilt: more in all, by benchmarks/pipeline_memory.py.) What the blocks sow (a MoE layer's router
    sums) is added over the micro-batches and sown where the unpipelined stack sows it, [layers, ...]: the whole
    batch's, so that the router losses are those of the model on the whole batch."""
    stages, p = pipeline_lib.stage_count(), cfg.pipeline
    repeats = p.repeats if p.schedule == "circular" else 1
    weights = stack.variables["params"]
    group = layers.remat_and_scan(Block, cfg.remat, jax.tree.leaves(weights)[0].shape[0] // (stages * repeats))
    group = group(cfg, train, causal, post_norm, sparse=sparse, parent=None)
    dropout = stack.make_rng("dropout") if train and cfg.dropout else None

    def run_group(weights, x, slot, positions, segment_ids):
        rngs = {} if dropout is None else {"dropout": jax.random.fold_in(dropout, slot)}  # a mask per stage and step
        (y, _), sown = group.apply({"params": weights}, x, positions, segment_ids, rngs=rngs, mutable=["intermediates"])
        return y, sown.get("intermediates", {})

    extras = (positions, segment_ids)
    microbatches = p.microbatches or stages
    x, sown = pipeline_lib.pipeline(run_group, weights, x, extras, microbatches=microbatches, repeats=repeats)
    if stack.is_mutable_collection("intermediates"):
        for name, value in sown.items():
            stack.put_variable("intermediates", name, value)
    return x


class GPT(nn.Module):
    """The causal language model: tokens -> next-token logits.

    With `decode=True` (see decoding_model) every call reads and extends the KV cache in the "cache" collection:
    `apply({"params": p, "cache": c}, tokens, positions=..., mutable=["cache"])`, where `positions` [batch,
    length] are the tokens' positions in their rows, which are also their columns in the cache.
    """

    cfg: GPTConfig
    decode: bool = False

    def hidden_states(self, tokens, positions, segment_ids, train: bool):
        """The final-normed hidden states [batch, length, d] and the Embedder (whose `attend` is the output layer).

        Shared with GPTClassifier, so that a classifier's backbone parameters have the language model's paths.
        """
        c = self.cfg
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        embed = embedder(c)
        x = nn.Dropout(c.dropout, deterministic=not train)(embed(tokens, positions))
        x = run_blocks(c, layers.constrain_hidden(x), positions, segment_ids, train, decode=self.decode)
        return norm(c, "final_norm")(x), embed

    @nn.compact
    def __call__(self, tokens, train: bool = False, positions=None, last_token=None):
        """Logits [batch, length, vocab]; with `last_token` ([batch] index of each row's last real token), the
        next-token logits there alone, [batch, 1, vocab]: a prefill needs no others."""
        x, embed = self.hidden_states(tokens, positions, None, train)
        if last_token is not None:
            x = jnp.take_along_axis(x, last_token[:, None, None], axis=1)
        logits = layers.constrain(embed.attend(x), "activation_batch", "activation_length", "activation_vocab")
        return logits.astype(jnp.float32)


def decoding_model(cfg: GPTConfig) -> GPT:
    """The model of `cfg` running on a KV cache: the same parameters, without remat (nothing is differentiated)
    and with XLA's attention (a decode step has one query per row, and its mask is the cache's, not causal)."""
    return GPT(dataclasses.replace(cfg, remat="none", attention="xla", dropout=0.0), decode=True)


class GPTClassifier(GPT):
    """The GPT backbone classifying each example packed into a row: attention stays inside each example
    (causal and segment-masked), and the last token of each example, which has seen all of it, feeds a new
    linear head. Backbone parameters have the language model's names, so `init_from` loads them by path.

        logits = model.apply(variables, tokens, segment_ids, positions)   # [batch, max_segments, num_classes]
    """

    num_classes: int = 2
    max_segments: int = 1

    @nn.compact
    def __call__(self, tokens, segment_ids, positions, train: bool = False):
        c = self.cfg
        x, _ = self.hidden_states(tokens, positions, segment_ids, train)
        pooled = layers.pool_segments(x, segment_ids, positions, self.max_segments, token="last")
        pooled = nn.Dropout(c.dropout, deterministic=not train)(pooled)
        return text_classifier_head(c, pooled, self.num_classes)


def text_classifier_head(c: GPTConfig, x, num_classes: int):
    """The text families' head (GPT's, BERT's): fp32 logits from `embed` features, its parameters `classifier`."""
    return layers.classifier_head(
        x,
        num_classes,
        in_name="embed",
        dtype=jnp.dtype(c.dtype),
        param_dtype=jnp.dtype(c.param_dtype),
        name="classifier",
    )


def make_classifier(model_config, num_classes: int, max_segments: int = 1) -> GPTClassifier:
    """The classification task's constructor for this family (see bigjax.tasks.classification)."""
    return GPTClassifier(GPTConfig.from_config(model_config), num_classes=num_classes, max_segments=max_segments)


class GPTHiddenStates(GPT):
    """The language model stopped before its output layer, for a loss that projects onto the vocabulary a piece at
    a time (bigjax.tasks.causal_lm). It applies GPT's parameters (initialize with GPT):

        x, kernel = model.apply(variables, tokens)   # [batch, length, d] final-normed; [d, padded_vocab]
        x @ kernel, both cast to cfg.dtype, is GPT's logits (before the fp32 cast)
    """

    @nn.compact
    def __call__(self, tokens, train: bool = False, positions=None):
        x, embed = self.hidden_states(tokens, positions, None, train)
        return x, embed.output_kernel()


def parameter_count(cfg: GPTConfig) -> dict[str, int]:
    """Parameters that do matmul work per token (`matmul`: a MoE layer's router, k experts and shared experts, not
    all of its experts: the FLOPs estimate counts the active parameters), those of the layers that do (`layers`),
    the embeddings, and every parameter of the layers (`layers_total`: all the experts)."""
    d, h, kv, hd, f, v, n = (
        cfg.d_model,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.head_dim,
        cfg.mlp_dim,
        cfg.vocab_size,
        cfg.num_layers,
    )
    attention = d * hd * (h + 2 * kv) + h * hd * d
    per_expert_width = d * (3 if cfg.mlp == "swiglu" else 2)  # an MLP's weights per unit of hidden width
    dense_layer = attention + per_expert_width * f
    layers_active = layers_total = n * dense_layer
    if cfg.moe:
        e = cfg.moe
        sparse = n - e.first_dense_layers
        router_and_shared = d * e.num_experts + per_expert_width * e.expert_mlp_dim * e.num_shared_experts
        router_and_shared += d * e.shared_expert_gate
        moe_active = attention + router_and_shared + per_expert_width * e.expert_mlp_dim * e.experts_per_token
        moe_total = attention + router_and_shared + per_expert_width * e.expert_mlp_dim * e.num_experts
        layers_active = e.first_dense_layers * dense_layer + sparse * moe_active
        layers_total = e.first_dense_layers * dense_layer + sparse * moe_total
    embedding = v * d
    unembedding = 0 if cfg.tie_embeddings else v * d
    positions = cfg.max_len * d if cfg.positions == "learned" else 0
    return dict(
        # biases and norms are a rounding error and leave the matmul count alone
        matmul=layers_active + v * d,
        embedding=embedding + unembedding + positions,
        layers=layers_active,
        layers_total=layers_total,
    )
