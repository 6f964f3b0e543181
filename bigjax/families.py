"""Model families: the one table of what each family is and what it can be trained for.

    family = FAMILIES["vit"]
    family.defaults()            the keys of config.model, with their defaults: the family's config schema
    family.kind                  "text" (reads tokens) or "image" (reads pixels)
    family.tasks                 the config.task.name values it serves
    family.deploys               {export format: the tasks it exports for}, for `bigjax export --format onnx|stablehlo`
    family.models()              its module in bigjax/models, imported when first asked for; every family's
                                 module has `make_classifier(model_config, num_classes, ...)`

The config schema and checks, `tasks.make_task`, the classification task and the data pipeline all read this
table, so a family is known in one place. It imports nothing of bigjax at load time (config.py imports it, and
the models import config.py), only its models module when asked.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from types import ModuleType


def transformer_keys() -> dict:
    """The keys of a Transformer stack, shared by every family built from one (GPT, BERT, ViT)."""
    return dict(
        num_layers=2,
        d_model=128,
        num_heads=4,
        num_kv_heads=0,  # 0 = num_heads (multi-head); fewer = grouped-query attention
        head_dim=0,  # 0 = d_model // num_heads
        mlp_dim=0,  # 0 = 4 * d_model (gelu) or the Llama 8/3 rule rounded to 256 (swiglu)
        norm="layernorm",  # layernorm | rmsnorm
        norm_eps=1e-5,
        # LayerNorm's variance: one_pass, E[x^2]-E[x]^2 (Flax's) | two_pass, E[(x-E[x])^2] (torch's: imported models)
        norm_variance="one_pass",
        mlp="gelu",  # gelu (tanh approximation, GPT-2's) | gelu_exact (erf: BERT's, ViT's) | swiglu
        use_bias=True,  # biases on the norms and every projection (unless a switch below says otherwise)
        qkv_bias=None,  # biases on the query/key/value projections: True | False | None = use_bias (Qwen2: True)
        out_bias=None,  # a bias on the attention output projection: True | False | None = use_bias
        mlp_bias=None,  # biases on the MLP's projections: True | False | None = use_bias
        dropout=0.0,
        dtype="float32",  # compute dtype: bfloat16 on accelerators
        param_dtype="float32",
        attention="xla",  # xla | cudnn | auto
        scan_layers=True,
        remat="none",  # none | full | dots | dots_no_batch
        init_std=0.02,
    )


def text_keys() -> dict:
    """The keys of the Transformer families that read tokens (GPT, BERT): vocabulary, positions, output layer."""
    return dict(
        vocab_size=260,  # >= the tokenizer's (bytes: 256 + 4 special tokens); padded up to vocab_multiple
        vocab_multiple=128,
        max_len=128,  # longest sequence the positions support
        positions="learned",  # learned | rope
        rope_theta=10_000.0,
        rope_scaling=rope_scaling(),
        tie_embeddings=True,
    )


def rope_scaling() -> dict:
    """How rotary frequencies are stretched for a longer context than pretraining's (positions=rope), as transformers
    computes them: `linear` divides every frequency by factor; `llama3` (Llama 3.1 and later) divides the low
    frequencies by factor, keeps the high ones and blends between; `yarn` does the same by how often each pair turns
    within original_max_len, and scales cos and sin by attention_factor."""
    return dict(
        type="none",  # none | linear | llama3 | yarn
        factor=1.0,  # linear, llama3, yarn: > 1
        original_max_len=0,  # llama3, yarn: the context length of pretraining (> 0)
        low_freq_factor=1.0,  # llama3: wavelengths above original_max_len / low_freq_factor are divided by factor
        high_freq_factor=4.0,  # llama3: those below original_max_len / high_freq_factor are kept
        beta_fast=32.0,  # yarn: pairs turning more often than this within original_max_len are kept
        beta_slow=1.0,  # yarn: pairs turning less often than this are divided by factor
        attention_factor=0.0,  # yarn: cos and sin are multiplied by it; 0 = 0.1 * ln(factor) + 1
    )


def gpt_model() -> dict:
    """The decoder-only Transformer (GPT-2 and Llama are both settings of it)."""
    return dict(
        family="gpt",
        **text_keys(),
        **transformer_keys(),
        # How attention sees the whole sequence where config.mesh.context splits it (bigjax.parallel.context):
        # all_gather (each device gathers all keys and values) | ring (blocks of them pass from device to device)
        context_parallel="all_gather",
        # How config.mesh.stage > 1 pipelines the layers (bigjax.parallel.pipeline): micro-batches per step (0 = one
        # per stage), schedule gpipe | circular, and (circular) passes round the stages, each stage holding that many
        # groups of layers
        pipeline=dict(microbatches=0, schedule="gpipe", repeats=1),
        moe=moe_keys(),
    )


def moe_keys() -> dict:
    """A mixture of experts in place of the MLP (bigjax.models.moe); num_experts=0 keeps the dense MLP."""
    return dict(
        num_experts=0,  # routed experts per MoE layer; 0 = no MoE
        experts_per_token=2,  # top-k: the experts each token goes through
        expert_mlp_dim=0,  # each expert's hidden width; 0 = model.mlp_dim
        num_shared_experts=0,  # experts every token goes through besides its k (DeepSeek, Qwen-MoE)
        first_dense_layers=0,  # the first layers keep a dense MLP (DeepSeek-V3: 3)
        capacity_factor=0.0,  # 0 = dropless; c > 0: each expert takes at most c * tokens * k / E picks, the rest drop
        router_aux_loss=0.01,  # weight of the load-balancing loss (Switch/GShard; balanced routing gives k)
        router_z_loss=0.0,  # weight of the router z-loss (ST-MoE)
        norm_topk_probs=True,  # renormalise the k picked probabilities to sum to 1 (Mixtral: yes)
        shared_expert_gate=False,  # the shared experts' output times sigmoid(x . w), w learned (Qwen2-MoE)
    )


def bert_model() -> dict:
    """The bidirectional encoder (BERT): the Transformer keys plus where the LayerNorms go and token types."""
    return dict(
        family="bert",
        **text_keys(),
        **transformer_keys(),
        norm_position="post",  # post (BERT) | pre
        type_vocab_size=0,  # token-type (sentence A/B) embeddings; 0 = none
        # How attention sees the whole sequence where config.mesh.context splits it, as gpt's (bidirectional: the
        # rows stay in order, data.context_load_balance reorders only a causal LM's)
        context_parallel="all_gather",
    )


def vit_model() -> dict:
    """The Vision Transformer: patches of the image through a bidirectional Transformer stack, then a head."""
    return dict(
        family="vit",
        patch_size=4,  # config.data.image_size must be a multiple of it
        pooling="cls",  # cls (a class token) | gap (global average of the patch outputs)
        position_embedding="learned",  # learned | sincos2d (fixed)
        **transformer_keys(),
    )


def conv_keys() -> dict:
    """The keys the convolutional families share: their norms and dtypes."""
    return dict(
        normalization="batchnorm",  # batchnorm | groupnorm | none
        norm_groups=32,  # groupnorm: groups per layer; must divide every layer's channels
        bn_momentum=0.9,  # batchnorm: running statistics = momentum * old + (1 - momentum) * batch
        # batchnorm: normalize with the fixed running statistics in training too (a frozen backbone's features
        # then stay those it was trained with)
        freeze_batch_stats=False,
        norm_eps=1e-5,
        dtype="float32",
        param_dtype="float32",
    )


def resnet_model() -> dict:
    """ResNet v1.5 (the stride in the 3x3 convolution), basic blocks for 18/34, bottlenecks from 50."""
    return dict(
        family="resnet",
        depth=50,  # 10 | 18 | 34 | 50 | 101 | 152
        width=64,  # channels of the first stage; each later stage doubles them
        stem="imagenet",  # imagenet (7x7/2 conv + 3x3/2 max-pool) | cifar (one 3x3/1 conv, for small images)
        # same (XLA's SAME: a strided layer's extra padding at the end, as Flax's ImageNet example) | symmetric
        # (kernel//2 on every side, as torchvision and transformers' ResNet: imported models)
        conv_padding="same",
        zero_init_residual=True,  # each block's last norm scale starts at 0: every block starts as the identity
        scan_layers=True,  # scan over the identical blocks of each stage: one compiled block per stage
        remat="none",  # none | full | dots | dots_no_batch
        **conv_keys(),
    )


def cnn_model() -> dict:
    """The small CNN of the Flax MNIST tutorial: conv-relu-avgpool twice, then two Dense layers."""
    return dict(
        family="cnn",
        features=(32, 64),  # channels of each conv layer (each followed by a 2x2 average pool)
        hidden_dim=256,
        dropout=0.0,  # before the head
        **{**conv_keys(), "normalization": "none"},  # the tutorial has no norm
    )


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    defaults: Callable[[], dict]  # config.model's keys with their defaults
    kind: str  # "text" | "image": what the data pipeline feeds it
    tasks: tuple[str, ...]  # the config.task.name values it serves
    # {`bigjax export --format`: the tasks exported in it} for the serving formats (bigjax.deploy). The hf format
    # is decided by bigjax.hf, per Hugging Face architecture (a run's settings may have none).
    deploys: dict = dataclasses.field(default_factory=dict)

    def models(self) -> ModuleType:
        """bigjax.models.NAME, imported only now: building a config must not import Flax models."""
        return importlib.import_module(f"bigjax.models.{self.name}")


FAMILIES = {
    family.name: family
    for family in (
        Family(
            "gpt",
            gpt_model,
            kind="text",
            tasks=("causal_lm", "classification"),
            deploys={"onnx": ("causal_lm",), "stablehlo": ("causal_lm",)},
        ),
        Family("bert", bert_model, kind="text", tasks=("masked_lm", "classification")),
        Family("vit", vit_model, kind="image", tasks=("classification",), deploys={"onnx": ("classification",)}),
        Family("resnet", resnet_model, kind="image", tasks=("classification",), deploys={"onnx": ("classification",)}),
        Family("cnn", cnn_model, kind="image", tasks=("classification",), deploys={"onnx": ("classification",)}),
    )
}
DEFAULT_FAMILY, DEFAULT_TASK = "gpt", "causal_lm"  # a config that names neither (older workdirs' included)

# `bigjax export --format`: what each writes.
EXPORT_FORMATS = {
    "hf": "config.json + safetensors (transformers)",
    "onnx": "the forward pass for onnxruntime",
    "stablehlo": "jax.export of the prefill and the KV-cache decode step",
}


def family_and_task(model, task) -> tuple[str, str]:
    """The family and the task a config's `model` and `task` sections name (dicts or ConfigDicts): the defaults
    where they name none, or are no sections at all (a bad config, which the schema check then refuses)."""
    family = model.get("family", DEFAULT_FAMILY) if hasattr(model, "get") else DEFAULT_FAMILY
    return family, task.get("name", DEFAULT_TASK) if hasattr(task, "get") else DEFAULT_TASK


def serving(task: str) -> list[str]:
    """The families that can be trained for `task`."""
    return [name for name, family in FAMILIES.items() if task in family.tasks]


def is_image(family: str) -> bool:
    return family in FAMILIES and FAMILIES[family].kind == "image"


def is_text(family: str) -> bool:
    """Whether the family reads tokens (it has a vocabulary and a tokenizer)."""
    return family in FAMILIES and FAMILIES[family].kind == "text"


def deploys(family: str, task: str, fmt: str) -> bool:
    """Whether a `family` model trained for `task` exports in the serving format `fmt` (onnx, stablehlo)."""
    return family in FAMILIES and task in FAMILIES[family].deploys.get(fmt, ())


def deployed_in(fmt: str) -> str:
    """The runs the serving format `fmt` exports, for messages: 'gpt causal_lm, vit classification, ...'."""
    return ", ".join(f"{name} {task}" for name, family in FAMILIES.items() for task in family.deploys.get(fmt, ()))


def export_help() -> str:
    """`bigjax export --format`'s help: each format, and the runs it exports."""
    runs = {fmt: deployed_in(fmt) or "the Hugging Face architectures bigjax.hf maps" for fmt in EXPORT_FORMATS}
    return "; ".join(f"{fmt}: {what} ({runs[fmt]})" for fmt, what in EXPORT_FORMATS.items())
