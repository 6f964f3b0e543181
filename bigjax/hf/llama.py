"""LlamaForCausalLM (and MistralForCausalLM without a sliding window) <-> bigjax's GPT family with RoPE, RMSNorm,
SwiGLU and no biases.

torch's nn.Linear stores [out, in]: transposed here. q and k need no permutation: bigjax's rotary is the same
half-rotation (rotate_half) form as transformers'. Grouped-query heads group as transformers' repeat_kv.
"""

from __future__ import annotations

from bigjax import config as config_lib
from bigjax.hf.common import refuse, require

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")


def bigjax_config(hf: dict):
    require(hf, "hidden_act", ("silu",), "silu", "bigjax's SwiGLU gates with silu")
    require(hf, "attention_bias", (False,), False, "bigjax's Llama has no attention biases")
    require(hf, "mlp_bias", (False,), False, "bigjax's Llama has no MLP biases")
    require(hf, "rope_scaling", (None,), None, "bigjax has the plain RoPE only (no scaled RoPE)")
    if hf.get("sliding_window") is not None and hf["sliding_window"] < hf["max_position_embeddings"]:
        refuse("sliding_window", hf["sliding_window"], "bigjax attends to the whole context (no sliding window)")
    rope = hf.get("rope_parameters") or {}  # transformers >= 5 writes rope_theta (and any scaling) here
    if rope.get("rope_type", "default") != "default":
        refuse("rope_parameters.rope_type", rope["rope_type"], "bigjax has the plain RoPE only (no scaled RoPE)")
    heads = hf["num_attention_heads"]
    config = config_lib.defaults("gpt", "causal_lm")
    config.model.update(
        vocab_size=hf["vocab_size"],
        max_len=hf["max_position_embeddings"],
        num_layers=hf["num_hidden_layers"],
        d_model=hf["hidden_size"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        mlp_dim=hf["intermediate_size"],
        positions="rope",
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10_000.0))),
        norm="rmsnorm",
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        mlp="swiglu",
        use_bias=False,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )
    return config


def exports(config) -> bool:
    m = config.model
    return (
        m.family == "gpt"
        and config.task.name == "causal_lm"
        and (m.positions, m.norm, m.mlp, m.use_bias) == ("rope", "rmsnorm", "swiglu", False)
    )


def sizes(m):
    return m.num_heads, m.num_kv_heads or m.num_heads, m.head_dim or m.d_model // m.num_heads, m.d_model


# --------------------------------------------------------------------------------------------------
# Import: bigjax path -> a view of the HF tensors


def layer_tensors(read, i: int, config) -> dict:
    h, kv, hd, d = sizes(config.model)
    p = f"model.layers.{i}."

    def linear(name):  # torch's nn.Linear is [out, in]
        return read(p + name + ".weight").T

    return {
        "attention/query/kernel": linear("self_attn.q_proj").split_axis(1, (h, hd)),
        "attention/key/kernel": linear("self_attn.k_proj").split_axis(1, (kv, hd)),
        "attention/value/kernel": linear("self_attn.v_proj").split_axis(1, (kv, hd)),
        "attention/out/kernel": linear("self_attn.o_proj").split_axis(0, (h, hd)),
        "mlp/gate/kernel": linear("mlp.gate_proj"),
        "mlp/up/kernel": linear("mlp.up_proj"),
        "mlp/down/kernel": linear("mlp.down_proj"),
        "attention_norm/norm/scale": read(p + "input_layernorm.weight"),
        "mlp_norm/norm/scale": read(p + "post_attention_layernorm.weight"),
    }


def global_tensors(read, config) -> dict:
    tensors = {
        "embed/embedding": read("model.embed_tokens.weight"),
        "final_norm/norm/scale": read("model.norm.weight"),
    }
    if read.has("lm_head.weight"):  # a tied model has no output layer of its own
        tensors["unembed/kernel"] = read("lm_head.weight").T
    return tensors


# --------------------------------------------------------------------------------------------------
# Export: bigjax parameters -> HF tensors and config.json


def hf_tensors(params, config, hf_vocab: int) -> dict:
    m = config.model
    h, kv, hd, d = sizes(m)
    out = {}
    for i in range(m.num_layers):
        p = f"model.layers.{i}."
        out[p + "self_attn.q_proj.weight"] = params.layer(i, "attention/query/kernel").reshape(d, h * hd).T
        out[p + "self_attn.k_proj.weight"] = params.layer(i, "attention/key/kernel").reshape(d, kv * hd).T
        out[p + "self_attn.v_proj.weight"] = params.layer(i, "attention/value/kernel").reshape(d, kv * hd).T
        out[p + "self_attn.o_proj.weight"] = params.layer(i, "attention/out/kernel").reshape(h * hd, d).T
        for name in ("gate", "up", "down"):
            out[f"{p}mlp.{name}_proj.weight"] = params.layer(i, f"mlp/{name}/kernel").T
        out[p + "input_layernorm.weight"] = params.layer(i, "attention_norm/norm/scale")
        out[p + "post_attention_layernorm.weight"] = params.layer(i, "mlp_norm/norm/scale")
    out["model.embed_tokens.weight"] = params["embed/embedding"][:hf_vocab]
    out["model.norm.weight"] = params["final_norm/norm/scale"]
    if not m.tie_embeddings:
        out["lm_head.weight"] = params["unembed/kernel"][:, :hf_vocab].T
    return out


def hf_config(config, hf_vocab: int, special: dict) -> dict:
    m = config.model
    h, kv, hd, _ = sizes(m)
    return dict(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        vocab_size=hf_vocab,
        max_position_embeddings=m.max_len,
        hidden_size=m.d_model,
        num_hidden_layers=m.num_layers,
        num_attention_heads=h,
        num_key_value_heads=kv,
        head_dim=hd,
        intermediate_size=m.mlp_dim,
        hidden_act="silu",
        rms_norm_eps=m.norm_eps,
        rope_theta=m.rope_theta,
        rope_parameters=dict(rope_type="default", rope_theta=m.rope_theta),
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=m.tie_embeddings,
        **special,
    )
