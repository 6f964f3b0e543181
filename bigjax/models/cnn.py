"""The small CNN of the Flax MNIST tutorial: (3x3 conv, relu, 2x2 average pool) per entry of
config.model.features, then Dense(hidden_dim), relu, and the classification head.

    model = make_classifier(config.model, num_classes)
    logits = model.apply(variables, images)          # images: float32 [batch, height, width, channels]

The tutorial has no normalization (config.model.normalization="none"); "batchnorm" or "groupnorm" after each
convolution are options. Logical axis names: convolutions as in bigjax/models/layers.py, the hidden Dense as an
MLP (`embed` -> `mlp`).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from bigjax.models import layers


class CNN(nn.Module):
    features: tuple[int, ...]
    hidden_dim: int
    dropout: float
    normalization: str
    norm_groups: int
    bn_momentum: float
    freeze_batch_stats: bool
    norm_eps: float
    dtype: str
    param_dtype: str
    num_classes: int

    @nn.compact
    def __call__(self, images, train: bool = False):
        dtype, param_dtype = jnp.dtype(self.dtype), jnp.dtype(self.param_dtype)
        x = layers.constrain(images.astype(dtype), "activation_batch", None, None, None)
        for i, features in enumerate(self.features):
            x = layers.conv(
                features,
                3,
                use_bias=self.normalization == "none",  # a norm's bias makes the conv's redundant
                in_name=None if i == 0 else "conv_in",  # the 1 or 3 image channels split over no mesh axis
                dtype=dtype,
                param_dtype=param_dtype,
                name=f"conv{i + 1}",
            )(x)
            x = layers.channel_norm(
                self.normalization,
                train and not self.freeze_batch_stats,
                groups=self.norm_groups,
                momentum=self.bn_momentum,
                eps=self.norm_eps,
                dtype=dtype,
                param_dtype=param_dtype,
                name=f"norm{i + 1}",
            )(x)
            x = nn.avg_pool(nn.relu(x), (2, 2), strides=(2, 2))
            x = layers.constrain(x, "activation_batch", None, None, "activation_conv")

        x = x.reshape(x.shape[0], -1)
        x = nn.Dense(
            self.hidden_dim,
            dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=layers.logical(layers.LECUN_NORMAL, "embed", "mlp"),
            bias_init=layers.logical(nn.initializers.zeros, "mlp"),
            name="hidden",
        )(x)
        x = nn.Dropout(self.dropout, deterministic=not train)(nn.relu(x))
        x = layers.constrain(x, "activation_batch", "activation_mlp")
        logits = layers.classifier_head(x, self.num_classes, in_name="mlp", dtype=dtype, param_dtype=param_dtype)
        return layers.constrain(logits, "activation_batch", None)


def make_classifier(m, num_classes: int) -> CNN:
    return CNN(
        features=tuple(m.features),
        hidden_dim=m.hidden_dim,
        dropout=m.dropout,
        normalization=m.normalization,
        norm_groups=m.norm_groups,
        bn_momentum=m.bn_momentum,
        freeze_batch_stats=m.freeze_batch_stats,
        norm_eps=m.norm_eps,
        dtype=m.dtype,
        param_dtype=m.param_dtype,
        num_classes=num_classes,
    )
