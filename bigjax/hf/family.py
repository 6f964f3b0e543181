"""The Hugging Face architectures bigjax maps, one module each. A family module has:

ARCHITECTURES                       the config.json `architectures` it imports
bigjax_config(hf) -> ConfigDict     the bigjax config (family and task) of that model (refuses, naming the field,
                                    what it cannot be)
exports(config) -> bool             whether a bigjax run's config is this family's, for export (may refuse a run of
                                    the family whose settings transformers lacks, naming the setting)
layer_table(config, i, root)        the mapping (bigjax.hf.mapping: bigjax path <-> HF tensor, with the layout
                                    change both ways) of Transformer layer i, by sub-path under the layer
global_table(config, root)          the mapping of everything outside the layers; model-state arrays (BatchNorm
                                    statistics) as COLLECTION/path, e.g. batch_stats/stem_norm/mean. Import and
                                    export both read these two tables: each mapping is written once
hf_config(config, vocab, special)   config.json for transformers (`special`: bos/eos ids that exist)
EXPORTS (optional)                  the architectures export writes, where not just ARCHITECTURES[0]
ROOT (optional)                     the prefix the HF names sit under (`root` above) in what export writes
import_root(read) (optional)        the prefix in the files an import reads, where it may differ from ROOT

Family modules import common, encoder (what BERT and ViT share) and mapping, never each other.
"""

from __future__ import annotations

from bigjax import config as config_lib
from bigjax.hf import bert, gpt2, llama, resnet, vit
from bigjax.hf.common import HFError

FAMILIES = (gpt2, llama, bert, vit, resnet)


def for_architectures(hf: dict):
    names = hf.get("architectures") or []
    for name in names:
        for family in FAMILIES:
            if name in family.ARCHITECTURES:
                return family
    known = ", ".join(name for family in FAMILIES for name in family.ARCHITECTURES)
    raise HFError(f"config.json architectures={names}: bigjax imports {known} only")


def for_config(config):
    for family in FAMILIES:
        if family.exports(config):
            return family
    m, exported = config.model, ", ".join(name for family in FAMILIES for name in exported_architectures(family))
    detail = ""
    if m.family == "gpt":
        qkv, out, mlp = config_lib.linear_biases(m)
        detail = (
            f", positions={m.positions}, norm={m.norm}, mlp={m.mlp}, use_bias={m.use_bias}, biases on "
            f"q/k/v={qkv} o={out} MLP={mlp}"
        )
    raise HFError(
        f"this run ({m.family} {config.task.name}{detail}) is none of the Hugging Face architectures bigjax "
        f"exports ({exported}); GPT-2 has learned positions, layernorm, gelu or gelu_exact and biases everywhere; "
        "Llama rope, rmsnorm, swiglu, biases on all of q/k/v/o or none, on the MLP or not; Qwen2 is Llama with biases "
        "on q/k/v only; a BERT, ViT or ResNet exports as its family's classifier or masked LM"
    )


def exported_architectures(family) -> tuple[str, ...]:
    """What a family's export writes: its EXPORTS where it writes several, else its first architecture."""
    return getattr(family, "EXPORTS", family.ARCHITECTURES[:1])
