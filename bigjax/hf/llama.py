"""LlamaForCausalLM, Qwen2ForCausalLM (and MistralForCausalLM without a sliding window) <-> bigjax's GPT family with
RoPE, RMSNorm and SwiGLU.

The three differ in their biases alone: Llama has q/k/v/o biases or none (`attention_bias`) and MLP biases or none
(`mlp_bias`), Qwen2 biases on q/k/v only, Mistral none. RoPE scaling (`linear`, `llama3`, `yarn`) maps onto
model.rope_scaling; transformers 5 writes it in `rope_parameters` with `rope_type`, older configs in `rope_scaling`
with `type` or `rope_type`: both are read, `rope_parameters` is written.

torch's nn.Linear stores [out, in]: transposed. q and k need no permutation: bigjax's rotary is the same
half-rotation (rotate_half) form as transformers'. Grouped-query heads group as transformers' repeat_kv.
"""

from __future__ import annotations

import math

from bigjax import config as config_lib
from bigjax.hf.common import HFError, refuse, require
from bigjax.hf.mapping import TRANSPOSED, Tensor, split

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
EXPORTS = ("LlamaForCausalLM", "Qwen2ForCausalLM")  # Mistral without a window exports as the Llama it is

# The biases (q/k/v, o, MLP) each architecture can have, in the order it is exported as.
LLAMA_BIASES = ((False, False, False), (True, True, False), (False, False, True), (True, True, True))
QWEN2_BIASES = (True, False, False)


