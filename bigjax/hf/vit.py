"""ViTForImageClassification and ViTModel <-> bigjax's ViT family (a class token, learned positions, pre-LN blocks).

    ViTForImageClassification    task classification, num_classes = num_labels: the head on the class token
    ViTModel                     task classification too, with a new zero head of num_labels classes (bigjax's
                                 initialization of a head). Its pooler (dense, tanh on the class token) is not
                                 read: bigjax's ViT has none, and ViTForImageClassification does not use one either

A run exports as ViTForImageClassification. Positions: transformers adds a table of 1 + patches rows after putting
the class token first; bigjax adds its table to the patches and then puts its class token first. The class
token's row folds into bigjax's class token exactly (cls + row 0: the same single float32 addition transformers
does); export writes bigjax's class token and a zero row 0. torch's Conv2d kernel [out, in, kh, kw] becomes Flax's
[kh, kw, in, out]. HF takes NCHW pixel_values, bigjax NHWC images: the same numbers, transposed.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from bigjax import config as config_lib
from bigjax.hf import encoder
from bigjax.hf.common import labels, num_labels, refuse, require, set_image_data
from bigjax.hf.encoder import ACTIVATIONS
from bigjax.hf.mapping import TRANSPOSED, Tensor, permuted

ARCHITECTURES = ("ViTForImageClassification", "ViTModel")
IMAGE_MEAN, IMAGE_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # ViTImageProcessor's defaults

NAMES = encoder.Names("ViT", "attention.attention", ("layernorm_before", "layernorm_after"))


def square(hf: dict, field: str) -> int:
    value = hf[field]
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            refuse(field, value, "bigjax's ViT takes square images and patches")
        value = value[0]
    return int(value)


def bigjax_config(hf: dict):
    require(hf, "hidden_act", tuple(ACTIVATIONS), "gelu", "bigjax's ViT has the exact or the tanh GELU only")
    require(hf, "qkv_bias", (True,), True, "bigjax's ViT has biases on every projection")
    require(hf, "problem_type", (None, "single_label_classification"), None, "bigjax classifies into one class")
    if num_labels(hf) < 2:
        refuse("num_labels", num_labels(hf), "bigjax classifies into two classes or more (no regression head)")
    image_size, patch_size = square(hf, "image_size"), square(hf, "patch_size")
    config = config_lib.defaults("vit", "classification")
    config.model.update(
        patch_size=patch_size,
        pooling="cls",
        position_embedding="learned",
        num_layers=hf["num_hidden_layers"],
        d_model=hf["hidden_size"],
        num_heads=hf["num_attention_heads"],
        num_kv_heads=0,
        head_dim=0,
        mlp_dim=hf["intermediate_size"],
        norm="layernorm",
        norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
        norm_variance="two_pass",
        mlp=ACTIVATIONS[hf.get("hidden_act", "gelu")],
        use_bias=True,
        dropout=float(hf.get("hidden_dropout_prob", 0.0)),
    )
    config.task.num_classes = num_labels(hf)
    set_image_data(config, hf, image_size, IMAGE_MEAN, IMAGE_STD)
    return config


def exports(config) -> bool:
    """Whether the run is a ViT; one without a transformers equivalent is refused here, naming the setting."""
    m = config.model
    if m.family != "vit":
        return False
    encoder.check_exportable(
        m, NAMES, dict(pooling="cls", position_embedding="learned", norm="layernorm", use_bias=True)
    )
    return True


# --------------------------------------------------------------------------------------------------
# The mapping, both ways: bigjax path <-> HF tensor

ROOT = "vit."  # where ViTForImageClassification keeps the model; ViTModel's own files have no prefix


def import_root(read) -> str:
    return ROOT if read.has(ROOT + "embeddings.cls_token") else ""


@dataclasses.dataclass(frozen=True)
class ClassTokenAndPositions:
    """transformers' class token and its position table of 1 + patches rows [1, 1 + patches, d] <-> bigjax's class
    token (with row 0 folded in: cls + row 0, the single float32 addition transformers does) and its table of the
    patches' rows. Export writes bigjax's class token and a zero row 0."""

    root: str
    paths: tuple[str, ...] = ("cls", "position_embed")
    index: int | None = None
    optional: bool = False

    @property
    def hf_names(self) -> tuple[str, ...]:
        return (self.root + "embeddings.cls_token", self.root + "embeddings.position_embeddings")

    def views(self, read) -> dict:
        cls, positions = (read(name) for name in self.hf_names)
        rows = positions.shape[1]
        return {"cls": cls.plus(positions.range(1, 0, 1)), "position_embed": positions.range(1, 1, rows)}

    def arrays(self, get) -> dict:
        positions = get("position_embed")
        zero_row = np.zeros((1, 1, positions.shape[-1]), positions.dtype)
        return dict(zip(self.hf_names, (get("cls"), np.concatenate([zero_row, positions], axis=1)), strict=True))


def layer_table(config, i: int, root: str = ROOT) -> list:
    return encoder.layer_table(f"{root}encoder.layer.{i}.", config.model, NAMES)


def global_table(config, root: str = ROOT) -> list:
    e = f"{root}embeddings.patch_embeddings.projection."
    return [
        Tensor("patch_embed/kernel", e + "weight", (permuted(2, 3, 1, 0),)),  # torch's [out, in, kh, kw] -> Flax's
        Tensor("patch_embed/bias", e + "bias"),
        ClassTokenAndPositions(root),
        Tensor("encoder_norm/norm/scale", root + "layernorm.weight"),
        Tensor("encoder_norm/norm/bias", root + "layernorm.bias"),
        Tensor("head/kernel", "classifier.weight", (TRANSPOSED,), optional=True),  # ViTModel has no head
        Tensor("head/bias", "classifier.bias", optional=True),
    ]


# --------------------------------------------------------------------------------------------------
# config.json for export


def hf_config(config, hf_vocab=None, special=None) -> dict:
    m = config.model
    return dict(
        architectures=["ViTForImageClassification"],
        model_type="vit",
        hidden_size=m.d_model,
        num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_heads,
        intermediate_size=m.mlp_dim or 4 * m.d_model,
        hidden_act="gelu" if m.mlp == "gelu_exact" else "gelu_new",
        layer_norm_eps=m.norm_eps,
        image_size=config.data.image_size,
        patch_size=m.patch_size,
        num_channels=config.data.channels,
        qkv_bias=True,
        hidden_dropout_prob=m.dropout,
        attention_probs_dropout_prob=0.0,  # bigjax drops no attention probabilities
        **labels(config.task.num_classes),
    )
