"""ResNetForImageClassification (transformers' modeling_resnet: microsoft/resnet-*) <-> bigjax's ResNet family.

transformers' layout is bigjax's ResNet v1.5: a 7x7/2 conv + BatchNorm + ReLU "embedder" and a 3x3/2 max-pool (the
imagenet stem), four stages of basic or bottleneck layers whose stride sits in the 3x3 convolution
(downsample_in_bottleneck=False), a 1x1 conv + BatchNorm shortcut where the shape changes, no stride in the first
stage (downsample_in_first_stage=False), average pooling and a linear classifier. What must hold besides:

- depths are one of bigjax's (basic: 10, 18, 34; bottleneck: 50, 101, 152), and hidden_sizes are width x 2^stage
  (x 4 for bottlenecks) with width = embedding_size: bigjax derives every stage's channels from one width;
- torch pads each convolution and the max-pool by kernel//2 on every side: model.conv_padding="symmetric" (bigjax's
  default "same" puts a strided layer's padding at the end instead, which samples other pixels).

BatchNorm's running mean and variance are bigjax's `batch_stats` collection (TrainState.model_state), under the
norm's path: import writes them there, export reads them back (`num_batches_tracked` is written as 0: transformers
uses it only for a BatchNorm without momentum). Stages' later blocks are stacked when model.scan_layers is set.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from bigjax import config as config_lib
from bigjax.hf.common import HFError, labels, num_labels, refuse, require, set_image_data
from bigjax.hf.mapping import TRANSPOSED, Constant, Tensor, permuted
from bigjax.models.resnet import DEPTHS

ARCHITECTURES = ("ResNetForImageClassification",)
# ConvNextImageProcessor's defaults, which microsoft/resnet-* use: ImageNet's mean and standard deviation.
IMAGE_MEAN, IMAGE_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
EXPANSION = {"basic": 1, "bottleneck": 4}  # a layer's output channels per inner channel


def bigjax_config(hf: dict):
    require(hf, "hidden_act", ("relu",), "relu", "bigjax's ResNet uses ReLU")
    require(hf, "downsample_in_first_stage", (False,), False, "bigjax's first stage keeps the stem's resolution")
    require(hf, "downsample_in_bottleneck", (False,), False, "bigjax's bottleneck strides in its 3x3 convolution")
    layer_type, depths = hf.get("layer_type", "bottleneck"), tuple(hf.get("depths", (3, 4, 6, 3)))
    require(hf, "layer_type", tuple(EXPANSION), "bottleneck", "bigjax has basic and bottleneck blocks")
    depth = next((d for d, (kind, stages) in DEPTHS.items() if (kind, stages) == (layer_type, depths)), None)
    if depth is None:
        known = ", ".join(f"{kind} {list(stages)}" for kind, stages in DEPTHS.values())
        refuse("depths", list(depths), f"bigjax's ResNet depths are {known}")
    width = int(hf.get("embedding_size", 64))
    expected = [EXPANSION[layer_type] * width * 2**stage for stage in range(len(depths))]
    if list(hf.get("hidden_sizes", expected)) != expected:
        refuse(
            "hidden_sizes",
            hf.get("hidden_sizes"),
            f"bigjax's stages have width x 2^stage{' x 4' if layer_type == 'bottleneck' else ''} channels, "
            f"{expected} for embedding_size={width}",
        )
    num_classes = num_labels(hf)
    if num_classes < 2:
        refuse("num_labels", num_classes, "bigjax classifies into two classes or more")
    config = config_lib.defaults("resnet", "classification")
    config.model.update(
        depth=depth,
        width=width,
        stem="imagenet",
        conv_padding="symmetric",
        normalization="batchnorm",
        norm_eps=1e-5,  # torch's BatchNorm2d
        bn_momentum=0.9,  # torch's momentum=0.1 weighs the new batch 0.1
    )
    config.task.num_classes = num_classes
    set_image_data(config, hf, 224, IMAGE_MEAN, IMAGE_STD)
    return config


def exports(config) -> bool:
    """Whether the run is a ResNet; one without a transformers equivalent is refused here, naming the setting."""
    m = config.model
    if m.family != "resnet":
        return False
    why = {
        "stem": "transformers' ResNet has the imagenet stem (7x7/2 conv and a 3x3/2 max-pool)",
        "normalization": "transformers' ResNet has BatchNorm",
        "conv_padding": "torch pads by kernel//2 on every side; a model trained with 'same' computes other numbers",
    }
    for key, value in dict(stem="imagenet", normalization="batchnorm", conv_padding="symmetric").items():
        if m[key] != value:
            raise HFError(f"config.model.{key}={m[key]!r}: {why[key]}; this run cannot be exported")
    return True


def blocks(config):
    """(stage, layer, bigjax block name, index in its stack or None) of every residual block."""
    m = config.model
    for stage, count in enumerate(DEPTHS[m.depth][1]):
        for layer in range(count):
            if layer == 0:
                yield stage, layer, f"stage{stage + 1}_block1", None
            elif m.scan_layers and count > 1:
                yield stage, layer, f"stage{stage + 1}_rest", layer - 1
            else:
                yield stage, layer, f"stage{stage + 1}_block{layer + 1}", None


def convs(config, stage: int, layer: int):
    """(HF module under the layer, bigjax conv name, bigjax norm name) of one block's convolutions."""
    kind = DEPTHS[config.model.depth][0]
    pairs = [(f"layer.{k}", f"conv{k + 1}", f"norm{k + 1}") for k in range(2 if kind == "basic" else 3)]
    if layer == 0 and (stage > 0 or EXPANSION[kind] > 1):  # the shape changes: a projection shortcut
        pairs.append(("shortcut", "shortcut", "shortcut_norm"))
    return pairs


