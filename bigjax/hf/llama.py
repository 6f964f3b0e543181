"""LlamaForCausalLM, Qwen2ForCausalLM (and MistralForCausalLM without a sliding window), and the mixtures of experts
MixtralForCausalLM and Qwen2MoeForCausalLM <-> bigjax's GPT family with RoPE, RMSNorm and SwiGLU (and model.moe).

The three differ in their biases alone: Llama has q/k/v/o biases or none (`attention_bias`) and MLP biases or none
(`mlp_bias`), Qwen2 biases on q/k/v only, Mistral none. RoPE scaling (`linear`, `llama3`, `yarn`) maps onto
model.rope_scaling; transformers 5 writes it in `rope_parameters` with `rope_type`, older configs in `rope_scaling`
with `type` or `rope_type`: both are read, `rope_parameters` is written.

torch's nn.Linear stores [out, in]: transposed. q and k need no permutation: bigjax's rotary is the same
half-rotation (rotate_half) form as transformers'. Grouped-query heads group as transformers' repeat_kv.

The mixtures of experts are these with a MoE block in place of the MLP (bigjax.models.moe), each expert one HF tensor
per kernel, stacked into bigjax's [experts, ...] kernels (the `index` of the mapping's entries). Mixtral (no biases):
`block_sparse_moe.gate` routes softmax over every expert, top k, renormalised (norm_topk_probs); its experts' w1, w3,
w2 are gate, up, down; every layer is MoE; its router_jitter_noise, a training-time perturbation, is not used.
Qwen2-MoE (biases on q/k/v, or none with qkv_bias=false): `mlp.gate` routes the same way, renormalised as
norm_topk_prob says; a shared expert (of a whole number of experts' width: num_shared_experts) behind a sigmoid gate
(shared_expert_gate); its mlp_only_layers (the first ones only) are first_dense_layers, of intermediate_size.
router_aux_loss_coef is model.moe.router_aux_loss both ways.
"""

from __future__ import annotations

import math

from bigjax import config as config_lib
from bigjax.hf.common import HFError, refuse, require
from bigjax.hf.mapping import TRANSPOSED, Tensor, split

ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "MixtralForCausalLM",
    "Qwen2MoeForCausalLM",
)
# Mistral without a window exports as the Llama it is
EXPORTS = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MixtralForCausalLM", "Qwen2MoeForCausalLM")

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
    elif architecture == "Qwen2MoeForCausalLM":
        qkv_bias, out_bias, mlp_bias = bool(hf.get("qkv_bias", True)), False, False
    else:  # Qwen2's q/k/v biases are always there, Mistral and Mixtral have none; none read attention_bias or mlp_bias
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
    config.model.moe.update(moe_from_hf(hf, architecture))
    return config


def moe_from_hf(hf: dict, architecture: str) -> dict:
    """config.model.moe of a Mixtral or Qwen2-MoE config.json (nothing for the dense architectures)."""
    if architecture == "MixtralForCausalLM":
        return dict(
            num_experts=hf["num_local_experts"],
            experts_per_token=hf["num_experts_per_tok"],
            expert_mlp_dim=hf["intermediate_size"],
            norm_topk_probs=True,
            router_aux_loss=float(hf.get("router_aux_loss_coef", 0.001)),
        )
    if architecture != "Qwen2MoeForCausalLM" or not hf["num_experts"]:
        return {}
    if hf.get("decoder_sparse_step", 1) != 1:
        refuse("decoder_sparse_step", hf["decoder_sparse_step"], "bigjax's MoE layers are consecutive (step 1)")
    dense = list(hf.get("mlp_only_layers") or [])
    if dense != list(range(len(dense))):
        refuse(
            "mlp_only_layers", dense, "bigjax keeps the first layers dense (model.moe.first_dense_layers), no others"
        )
    expert, shared = hf["moe_intermediate_size"], hf["shared_expert_intermediate_size"]
    if shared <= 0 or shared % expert:
        refuse(
            "shared_expert_intermediate_size",
            shared,
            f"bigjax's shared experts are a whole number of experts of moe_intermediate_size={expert}",
        )
    return dict(
        num_experts=hf["num_experts"],
        experts_per_token=hf["num_experts_per_tok"],
        expert_mlp_dim=expert,
        num_shared_experts=shared // expert,
        shared_expert_gate=True,
        first_dense_layers=len(dense),
        norm_topk_probs=bool(hf.get("norm_topk_prob", False)),
        router_aux_loss=float(hf.get("router_aux_loss_coef", 0.001)),
    )


def check_attention_window(hf: dict, architecture: str):
    """bigjax attends to the whole context: a sliding window narrower than the model's positions is refused."""
    if architecture in (
        "Qwen2ForCausalLM",
        "Qwen2MoeForCausalLM",
    ):  # a window only with use_sliding_window, on the layers layer_types says
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
    """Whether the run is a Llama (Qwen2); one of a mixture of experts neither Mixtral nor Qwen2-MoE is refused."""
    m = config.model
    llama = (
        m.family == "gpt"
        and config.task.name == "causal_lm"
        and (m.positions, m.norm, m.mlp) == ("rope", "rmsnorm", "swiglu")
        and config_lib.linear_biases(m) in (*LLAMA_BIASES, QWEN2_BIASES)
    )
    if llama and is_moe(m) and (refusal := moe_refusal(m)):
        raise HFError(
            f"this run is a mixture of experts that is neither Mixtral nor Qwen2-MoE: {refusal}; bigjax cannot "
            "export it for transformers"
        )
    return llama


