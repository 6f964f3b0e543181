"""GPT2LMHeadModel <-> bigjax's GPT family with learned positions, LayerNorm, a GELU (the tanh form, GPT-2's own, or
the exact one) and biases.

GPT-2's Conv1D weights are already [in, out], as bigjax's kernels; its attention fuses q|k|v into one c_attn,
split here into three (no transposing).
"""

from __future__ import annotations

from bigjax import config as config_lib
from bigjax.hf.common import require
from bigjax.hf.mapping import TRANSPOSED, Fused, Tensor, split

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
# The mapping, both ways: bigjax path <-> HF tensor

ROOT = "transformer."  # GPT2LMHeadModel's prefix, which the original gpt2 files lack (files.TensorReader finds either)


def import_root(read) -> str:
    return ""  # the names as the original files have them (what an import's errors name): the reader adds ROOT


def layer_table(config, i: int, root: str = ROOT) -> list:
    h, hd, _ = sizes(config.model)
    p = f"{root}h.{i}."
    qkv = tuple(f"attention/{name}" for name in ("query", "key", "value"))
    table = [
        Tensor("attention/out/kernel", p + "attn.c_proj.weight", (split(0, (h, hd)),)),
        Tensor("attention/out/bias", p + "attn.c_proj.bias"),
    ]
    for hf, sub in (("c_fc", "up"), ("c_proj", "down")):
        table += [Tensor(f"mlp/{sub}/kernel", f"{p}mlp.{hf}.weight"), Tensor(f"mlp/{sub}/bias", f"{p}mlp.{hf}.bias")]
    table += [  # c_attn fuses q|k|v: weight [d, 3d] (Conv1D is [in, out], as bigjax's kernels), bias [3d]
        Fused(tuple(f"{path}/kernel" for path in qkv), p + "attn.c_attn.weight", (split(1, (h, hd)),)),
        Fused(tuple(f"{path}/bias" for path in qkv), p + "attn.c_attn.bias", (split(0, (h, hd)),)),
    ]
    for hf, norm in (("ln_1", "attention_norm"), ("ln_2", "mlp_norm")):
        table += [Tensor(f"{norm}/norm/scale", f"{p}{hf}.weight"), Tensor(f"{norm}/norm/bias", f"{p}{hf}.bias")]
    return table


def global_table(config, root: str = ROOT) -> list:
    table = [
        Tensor("embed/embedding", root + "wte.weight"),
        Tensor("position_embed/embedding", root + "wpe.weight"),
        Tensor("final_norm/norm/scale", root + "ln_f.weight"),
        Tensor("final_norm/norm/bias", root + "ln_f.bias"),
    ]
    if not config.model.tie_embeddings:  # an untied model's own output layer: missing, it is an error, never made up
        table.append(Tensor("unembed/kernel", "lm_head.weight", (TRANSPOSED,)))
    return table


# --------------------------------------------------------------------------------------------------
# config.json for export


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