def conv_norm(hf: str, conv: str, norm: str, index: int | None) -> list:
    """The mapping of one HF ResNetConvLayer (or shortcut): its kernel, BatchNorm parameters and statistics."""
    n = f"{hf}.normalization."
    return [
        Tensor(f"{conv}/kernel", f"{hf}.convolution.weight", (permuted(2, 3, 1, 0),), index),  # torch's -> Flax's
        Tensor(f"{norm}/scale", n + "weight", index=index),
        Tensor(f"{norm}/bias", n + "bias", index=index),
        Tensor(f"batch_stats/{norm}/mean", n + "running_mean", index=index),
        Tensor(f"batch_stats/{norm}/var", n + "running_var", index=index),
        Constant(n + "num_batches_tracked", np.zeros((), np.int64)),
    ]


# --------------------------------------------------------------------------------------------------
# The mapping, both ways: bigjax path (BatchNorm statistics as batch_stats/path) <-> HF tensor


def layer_table(config, i: int, root: str = "") -> list:
    return []  # no Transformer layers: every path is in global_table


def global_table(config, root: str = "") -> list:
    table = conv_norm("resnet.embedder.embedder", "stem", "stem_norm", None)
    for stage, layer, name, index in blocks(config):
        for hf, conv, norm in convs(config, stage, layer):
            table += conv_norm(
                f"resnet.encoder.stages.{stage}.layers.{layer}.{hf}", f"{name}/{conv}", f"{name}/{norm}", index
            )
    head = [Tensor("head/kernel", "classifier.1.weight", (TRANSPOSED,)), Tensor("head/bias", "classifier.1.bias")]
    return table + [dataclasses.replace(entry, optional=True) for entry in head]  # where the files have one


# --------------------------------------------------------------------------------------------------
# config.json for export


def hf_config(config, hf_vocab=None, special=None) -> dict:
    m = config.model
    kind, depths = DEPTHS[m.depth]
    return dict(
        architectures=["ResNetForImageClassification"],
        model_type="resnet",
        num_channels=config.data.channels,
        embedding_size=m.width,
        hidden_sizes=[EXPANSION[kind] * m.width * 2**stage for stage in range(len(depths))],
        depths=list(depths),
        layer_type=kind,
        hidden_act="relu",
        downsample_in_first_stage=False,
        downsample_in_bottleneck=False,
        **labels(config.task.num_classes),
    )