def is_moe(m) -> bool:
    return bool(m.get("moe", {}).get("num_experts"))


def moe_refusal(m) -> str | None:
    """Why the mixture of experts of model config `m` is neither Qwen2-MoE (gated shared experts, biases on q/k/v or
    none) nor Mixtral (no biases, no shared experts, renormalised picks, every layer MoE); None when it is one."""
    e, biases = m.moe, config_lib.linear_biases(m)
    if e.shared_expert_gate:
        if biases not in (QWEN2_BIASES, LLAMA_BIASES[0]):
            return f"model biases on (q/k/v, o, MLP)={biases}: Qwen2-MoE has biases on q/k/v or none"
        return None
    if e.num_shared_experts:
        return (
            f"model.moe.num_shared_experts={e.num_shared_experts} without shared_expert_gate: Mixtral has no shared "
            "experts and Qwen2-MoE gates them (shared_expert_gate=True)"
        )
    wrong = {"norm_topk_probs": (e.norm_topk_probs, True), "first_dense_layers": (e.first_dense_layers, 0)}
    wrong = {key: values for key, values in wrong.items() if values[0] != values[1]}
    if wrong:
        return ", ".join(f"model.moe.{key}={ours} (Mixtral's: {theirs})" for key, (ours, theirs) in wrong.items())
    if biases != LLAMA_BIASES[0]:
        return f"model biases on (q/k/v, o, MLP)={biases}: Mixtral has none"
    return None


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
    if is_moe(config.model) and i >= config.model.moe.first_dense_layers:
        return table + moe_table(config.model.moe, p)
    table += [
        Tensor(f"mlp/{name}/kernel", f"{p}mlp.{name}_proj.weight", (TRANSPOSED,)) for name in ("gate", "up", "down")
    ]
    if mlp_bias:
        table += [Tensor(f"mlp/{name}/bias", f"{p}mlp.{name}_proj.bias") for name in ("gate", "up", "down")]
    return table


def moe_table(e, p: str) -> list:
    """A MoE layer's MLP (`p`: the layer's HF prefix): Qwen2-MoE's names where its shared experts are gated, else
    Mixtral's. Each expert's kernel is its own HF tensor, stacked in order into bigjax's [experts, ...] kernel."""
    if e.shared_expert_gate:
        block, expert_names = p + "mlp.", dict(gate="gate_proj", up="up_proj", down="down_proj")
    else:
        block, expert_names = p + "block_sparse_moe.", dict(gate="w1", up="w3", down="w2")
    table = [Tensor("mlp/router/kernel", block + "gate.weight", (TRANSPOSED,))]
    table += [
        Tensor(f"mlp/experts/{name}", f"{block}experts.{j}.{hf_name}.weight", (TRANSPOSED,), index=j)
        for name, hf_name in expert_names.items()
        for j in range(e.num_experts)
    ]
    if e.num_shared_experts:
        table += [
            Tensor(f"mlp/shared/{name}/kernel", f"{block}shared_expert.{name}_proj.weight", (TRANSPOSED,))
            for name in ("gate", "up", "down")
        ]
    if e.shared_expert_gate:
        table.append(Tensor("mlp/shared_gate/kernel", block + "shared_expert_gate.weight", (TRANSPOSED,)))
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
    """Qwen2ForCausalLM for q/k/v-only biases, LlamaForCausalLM otherwise; a mixture of experts Qwen2MoeForCausalLM
    or MixtralForCausalLM (moe_fields)."""
    m = config.model
    h, kv, hd, _ = sizes(m)
    qkv_bias, out_bias, mlp_bias = biases = config_lib.linear_biases(m)
    if is_moe(m):
        architecture = moe_fields(m)
    elif biases == QWEN2_BIASES:
        architecture = dict(
            architectures=["Qwen2ForCausalLM"], model_type="qwen2", use_sliding_window=False, sliding_window=None
        )
    elif biases in LLAMA_BIASES:
        architecture = dict(
            architectures=["LlamaForCausalLM"], model_type="llama", attention_bias=qkv_bias, mlp_bias=mlp_bias
        )
    else:  # exports() said no
        raise HFError(f"biases on q/k/v={qkv_bias}, o={out_bias}, MLP={mlp_bias}: no Hugging Face architecture")
    return (
        dict(
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
        | architecture
    )


def moe_fields(m) -> dict:
    """config.json's fields of a Qwen2-MoE (gated shared experts) or a Mixtral, as exports() checked it is one."""
    e = m.moe
    expert_dim = e.expert_mlp_dim or m.mlp_dim
    common = dict(num_experts_per_tok=e.experts_per_token, router_aux_loss_coef=e.router_aux_loss)
    if e.shared_expert_gate:
        return common | dict(
            architectures=["Qwen2MoeForCausalLM"],
            model_type="qwen2_moe",
            num_experts=e.num_experts,
            moe_intermediate_size=expert_dim,
            shared_expert_intermediate_size=e.num_shared_experts * expert_dim,
            norm_topk_prob=e.norm_topk_probs,
            mlp_only_layers=list(range(e.first_dense_layers)),
            decoder_sparse_step=1,
            qkv_bias=config_lib.linear_biases(m)[0],
            use_sliding_window=False,
            sliding_window=None,
        )
    return common | dict(
        architectures=["MixtralForCausalLM"],
        model_type="mixtral",
        num_local_experts=e.num_experts,
        intermediate_size=expert_dim,
        sliding_window=None,
        router_jitter_noise=0.0,
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
