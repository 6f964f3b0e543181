"""BERT-style bidirectional encoder: masked-LM pretraining and classification of packed examples.

Rows pack several examples (see bigjax.data): `segment_ids` number them 1, 2, ... (0 = padding) and `positions`
count tokens within each example, so attention never crosses an example and every example sees the learned
positions it would see alone. Each example starts with the tokenizer's `cls` token.

    model = BertMLM(BertConfig.from_config(config.model))
    logits = model.apply(variables, tokens, segment_ids, positions, predict_at=idx)   # [batch, P, padded_vocab]

    model = make_classifier(config.model, num_classes, max_segments)
    logits = model.apply(variables, tokens, segment_ids, positions)   # [batch, max_segments, num_classes]

The Transformer blocks are GPT's (`bigjax.models.gpt.Block`) with `causal=False`, pre- or post-LayerNorm by
`model.norm_position`; both models share `encode`, so a classifier's backbone has the pretraining model's
parameter paths and `init_from` loads them by name.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from bigjax.models import layers
from bigjax.models.gpt import GPTConfig, embedder, norm, run_blocks, text_classifier_head


@dataclasses.dataclass(frozen=True)
class BertConfig(GPTConfig):
    norm_position: str  # "post": LayerNorm after each residual sum, as BERT; "pre": before each sublayer
    type_vocab_size: int  # token-type (sentence A/B) embeddings; 0 = none


class BertEncoder(nn.Module):
    cfg: BertConfig

    def encode(self, tokens, segment_ids, positions, train: bool, token_types=None):
        """Hidden states [batch, length, d] and the Embedder (whose `attend` is the masked-LM output layer)."""
        c = self.cfg
        post_norm = c.norm_position == "post"
        embed = embedder(c, c.type_vocab_size)
        x = embed(tokens, positions, token_types)
        if post_norm:  # BERT normalizes the summed embeddings; a pre-norm stack normalizes at the end instead
            x = norm(c, "embed_norm")(x)
        x = nn.Dropout(c.dropout, deterministic=not train)(x)
        x = run_blocks(c, layers.constrain_hidden(x), positions, segment_ids, train, causal=False, post_norm=post_norm)
        return (x if post_norm else norm(c, "final_norm")(x)), embed


class BertMLM(BertEncoder):
    """The encoder with BERT's masked-LM head (dense, GELU, LayerNorm, then the tied embedding plus a bias); the
    head's GELU is the MLP's (exact with `model.mlp="gelu_exact"`, as transformers' BERT applies `hidden_act` to both).

    `predict_at` [batch, P] picks the positions to predict, so the vocabulary projection runs on the ~15% of
    tokens that are scored rather than on all of them; without it every position gets logits.
    """

    @nn.compact
    def __call__(self, tokens, segment_ids, positions, train: bool = False, predict_at=None, token_types=None):
        c = self.cfg
        x, embed = self.encode(tokens, segment_ids, positions, train, token_types)
        if predict_at is not None:
            x = jnp.take_along_axis(x, predict_at[..., None], axis=1)
        x = norm(c, "mlm_norm")(layers.gelu(c.mlp, hidden_dense(c, "mlm_transform")(x)))
        # Features whole again before the vocabulary projection, as GPT's hidden states are. Without this, XLA's
        # SPMD partitioner (jax 0.10) gets the gradients wrong on a data x fsdp x tensor mesh for small
        # prediction counts: the test of the meshes in tests/test_text_models.py fails.
        logits = embed.attend(layers.constrain_hidden(x))
        bias_init = layers.logical(nn.initializers.zeros, "vocab")
        bias = self.param("mlm_bias", bias_init, (c.vocab_size,), jnp.dtype(c.param_dtype))
        logits = logits + bias.astype(logits.dtype)
        logits = layers.constrain(logits, "activation_batch", "activation_length", "activation_vocab")
        return logits.astype(jnp.float32)


class BertClassifier(BertEncoder):
    """The encoder classifying each packed example from its `cls` token, through BERT's pooler (dense, tanh)
    and a new, zero-initialized linear head."""

    num_classes: int = 2
    max_segments: int = 1

    @nn.compact
    def __call__(self, tokens, segment_ids, positions, train: bool = False, token_types=None):
        c = self.cfg
        x, _ = self.encode(tokens, segment_ids, positions, train, token_types)
        pooled = layers.pool_segments(x, segment_ids, positions, self.max_segments, token="first")
        pooled = jnp.tanh(hidden_dense(c, "pooler", layers.FloatDense)(pooled))
        # Whole features into the head (see BertMLM): XLA partitions the gradient wrongly otherwise.
        pooled = nn.Dropout(c.dropout, deterministic=not train)(layers.constrain_hidden(pooled))
        return text_classifier_head(c, pooled, self.num_classes)


def hidden_dense(c: BertConfig, name: str, dense=nn.Dense) -> nn.Dense:
    """A d_model -> d_model Dense of a head: the masked-LM transform (quantized with the encoder), or the pooler
    (`dense=layers.FloatDense`: the classifier's output layers stay float under quantization)."""
    return dense(
        c.d_model,
        dtype=jnp.dtype(c.dtype),
        param_dtype=jnp.dtype(c.param_dtype),
        kernel_init=layers.logical(layers.normal(c.init_std), "embed", "mlp"),
        bias_init=layers.logical(nn.initializers.zeros, "mlp"),
        name=name,
    )


def make_classifier(model_config, num_classes: int, max_segments: int = 1) -> BertClassifier:
    """The classification task's constructor for this family (see bigjax.tasks.classification)."""
    return BertClassifier(BertConfig.from_config(model_config), num_classes=num_classes, max_segments=max_segments)