def bigjax_config(hf: dict):
    architecture = next(name for name in hf["architectures"] if name in ARCHITECTURES)
    require(hf, "hidden_act", ("silu",), "silu", "bigjax's SwiGLU gates with silu")
    check_attention_window(hf, architecture)
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    theta, scaling = rope_from_hf(hf)
    if architecture == "LlamaForCausalLM":
        attention_bias, mlp_bias = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
        qkv_bias, out_bias = attention_bias, attention_bias
    else:  # Qwen2's q/k/v biases are always there, Mistral has none: neither reads attention_bias or mlp_bias
        qkv_bias, out_bias, mlp_bias = architecture == "Qwen2ForCausalLM", False, False
    config = config_lib.defaults("gpt", "causal_lm")
    config.model.update(
        vocab_size=hf["vocab_size"],
        max_len=hf["max_position_embeddings"],
        num_layers=hf["num_hidden_layers"],
        d_model=hf["hidden_size"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        mlp_dim=hf["intermediate_size"],
        positions="rope",
        rope_theta=theta,
        norm="rmsnorm",
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        mlp="swiglu",
        use_bias=False,
        qkv_bias=qkv_bias,
        out_bias=out_bias,
        mlp_bias=mlp_bias,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )
    config.model.rope_scaling.update(scaling)
    return config


def check_attention_window(hf: dict, architecture: str):
    """bigjax attends to the whole context: a sliding window narrower than the model's positions is refused."""
    if architecture == "Qwen2ForCausalLM":  # a window only with use_sliding_window, on the layers layer_types says
        window = hf.get("sliding_window") if hf.get("use_sliding_window", False) else None
        first, layers = hf.get("max_window_layers", 28), hf["num_hidden_layers"]
        kinds = hf.get("layer_types") or ["sliding_attention" if i >= first else "full" for i in range(layers)]
        if window is not None and window < hf["max_position_embeddings"] and "sliding_attention" in kinds:
            refuse("use_sliding_window", True, f"bigjax attends to the whole context (no {window}-token window)")
    elif hf.get("sliding_window") is not None and hf["sliding_window"] < hf["max_position_embeddings"]:
        refuse("sliding_window", hf["sliding_window"], "bigjax attends to the whole context (no sliding window)")


def rope_from_hf(hf: dict) -> tuple[float, dict]:
    """(rope_theta, config.model.rope_scaling's values) of a config.json, read as transformers reads it: the older
    `rope_scaling` (with `type` or `rope_type`) wins over `rope_parameters`, rope_theta inside it over the top-level
    one, and llama3/yarn's original_max_position_embeddings defaults to max_position_embeddings."""
    field = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    rope = hf.get(field) or {}
    theta = float(rope.get("rope_theta", hf.get("rope_theta", 10_000.0)))
    kind = rope.get("rope_type", rope.get("type", "default"))
    partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        refuse(f"{field}.partial_rotary_factor", partial, "bigjax rotates the whole head dimension")
    if kind == "default":
        return theta, {}
    if kind not in ("linear", "llama3", "yarn"):
        refuse(f"{field}.rope_type", kind, "bigjax scales RoPE as linear, llama3 or yarn only")
    original = hf.get("original_max_position_embeddings") or rope.get(
        "original_max_position_embeddings", hf["max_position_embeddings"]
    )
    factor = rope.get("factor")
    if factor is None and kind == "yarn":  # DeepSeek's way: the ratio of the context lengths
        factor = hf["max_position_embeddings"] / original
    if not isinstance(factor, (int, float)) or factor <= 1:
        refuse(f"{field}.factor", factor, "bigjax scales RoPE by a factor above 1 (1 is no scaling)")
    scaling = dict(type=kind, factor=float(factor))
    if kind == "llama3":
        low, high = rope.get("low_freq_factor"), rope.get("high_freq_factor")
        if not (isinstance(low, (int, float)) and isinstance(high, (int, float)) and 0 < low < high):
            refuse(f"{field}.low_freq_factor", low, f"llama3 needs 0 < low_freq_factor < high_freq_factor={high}")
        scaling.update(original_max_len=int(original), low_freq_factor=float(low), high_freq_factor=float(high))
    elif kind == "yarn":
        if not rope.get("truncate", True):
            refuse(f"{field}.truncate", False, "bigjax's YaRN rounds the ramp's ends to whole pairs (truncate=True)")
        scaling.update(
            original_max_len=int(original),
            beta_fast=float(rope.get("beta_fast") or 32),
            beta_slow=float(rope.get("beta_slow") or 1),
            attention_factor=float(yarn_attention_factor(rope, factor)),
        )
    return theta, scaling


def yarn_attention_factor(rope: dict, factor: float) -> float:
    """YaRN's factor on cos and sin as transformers derives it: given, or DeepSeek's ratio of mscales, or 0 (which
    bigjax takes as YaRN's own 0.1 ln(factor) + 1)."""
    if rope.get("attention_factor") is not None:
        return rope["attention_factor"]
    mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return (0.1 * mscale * math.log(factor) + 1.0) / (0.1 * mscale_all_dim * math.log(factor) + 1.0)
    return 0.0


def exports(config) -> bool:
    m = config.model
    return (
        m.family == "gpt"
        and config.task.name == "causal_lm"
        and (m.positions, m.norm, m.mlp) == ("rope", "rmsnorm", "swiglu")
        and config_lib.linear_biases(m) in (*LLAMA_BIASES, QWEN2_BIASES)
    )


def sizes(m):
    return m.num_heads, m.num_kv_heads or m.num_heads, m.head_dim or m.d_model // m.num_heads, m.d_model


# --------------------------------------------------------------------------------------------------
# The mapping, both ways: bigjax path <-> HF tensor


def layer_table(config, i: int, root: str = "") -> list:
    h, kv, hd, _ = sizes(config.model)
    qkv_bias, out_bias, mlp_bias = config_lib.linear_biases(config.model)
    p = f"model.layers.{i}."
    heads = {"query": h, "key": kv, "value": kv}
    table = [
        *(
            Tensor(f"attention/{name}/kernel", f"{p}self_attn.{name[0]}_proj.weight", (TRANSPOSED, split(1, (n, hd))))
            for name, n in heads.items()
        ),
        Tensor("attention/out/kernel", p + "self_attn.o_proj.weight", (TRANSPOSED, split(0, (h, hd)))),
        *(Tensor(f"mlp/{name}/kernel", f"{p}mlp.{name}_proj.weight", (TRANSPOSED,)) for name in ("gate", "up", "down")),
        Tensor("attention_norm/norm/scale", p + "input_layernorm.weight"),
        Tensor("mlp_norm/norm/scale", p + "post_attention_layernorm.weight"),
    ]
    if qkv_bias:
        table += [
            Tensor(f"attention/{name}/bias", f"{p}self_attn.{name[0]}_proj.bias", (split(0, (n, hd)),))
            for name, n in heads.items()
        ]
    if out_bias:
        table.append(Tensor("attention/out/bias", p + "self_attn.o_proj.bias"))
    if mlp_bias:
        table += [Tensor(f"mlp/{name}/bias", f"{p}mlp.{name}_proj.bias") for name in ("gate", "up", "down")]
    return table


def global_table(config, root: str = "") -> list:
    table = [
        Tensor("embed/embedding", "model.embed_tokens.weight"),
        Tensor("final_norm/norm/scale", "model.norm.weight"),
    ]
    if not config.model.tie_embeddings:  # an untied model's own output layer: missing, it is an error, never made up
        table.append(Tensor("unembed/kernel", "lm_head.weight", (TRANSPOSED,)))
    return table


# --------------------------------------------------------------------------------------------------
# config.json for export


def hf_config(config, hf_vocab: int, special: dict) -> dict:
    """Qwen2ForCausalLM for q/k/v-only biases, LlamaForCausalLM otherwise."""
    m = config.model
    h, kv, hd, _ = sizes(m)
    qkv_bias, out_bias, mlp_bias = biases = config_lib.linear_biases(m)
    if biases == QWEN2_BIASES:
        architecture = dict(
            architectures=["Qwen2ForCausalLM"], model_type="qwen2", use_sliding_window=False, sliding_window=None
        )
    elif biases in LLAMA_BIASES:
        architecture = dict(
            architectures=["LlamaForCausalLM"], model_type="llama", attention_bias=qkv_bias, mlp_bias=mlp_bias
        )
    else:  # exports() said no
        raise HFError(f"biases on q/k/v={qkv_bias}, o={out_bias}, MLP={mlp_bias}: no Hugging Face architecture")
    return dict(
        **architecture,
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
        rope_parameters=rope_parameters(m),
        tie_word_embeddings=m.tie_embeddings,
        **special,
    )


def rope_parameters(m) -> dict:
    """transformers 5's rope_parameters of the model: the rope type with exactly the fields it requires."""
    s = m.rope_scaling
    if s.type == "none":
        return dict(rope_type="default", rope_theta=m.rope_theta)
    fields = dict(rope_type=s.type, rope_theta=m.rope_theta, factor=s.factor)
    if s.type == "llama3":
        fields.update(
            original_max_position_embeddings=s.original_max_len,
            low_freq_factor=s.low_freq_factor,
            high_freq_factor=s.high_freq_factor,
        )
    elif s.type == "yarn":
        fields.update(original_max_position_embeddings=s.original_max_len, beta_fast=s.beta_fast, beta_slow=s.beta_slow)
        if s.attention_factor:
            fields["attention_factor"] = s.attention_factor
    return fields
