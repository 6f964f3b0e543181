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

import numpy as np

from bigjax import config as config_lib
from bigjax.hf import encoder
from bigjax.hf.common import refuse, require

ARCHITECTURES = ("BertForMaskedLM", "BertForSequenceClassification", "BertModel")
# transformers' hidden_act -> bigjax's model.mlp
ACTIVATIONS = {"gelu": "gelu_exact", "gelu_new": "gelu", "gelu_pytorch_tanh": "gelu"}

NAMES = encoder.Names("BERT", "attention.self", ("attention.output.LayerNorm", "output.LayerNorm"))


def num_labels(hf: dict) -> int:
    return len(hf["id2label"]) if hf.get("id2label") else int(hf.get("num_labels", 2))


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


def prefix(read) -> str:
    """The task models keep the encoder under `bert.`; BertModel's own files have no prefix."""
    return "bert." if read.has("bert.embeddings.word_embeddings.weight") else ""


# --------------------------------------------------------------------------------------------------
# Import: bigjax path -> a view of the HF tensors


def layer_tensors(read, i: int, config) -> dict:
    return encoder.layer_tensors(read, f"{prefix(read)}encoder.layer.{i}.", config.model, NAMES)


def global_tensors(read, config) -> dict:
    e = f"{prefix(read)}embeddings."
    tensors = {
        "embed/embedding": read(e + "word_embeddings.weight"),
        "position_embed/embedding": read(e + "position_embeddings.weight"),
        "embed_norm/norm/scale": read(e + "LayerNorm.weight"),
        "embed_norm/norm/bias": read(e + "LayerNorm.bias"),
    }
    if config.model.type_vocab_size:
        tensors["token_type_embed/embedding"] = read(e + "token_type_embeddings.weight")
    optional = {  # what each architecture has: the MLM head, the pooler, the classifier
        "mlm_transform/kernel": ("cls.predictions.transform.dense.weight", True),
        "mlm_transform/bias": ("cls.predictions.transform.dense.bias", False),
        "mlm_norm/norm/scale": ("cls.predictions.transform.LayerNorm.weight", False),
        "mlm_norm/norm/bias": ("cls.predictions.transform.LayerNorm.bias", False),
        "mlm_bias": ("cls.predictions.bias", False),
        "unembed/kernel": ("cls.predictions.decoder.weight", True),  # an untied output layer only
        "pooler/kernel": (prefix(read) + "pooler.dense.weight", True),
        "pooler/bias": (prefix(read) + "pooler.dense.bias", False),
        "classifier/kernel": ("classifier.weight", True),
        "classifier/bias": ("classifier.bias", False),
    }
    for path, (name, transposed) in optional.items():
        if read.has(name):
            tensors[path] = read(name).T if transposed else read(name)
    return tensors


# --------------------------------------------------------------------------------------------------
# Export: bigjax parameters -> HF tensors and config.json


def hf_tensors(params, config, hf_vocab: int) -> dict:
    m = config.model
    d = m.d_model
    out = {}
    for i in range(m.num_layers):
        out |= encoder.layer_hf_tensors(params, i, f"bert.encoder.layer.{i}.", m, NAMES)
    e = "bert.embeddings."
    out[e + "word_embeddings.weight"] = params["embed/embedding"][:hf_vocab]
    out[e + "position_embeddings.weight"] = params["position_embed/embedding"]
    # transformers' BERT always adds a token type: a run without them exports one type whose row is zero.
    types = params["token_type_embed/embedding"] if m.type_vocab_size else np.zeros((1, d), np.float32)
    out[e + "token_type_embeddings.weight"] = types
    out[e + "LayerNorm.weight"] = params["embed_norm/norm/scale"]
    out[e + "LayerNorm.bias"] = params["embed_norm/norm/bias"]
    if config.task.name == "masked_lm":
        t = "cls.predictions.transform."
        out[t + "dense.weight"] = params["mlm_transform/kernel"].T
        out[t + "dense.bias"] = params["mlm_transform/bias"]
        out[t + "LayerNorm.weight"] = params["mlm_norm/norm/scale"]
        out[t + "LayerNorm.bias"] = params["mlm_norm/norm/bias"]
        out["cls.predictions.bias"] = params["mlm_bias"][:hf_vocab]
        if not m.tie_embeddings:
            out["cls.predictions.decoder.weight"] = params["unembed/kernel"][:, :hf_vocab].T
    else:
        out["bert.pooler.dense.weight"] = params["pooler/kernel"].T
        out["bert.pooler.dense.bias"] = params["pooler/bias"]
        out["classifier.weight"] = params["classifier/kernel"].T
        out["classifier.bias"] = params["classifier/bias"]
    return out


def hf_config(config, hf_vocab: int, special: dict) -> dict:
    m = config.model
    masked_lm = config.task.name == "masked_lm"
    labels = {} if masked_lm else dict(id2label={str(i): f"LABEL_{i}" for i in range(config.task.num_classes)})
    labels |= {} if masked_lm else dict(label2id={f"LABEL_{i}": i for i in range(config.task.num_classes)})
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
        **labels,
        **special,
    )
