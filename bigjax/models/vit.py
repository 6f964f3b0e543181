"""Vision Transformer (Dosovitskiy et al., 2021): the image cut into patches, each patch a token, the tokens through
a bidirectional pre-LN Transformer, then a classification head on the class token or on the mean of the tokens.

    model = make_classifier(config.model, num_classes)
    variables = model.init(rng, images)              # images: float32 [batch, height, width, channels]
    logits = model.apply(variables, images)          # float32 [batch, num_classes]

The Transformer stack is GPT's (bigjax.models.gpt: the same blocks, scan and remat), built with causal=False; the
config shares its Transformer keys (families.transformer_keys). Parameters carry logical axis names: the patch
embedding is a convolution whose output channels are `embed`; the class token and the position embedding are
`embed` vectors.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from bigjax import families
from bigjax.models import gpt, layers


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    encoder: gpt.GPTConfig  # the Transformer stack
    patch_size: int
    pooling: str  # cls | gap
    position_embedding: str  # learned | sincos2d

    @classmethod
    def from_config(cls, m) -> ViTConfig:
        return cls(
            encoder=encoder_config(m),
            patch_size=m.patch_size,
            pooling=m.pooling,
            position_embedding=m.position_embedding,
        )


def encoder_config(m) -> gpt.GPTConfig:
    """The config of GPT's block stack. The Transformer keys come from the ViT config; the keys only a token
    model has (vocabulary, maximum length, rotary positions) keep GPT's defaults, which the blocks never read."""
    shared = {key: m[key] for key in families.transformer_keys()}
    merged = ml_collections.ConfigDict(
        {**families.gpt_model(), **shared, "positions": "learned", "context_parallel": ""}
    )
    return gpt.GPTConfig.from_config(merged)


def sincos_2d(height: int, width: int, dim: int):
    """Fixed 2-D position embeddings [1, height*width, dim]: a quarter of the channels are sin and cos of the
    column, of the row, at frequencies spaced geometrically as in the original Transformer."""
    rows, cols = jnp.meshgrid(jnp.arange(height), jnp.arange(width), indexing="ij")
    quarter = dim // 4
    freqs = 1.0 / (10_000.0 ** (jnp.arange(quarter, dtype=jnp.float32) / quarter))
    col_angles = cols.reshape(-1, 1) * freqs
    row_angles = rows.reshape(-1, 1) * freqs
    table = jnp.concatenate(
        [jnp.sin(col_angles), jnp.cos(col_angles), jnp.sin(row_angles), jnp.cos(row_angles)], axis=1
    )
    return table[None]


class ViT(nn.Module):
    cfg: ViTConfig
    num_classes: int

    @nn.compact
    def __call__(self, images, train: bool = False):
        c, e = self.cfg, self.cfg.encoder
        dtype, param_dtype = jnp.dtype(e.dtype), jnp.dtype(e.param_dtype)

        # Patch embedding: one strided convolution; the 1 or 3 input channels are never sharded.
        patches = layers.conv(
            e.d_model,
            c.patch_size,
            strides=c.patch_size,
            padding="VALID",
            use_bias=True,
            in_name=None,
            dtype=dtype,
            param_dtype=param_dtype,
            name="patch_embed",
        )(images.astype(dtype))
        batch, rows, cols, _ = patches.shape
        x = patches.reshape(batch, rows * cols, e.d_model)
        x = x + self.position_embeddings(rows, cols, dtype, param_dtype)

        if c.pooling == "cls":
            cls = self.param(
                "cls", layers.logical(nn.initializers.zeros, None, None, "embed"), (1, 1, e.d_model), param_dtype
            )
            x = jnp.concatenate([jnp.broadcast_to(cls.astype(dtype), (batch, 1, e.d_model)), x], axis=1)
        x = layers.constrain_hidden(nn.Dropout(e.dropout, deterministic=not train)(x))

        x = gpt.run_blocks(e, x, None, None, train, causal=False)  # no positions: they were added above
        x = gpt.norm(e, "encoder_norm")(x)

        pooled = x[:, 0] if c.pooling == "cls" else jnp.mean(x, axis=1)
        logits = layers.classifier_head(pooled, self.num_classes, in_name="embed", dtype=dtype, param_dtype=param_dtype)
        return layers.constrain(logits, "activation_batch", None)

    def position_embeddings(self, rows: int, cols: int, dtype, param_dtype):
        dim = self.cfg.encoder.d_model
        if self.cfg.position_embedding == "sincos2d":
            return sincos_2d(rows, cols, dim).astype(dtype)
        init = layers.logical(layers.normal(dim**-0.5), None, "positions", "embed")
        return self.param("position_embed", init, (1, rows * cols, dim), param_dtype).astype(dtype)


def make_classifier(model_config, num_classes: int) -> ViT:
    return ViT(ViTConfig.from_config(model_config), num_classes)
