"""GPT2LMHeadModel <-> bigjax's GPT family with learned positions, LayerNorm, a GELU (the tanh form, GPT-2's own, or
the exact one) and biases.

GPT-2's Conv1D weights are already [in, out], as bigjax's kernels; its attention fuses q|k|v into one c_attn,
split here into three (no transposing).
"""

from __future__ import annotations

import numpy as np

from bigjax import config as config_lib
from bigjax.hf.common import require

ARCHITECTURES = ("GPT2LMHeadModel",)
# transformers' activation_function -> bigjax's model.mlp: "gelu" is the exact (erf) GELU, gelu_new and
# gelu_pytorch_tanh the tanh approximation (GPT-2's own).
ACTIVATIONS = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "gelu": "gelu_exact"}


def bigjax_config(hf: dict):
    activations = tuple(ACTIVATIONS)
    require(hf, "activation_function", activations, "gelu_new", "bigjax's GPT-2 has the tanh or the exact GELU only")
    require(hf, "scale_attn_by_inverse_layer_idx", (False,), False, "bigjax scales attention by 1/sqrt(head_dim) only")
    require(hf, "scale_attn_weights", (True,), True, "bigjax always scales attention by 1/sqrt(head_dim)")
    require(hf, "add_cross_attention", (False,), False, "bigjax's decoder has no cross-attention")
    d = hf["n_embd"]
    config = config_lib.defaults("gpt", "causal_lm")
    config.model.update(
        vocab_size=hf["vocab_size"],
        max_len=hf["n_positions"],
        num_layers=hf["n_layer"],
        d_model=d,
        num_heads=hf["n_head"],
        num_kv_heads=0,
        head_dim=0,
        mlp_dim=hf.get("n_inner") or 4 * d,
        positions="learned",
        norm="layernorm",
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        mlp=ACTIVATIONS[hf.get("activation_function", "gelu_new")],
        use_bias=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
    )
    return config


def exports(config) -> bool:
    m = config.model
    return (
        m.family == "gpt"
        and config.task.name == "causal_lm"
        and (m.positions, m.norm, m.use_bias) == ("learned", "layernorm", True)
        and m.mlp in ("gelu", "gelu_exact")
        and config_lib.linear_biases(m) == (True, True, True)
    )


def sizes(m):
    return m.num_heads, m.head_dim or m.d_model // m.num_heads, m.d_model


# --------------------------------------------------------------------------------------------------
# Import: bigjax path -> a view of the HF tensors


def layer_tensors(read, i: int, config) -> dict:
    h, hd, d = sizes(config.model)
    p = f"h.{i}."

    def qkv(which: int, part: str):
        fused = read(p + "attn.c_attn." + part)  # weight [d, 3d] (Conv1D is [in, out]); bias [3d]
        width = h * hd
        return fused.columns(which * width, (which + 1) * width).split_axis(len(fused.shape) - 1, (h, hd))

    layer = {
        "attention/out/kernel": read(p + "attn.c_proj.weight").split_axis(0, (h, hd)),
        "attention/out/bias": read(p + "attn.c_proj.bias"),
        "mlp/up/kernel": read(p + "mlp.c_fc.weight"),
        "mlp/up/bias": read(p + "mlp.c_fc.bias"),
        "mlp/down/kernel": read(p + "mlp.c_proj.weight"),
        "mlp/down/bias": read(p + "mlp.c_proj.bias"),
    }
    for which, name in enumerate(("query", "key", "value")):
        for part, leaf in (("weight", "kernel"), ("bias", "bias")):
            layer[f"attention/{name}/{leaf}"] = qkv(which, part)
    for norm, hf_norm in (("attention_norm", "ln_1"), ("mlp_norm", "ln_2")):
        layer[f"{norm}/norm/scale"] = read(f"{p}{hf_norm}.weight")
        layer[f"{norm}/norm/bias"] = read(f"{p}{hf_norm}.bias")
    return layer


def global_tensors(read, config) -> dict:
    tensors = {
        "embed/embedding": read("wte.weight"),
        "position_embed/embedding": read("wpe.weight"),
        "final_norm/norm/scale": read("ln_f.weight"),
        "final_norm/norm/bias": read("ln_f.bias"),
    }
    if not config.model.tie_embeddings:  # an untied model's own output layer: missing, it is an error, never made up
        tensors["unembed/kernel"] = read("lm_head.weight").T
    return tensors


# --------------------------------------------------------------------------------------------------
# Export: bigjax parameters -> HF tensors and config.json


def hf_tensors(params, config, hf_vocab: int) -> dict:
    m = config.model
    h, hd, d = sizes(m)
    out = {}
    for i in range(m.num_layers):
        p = f"transformer.h.{i}."
        q, k, v = (params.layer(i, f"attention/{n}/kernel").reshape(d, h * hd) for n in ("query", "key", "value"))
        out[p + "attn.c_attn.weight"] = np.concatenate([q, k, v], axis=1)
        biases = [params.layer(i, f"attention/{n}/bias").reshape(h * hd) for n in ("query", "key", "value")]
        out[p + "attn.c_attn.bias"] = np.concatenate(biases)
        out[p + "attn.c_proj.weight"] = params.layer(i, "attention/out/kernel").reshape(h * hd, d)
        out[p + "attn.c_proj.bias"] = params.layer(i, "attention/out/bias")
        for name, sub in (("c_fc", "up"), ("c_proj", "down")):
            out[f"{p}mlp.{name}.weight"] = params.layer(i, f"mlp/{sub}/kernel")
            out[f"{p}mlp.{name}.bias"] = params.layer(i, f"mlp/{sub}/bias")
        for name, norm in (("ln_1", "attention_norm"), ("ln_2", "mlp_norm")):
            out[f"{p}{name}.weight"] = params.layer(i, f"{norm}/norm/scale")
            out[f"{p}{name}.bias"] = params.layer(i, f"{norm}/norm/bias")
    out["transformer.wte.weight"] = params["embed/embedding"][:hf_vocab]
    out["transformer.wpe.weight"] = params["position_embed/embedding"]
    out["transformer.ln_f.weight"] = params["final_norm/norm/scale"]
    out["transformer.ln_f.bias"] = params["final_norm/norm/bias"]
    if not m.tie_embeddings:
        out["lm_head.weight"] = params["unembed/kernel"][:, :hf_vocab].T
    return out


def hf_config(config, hf_vocab: int, special: dict) -> dict:
    m = config.model
    return dict(
        architectures=["GPT2LMHeadModel"],
        model_type="gpt2",
        vocab_size=hf_vocab,
        n_positions=m.max_len,
        n_embd=m.d_model,
        n_layer=m.num_layers,
        n_head=m.num_heads,
        n_inner=m.mlp_dim or 4 * m.d_model,
        activation_function="gelu" if m.mlp == "gelu_exact" else "gelu_new",
        layer_norm_epsilon=m.norm_eps,
        tie_word_embeddings=m.tie_embeddings,
        **special,
    )
