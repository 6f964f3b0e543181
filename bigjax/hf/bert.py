"""BertForMaskedLM, BertForSequenceClassification and BertModel <-> bigjax's BERT family (post-LN, learned positions
and token types, biases everywhere).

    BertForMaskedLM                  task masked_lm: the encoder and the MLM head (transform, LayerNorm, the tied
                                     embedding plus a bias)
    BertForSequenceClassification    task classification, num_classes = num_labels: the encoder, the pooler (dense,
                                     tanh on the [CLS] token) and the classifier, as bigjax's BertClassifier has them
    BertModel                        task classification too: the encoder and the pooler, with a new zero head of
                                     num_labels classes (bigjax's initialization of a head); the usual start of a
                                     fine-tuning run (`init_from.workdir=hf:PATH` loads the same weights by path)

A run exports as BertForMaskedLM (masked_lm) or BertForSequenceClassification (classification). torch's nn.Linear
is [out, in]: transposed here; the per-head axes of q/k/v/out are split from the fused hidden axis, as for Llama.
transformers' "gelu" is the exact (erf) GELU: model.mlp="gelu_exact"; its LayerNorm takes the two-pass variance.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from bigjax import config as config_lib
from bigjax.hf import encoder
from bigjax.hf.common import labels, num_labels, refuse, require
from bigjax.hf.encoder import ACTIVATIONS
from bigjax.hf.mapping import TRANSPOSED, Constant, Tensor

ARCHITECTURES = ("BertForMaskedLM", "BertForSequenceClassification", "BertModel")

NAMES = encoder.Names("BERT", "attention.self", ("attention.output.LayerNorm", "output.LayerNorm"))


def bigjax_config(hf: dict):
    require(hf, "hidden_act", tuple(ACTIVATIONS), "gelu", "bigjax's BERT has the exact or the tanh GELU only")
    require(hf, "position_embedding_type", ("absolute",), "absolute", "bigjax's BERT has learned absolute positions")
    require(hf, "is_decoder", (False,), False, "bigjax's BERT is an encoder")
    require(hf, "add_cross_attention", (False,), False, "bigjax's BERT has no cross-attention")
    classifier = "BertForMaskedLM" not in (hf.get("architectures") or [])
    if classifier:
        require(hf, "problem_type", (None, "single_label_classification"), None, "bigjax classifies into one class")
        if num_labels(hf) < 2:
            refuse("num_labels", num_labels(hf), "bigjax classifies into two classes or more (no regression head)")
    config = config_lib.defaults("bert", "classification" if classifier else "masked_lm")
    config.model.update(
        vocab_size=hf["vocab_size"],
        max_len=hf["max_position_embeddings"],
        num_layers=hf["num_hidden_layers"],
        d_model=hf["hidden_size"],
        num_heads=hf["num_attention_heads"],
        num_kv_heads=0,
        head_dim=0,
        mlp_dim=hf["intermediate_size"],
        positions="learned",
        norm="layernorm",
        norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
        norm_variance="two_pass",
        mlp=ACTIVATIONS[hf.get("hidden_act", "gelu")],
        use_bias=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        dropout=float(hf.get("hidden_dropout_prob", 0.1)),
        norm_position="post",
        type_vocab_size=int(hf.get("type_vocab_size", 2)),
    )
    if classifier:
        config.task.num_classes = num_labels(hf)
        config.data.source = "synthetic"  # name the labelled data when training (--config.data.source=...)
    return config


def exports(config) -> bool:
    """Whether the run is a BERT; one without a transformers equivalent is refused here, naming the setting."""
    m = config.model
    if m.family != "bert":
        return False
    encoder.check_exportable(m, NAMES, dict(norm_position="post", positions="learned", norm="layernorm", use_bias=True))
    return True


# --------------------------------------------------------------------------------------------------
# The mapping, both ways: bigjax path <-> HF tensor

ROOT = "bert."  # where the task models keep the encoder (and the pooler); BertModel's own files have no prefix


def import_root(read) -> str:
    return ROOT if read.has(ROOT + "embeddings.word_embeddings.weight") else ""


def layer_table(config, i: int, root: str = ROOT) -> list:
    return encoder.layer_table(f"{root}encoder.layer.{i}.", config.model, NAMES)


def global_table(config, root: str = ROOT) -> list:
    m, e = config.model, f"{root}embeddings."
    table = [
        Tensor("embed/embedding", e + "word_embeddings.weight"),
        Tensor("position_embed/embedding", e + "position_embeddings.weight"),
        Tensor("embed_norm/norm/scale", e + "LayerNorm.weight"),
        Tensor("embed_norm/norm/bias", e + "LayerNorm.bias"),
    ]
    if m.type_vocab_size:
        table.append(Tensor("token_type_embed/embedding", e + "token_type_embeddings.weight"))
    else:  # transformers' BERT always adds a token type: a run without them exports one type whose row is zero
        table.append(Constant(e + "token_type_embeddings.weight", np.zeros((1, m.d_model), np.float32)))
    t = "cls.predictions.transform."
    heads = [  # what each architecture has: the MLM head, the pooler, the classifier
        Tensor("mlm_transform/kernel", t + "dense.weight", (TRANSPOSED,)),
        Tensor("mlm_transform/bias", t + "dense.bias"),
        Tensor("mlm_norm/norm/scale", t + "LayerNorm.weight"),
        Tensor("mlm_norm/norm/bias", t + "LayerNorm.bias"),
        Tensor("mlm_bias", "cls.predictions.bias"),
        Tensor("pooler/kernel", root + "pooler.dense.weight", (TRANSPOSED,)),
        Tensor("pooler/bias", root + "pooler.dense.bias"),
        Tensor("classifier/kernel", "classifier.weight", (TRANSPOSED,)),
        Tensor("classifier/bias", "classifier.bias"),
    ]
    if not m.tie_embeddings:  # an untied MLM head's own output layer
        heads.append(Tensor("unembed/kernel", "cls.predictions.decoder.weight", (TRANSPOSED,)))
    return table + [dataclasses.replace(head, optional=True) for head in heads]


# --------------------------------------------------------------------------------------------------
# config.json for export


def hf_config(config, hf_vocab: int, special: dict) -> dict:
    m = config.model
    masked_lm = config.task.name == "masked_lm"
    names = {} if masked_lm else labels(config.task.num_classes)
    return dict(
        architectures=["BertForMaskedLM" if masked_lm else "BertForSequenceClassification"],
        model_type="bert",
        vocab_size=hf_vocab,
        hidden_size=m.d_model,
        num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_heads,
        intermediate_size=m.mlp_dim or 4 * m.d_model,
        hidden_act="gelu" if m.mlp == "gelu_exact" else "gelu_new",
        max_position_embeddings=m.max_len,
        type_vocab_size=m.type_vocab_size or 1,
        layer_norm_eps=m.norm_eps,
        hidden_dropout_prob=m.dropout,
        attention_probs_dropout_prob=0.0,  # bigjax drops no attention probabilities
        position_embedding_type="absolute",
        tie_word_embeddings=m.tie_embeddings,
        **names,
        **special,
    )
