"""The Transformer encoder layer BERT and ViT share. transformers names their layers alike, but for where the
self-attention sits (BERT: `attention.self`, ViT: `attention.attention`) and the two LayerNorms (BERT's post-LN
`attention.output.LayerNorm` / `output.LayerNorm`, ViT's pre-LN `layernorm_before` / `layernorm_after`)."""

from __future__ import annotations

import dataclasses

from bigjax.hf.common import HFError


@dataclasses.dataclass(frozen=True)
class Names:
    architecture: str  # as messages say it: "BERT", "ViT"
    attention: str  # the self-attention's q/k/v under a layer
    norms: tuple[str, str]  # the HF names of bigjax's attention_norm and mlp_norm


def check_exportable(m, names: Names, fixed: dict) -> None:
    """Refuse, naming the setting, a model transformers' architecture cannot hold: other `fixed` keys, a SwiGLU
    MLP, grouped or resized heads."""
    for key, value in fixed.items():
        if m[key] != value:
            raise HFError(
                f"config.model.{key}={m[key]!r}: transformers' {names.architecture} has {key}={value!r}; "
                "this run cannot be exported"
            )
    if m.mlp == "swiglu":
        raise HFError(
            f"config.model.mlp='swiglu': transformers' {names.architecture} has a GELU MLP; this run cannot be exported"
        )
    if (m.num_kv_heads or m.num_heads) != m.num_heads or (m.head_dim and m.head_dim * m.num_heads != m.d_model):
        raise HFError(
            f"config.model.num_kv_heads / head_dim: transformers' {names.architecture} has d_model // num_heads per "
            "head and as many key/value heads as heads; this run cannot be exported"
        )


def sizes(m):
    return m.num_heads, m.head_dim or m.d_model // m.num_heads, m.d_model


def layer_tensors(read, p: str, m, names: Names) -> dict:
    """bigjax sub-path -> view, for the layer whose HF names start with `p`."""
    h, hd, _ = sizes(m)

    def linear(name):  # torch's nn.Linear is [out, in]
        return read(p + name + ".weight").T

    layer = {
        "attention/out/kernel": linear("attention.output.dense").split_axis(0, (h, hd)),
        "attention/out/bias": read(p + "attention.output.dense.bias"),
        "mlp/up/kernel": linear("intermediate.dense"),
        "mlp/up/bias": read(p + "intermediate.dense.bias"),
        "mlp/down/kernel": linear("output.dense"),
        "mlp/down/bias": read(p + "output.dense.bias"),
    }
    for name in ("query", "key", "value"):
        layer[f"attention/{name}/kernel"] = linear(f"{names.attention}.{name}").split_axis(1, (h, hd))
        layer[f"attention/{name}/bias"] = read(f"{p}{names.attention}.{name}.bias").split_axis(0, (h, hd))
    for norm, hf_norm in zip(("attention_norm", "mlp_norm"), names.norms, strict=True):
        layer[f"{norm}/norm/scale"] = read(f"{p}{hf_norm}.weight")
        layer[f"{norm}/norm/bias"] = read(f"{p}{hf_norm}.bias")
    return layer


def layer_hf_tensors(params, i: int, p: str, m, names: Names) -> dict:
    """{HF name: array} of layer i, named from `p`: the reverse of layer_tensors."""
    h, hd, d = sizes(m)
    out = {}
    for name in ("query", "key", "value"):
        out[f"{p}{names.attention}.{name}.weight"] = params.layer(i, f"attention/{name}/kernel").reshape(d, h * hd).T
        out[f"{p}{names.attention}.{name}.bias"] = params.layer(i, f"attention/{name}/bias").reshape(h * hd)
    out[p + "attention.output.dense.weight"] = params.layer(i, "attention/out/kernel").reshape(h * hd, d).T
    out[p + "attention.output.dense.bias"] = params.layer(i, "attention/out/bias")
    for name, sub in (("intermediate.dense", "up"), ("output.dense", "down")):
        out[f"{p}{name}.weight"] = params.layer(i, f"mlp/{sub}/kernel").T
        out[f"{p}{name}.bias"] = params.layer(i, f"mlp/{sub}/bias")
    for name, norm in zip(names.norms, ("attention_norm", "mlp_norm"), strict=True):
        out[f"{p}{name}.weight"] = params.layer(i, f"{norm}/norm/scale")
        out[f"{p}{name}.bias"] = params.layer(i, f"{norm}/norm/bias")
    return out
