"""ResNet (He et al., 2016), v1.5 as torchvision and the Flax ImageNet example build it: the stride of a
bottleneck sits in its 3x3 convolution. Basic blocks (two 3x3 convolutions) for depths 10-34, bottlenecks
(1x1, 3x3, 1x1 with 4x the channels out) from 50.

    model = make_classifier(config.model, num_classes)
    variables = model.init(rng, images, train=False)  # {"params": ..., "batch_stats": ...} with BatchNorm
    logits, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])

Normalization is BatchNorm (its running statistics are the "batch_stats" collection, which bigjax keeps in
TrainState.model_state), GroupNorm (no batch statistics: for small per-device batches, or fine-tuning without
them), or none. Each stage's first block changes the shape; the others are identical, so they are stacked with
nn.scan (config.model.scan_layers) and compiled once per stage. Logical axis names: see the convolution notes
in bigjax/models/layers.py.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax.numpy as jnp

from bigjax.models import layers

# depth -> (block kind, blocks per stage)
DEPTHS = {
    10: ("basic", (1, 1, 1, 1)),
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}

# Kaiming-normal over the fan-out, as torchvision initializes ResNet convolutions.
CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
    depth: int
    width: int
    stem: str
    conv_padding: str
    zero_init_residual: bool
    scan_layers: bool
    remat: str
    normalization: str
    norm_groups: int
    bn_momentum: float
    freeze_batch_stats: bool
    norm_eps: float
    dtype: str
    param_dtype: str

    @classmethod
    def from_config(cls, m) -> ResNetConfig:
        return cls(**{f.name: m[f.name] for f in dataclasses.fields(cls)})

    @property
    def block(self) -> str:
        return DEPTHS[self.depth][0]

    @property
    def stage_sizes(self) -> tuple[int, ...]:
        return DEPTHS[self.depth][1]

    def padding(self, kernel_size: int):
        """ "SAME", or kernel//2 on each side (torch's): the two differ only where a stride meets an even size."""
        if self.conv_padding == "same":
            return "SAME"
        return ((kernel_size // 2, kernel_size // 2),) * 2

    def norm(self, train: bool):
        """The norm after each convolution, by name: `norm(name="norm1")`; BatchNorm statistics frozen on request."""
        return functools.partial(
            layers.channel_norm,
            self.normalization,
            train and not self.freeze_batch_stats,
            groups=self.norm_groups,
            momentum=self.bn_momentum,
            eps=self.norm_eps,
            dtype=jnp.dtype(self.dtype),
            param_dtype=jnp.dtype(self.param_dtype),
        )


class Block(nn.Module):
    """One residual block: x -> (relu(shortcut(x) + branch(x)), None), the signature nn.scan stacks."""

    cfg: ResNetConfig
    features: int  # the block's inner channels; a bottleneck puts out 4x as many
    strides: int
    train: bool

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        dtype, param_dtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)

        def conv(features, kernel_size, **kwargs):
            common = dict(padding=c.padding(kernel_size), init=CONV_INIT, dtype=dtype, param_dtype=param_dtype)
            return layers.conv(features, kernel_size, **common, **kwargs)

        norm = c.norm(self.train)
        last_norm = functools.partial(norm, zero_init=c.zero_init_residual)

        if c.block == "basic":
            out_features = self.features
            y = nn.relu(norm(name="norm1")(conv(self.features, 3, strides=self.strides, name="conv1")(x)))
            y = last_norm(name="norm2")(conv(self.features, 3, name="conv2")(y))
        else:
            out_features = 4 * self.features
            y = nn.relu(norm(name="norm1")(conv(self.features, 1, name="conv1")(x)))
            y = nn.relu(norm(name="norm2")(conv(self.features, 3, strides=self.strides, name="conv2")(y)))
            y = last_norm(name="norm3")(conv(out_features, 1, name="conv3")(y))

        shortcut = x
        if x.shape[-1] != out_features or self.strides != 1:
            shortcut = norm(name="shortcut_norm")(conv(out_features, 1, strides=self.strides, name="shortcut")(x))
        out = nn.relu(shortcut + y)
        return layers.constrain(out, "activation_batch", None, None, "activation_conv"), None


class ResNet(nn.Module):
    cfg: ResNetConfig
    num_classes: int

    @nn.compact
    def __call__(self, images, train: bool = False):
        c = self.cfg
        dtype, param_dtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        norm = c.norm(train)
        x = images.astype(dtype)
        x = layers.constrain(x, "activation_batch", None, None, None)

        # The stem sees the 1 or 3 image channels, which no mesh axis divides: its input channels stay whole.
        stem = functools.partial(
            layers.conv, c.width, init=CONV_INIT, in_name=None, dtype=dtype, param_dtype=param_dtype, name="stem"
        )
        if c.stem == "imagenet":
            x = nn.relu(norm(name="stem_norm")(stem(7, strides=2, padding=c.padding(7))(x)))
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=c.padding(3))  # max_pool pads with -inf
        else:
            x = nn.relu(norm(name="stem_norm")(stem(3, padding=c.padding(3))(x)))
        x = layers.constrain(x, "activation_batch", None, None, "activation_conv")

        # Rematerialized by policy (the dots policies save matmul outputs only, so for convolutions they recompute
        # about as much as "full"); a stage's identical blocks scanned: stacked parameters and statistics.
        block = layers.remat_and_scan(Block, c.remat)
        for stage, count in enumerate(c.stage_sizes):
            features, name = c.width * 2**stage, f"stage{stage + 1}"
            # The first block of a stage changes the shape (more channels; from the second stage, stride 2).
            x, _ = block(c, features, 1 if stage == 0 else 2, train, name=f"{name}_block1")(x)
            if c.scan_layers and count > 1:
                rest = layers.remat_and_scan(Block, c.remat, count - 1)
                x, _ = rest(c, features, 1, train, name=f"{name}_rest")(x)
            else:
                for i in range(1, count):
                    x, _ = block(c, features, 1, train, name=f"{name}_block{i + 1}")(x)

        pooled = jnp.mean(x, axis=(1, 2))
        logits = layers.classifier_head(
            pooled, self.num_classes, in_name="conv_in", dtype=dtype, param_dtype=param_dtype
        )
        return layers.constrain(logits, "activation_batch", None)


def make_classifier(model_config, num_classes: int) -> ResNet:
    return ResNet(ResNetConfig.from_config(model_config), num_classes)
