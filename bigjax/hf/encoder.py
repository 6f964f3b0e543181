"""What BERT and ViT share: the Transformer encoder layer's mapping, the GELU names, the export refusals.
transformers names their layers alike, but for where the self-attention sits (BERT: `attention.self`, ViT:
`attention.attention`) and the two LayerNorms (BERT's post-LN `attention.output.LayerNorm` / `output.LayerNorm`,
ViT's pre-LN `layernorm_before` / `layernorm_after`)."""

from __future__ import annotations

import dataclasses

from bigjax.hf.common import HFError
from bigjax.hf.mapping import TRANSPOSED, Tensor, split

# transformers' hidden_act -> bigjax's model.mlp: "gelu" is the exact (erf) GELU, the others the tanh approximation
ACTIVATIONS = {"gelu": "gelu_exact", "gelu_new": "gelu", "gelu_pytorch_tanh": "gelu"}


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


def layer_table(p: str, m, names: Names) -> list:
    """The mapping of the layer whose HF names start with `p`."""
    h, hd, _ = sizes(m)
    table = [
        Tensor("attention/out/kernel", p + "attention.output.dense.weight", (TRANSPOSED, split(0, (h, hd)))),
        Tensor("attention/out/bias", p + "attention.output.dense.bias"),
    ]
    for name in ("query", "key", "value"):
        table.append(
            Tensor(f"attention/{name}/kernel", f"{p}{names.attention}.{name}.weight", (TRANSPOSED, split(1, (h, hd))))
        )
        table.append(Tensor(f"attention/{name}/bias", f"{p}{names.attention}.{name}.bias", (split(0, (h, hd)),)))
    for hf, sub in (("intermediate.dense", "up"), ("output.dense", "down")):
        table.append(Tensor(f"mlp/{sub}/kernel", f"{p}{hf}.weight", (TRANSPOSED,)))
        table.append(Tensor(f"mlp/{sub}/bias", f"{p}{hf}.bias"))
    for norm, hf in zip(("attention_norm", "mlp_norm"), names.norms, strict=True):
        table += [Tensor(f"{norm}/norm/scale", f"{p}{hf}.weight"), Tensor(f"{norm}/norm/bias", f"{p}{hf}.bias")]
    return table
