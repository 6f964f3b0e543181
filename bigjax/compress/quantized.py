"""Quantized weights and low-rank adapters through Qwix (Google's JAX quantization library, which MaxText uses):
the rules that say which layers hold integers or adapters, the model that runs them, and the float <-> integer
conversion of a parameter tree.

    model = quantized(GPT(cfg), config)                 # the same module when config.quant and config.lora are off
    abstract = jax.eval_shape(model.init, rng, tokens)  # kernels are now {qvalue: int8/int4, scale: float32}
    params = quantize_params(float_params, abstract)    # a trained float tree in that form
    logits = model.apply({"params": params}, tokens)

`config.quant` (bigjax.config.defaults) is the one description of a quantization and `config.lora` of the adapters,
written into a run's config.json, so that every command that builds the model from that config builds the same one.
Four models come out of them, each through its Qwix provider:

* post-training quantization (`quant.bits` set, `quant.qat=False`, no LoRA; a workdir of `bigjax quantize`):
  integer kernels run, never trained (`PtqProvider`).
* quantization-aware training (`quant.qat=True`): float kernels, trained, whose forward pass rounds them to the
  integer grid as `quant` says and whose gradient passes the rounding straight through (`QtProvider`, the same
  rules). `bigjax quantize` then turns the trained run into integers. The int4 tiling of a kernel contracted over
  two axes (attention's output projection) is along its first such axis in QAT and its last in PTQ (Qwix's
  choices), so for int4 the two differ there; int8 is per channel in both.
* LoRA (`lora.rank` > 0): the kernels of the targeted layers frozen, and beside each a pair of trained low-rank
  matrices `kernel_lora_a` [inputs, rank] and `kernel_lora_b` [rank, outputs] whose product, times alpha/rank, is
  added to its output (`LoraProvider`). B starts at zero, so a LoRA run starts as its base model.
* QLoRA (`lora.rank` > 0 and `quant.bits` set): LoRA over integer base kernels (every quantized layer, targeted or
  not, as in the QLoRA paper): the base is stored and run as integers, the adapters stay float.

* bits=8: int8 kernels with one float32 scale per output channel (absmax, symmetric: w ~ q * scale).
* bits=4: int4 kernels with one scale per `sub_channel` input channels of each output channel (sub-channel: a
  4-bit grid is too coarse for one scale over a whole input dimension). `sub_channel` must divide the input
  channels of every quantized kernel (the last contracted axis, as Qwix tiles it); otherwise one error names it.
* mode=weight_only: activations stay in the compute dtype; the integer kernel is scaled back inside the matmul.
  mode=dynamic: activations are also quantized to int8 at run time, per token (an integer x integer matmul where
  the backend has one).

What stays float (and gets no adapter), and why:

* token, position and token-type embeddings: a table lookup, not a matmul; Qwix quantizes the operands of
  matmuls and convolutions only. With tied embeddings the output layer is the same table.
* the output layers (an untied `unembed`, the classifiers' `classifier`/`head` and BERT's `pooler` before it):
  their errors go straight into the logits, and they are one matrix among many (the classic recipe keeps the first
  and last layers float). A classifier's new head is trained whole in a LoRA run instead (`lora.train`), so it must
  be float in QLoRA too.
* norms and biases: vectors, a rounding error of the size, and the norms are precision-sensitive.
* attention's own products (q.k and the weighted sum of v): activations against activations, not weights.
* convolutions (ViT's patch embedding, the CNN's and ResNet's layers): Qwix's PTQ quantizes a convolution only
  together with its input at the same type (`PtqProvider.conv_general_dilated` refuses a weight-only one), and
  the first layer, which sees pixels, is kept float by every recipe anyway. The CNN's Dense layer is quantized.

Scanned layers: a kernel of `nn.scan`ned blocks is stacked [layers, ...]; Qwix computes how to quantize one layer's
kernel, so `quantize_params` maps that over the leading `layers` axis (named by the scan's partitioning metadata).
Every integer array keeps its kernel's logical axis names, each scale those of the axes it spans, and each adapter
those of the kernel's axes it keeps (Qwix carries them over), so these trees are sharded by the same rules as the
float one and restore onto any mesh.
"""

from __future__ import annotations

import contextlib
import re

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from bigjax import params as params_lib
from bigjax.config import ConfigError

# Module names (the last part of a module path) whose matmuls stay float; see the module docstring for why.
FLOAT_MODULES = ("embed", "position_embed", "token_type_embed", "unembed", "classifier", "head", "pooler", "attention")
QUANTIZED_OPS = ("dot_general", "einsum")  # Dense and Einsum layers; not conv_general_dilated (docstring)
SCAN_AXIS = "layers"  # the logical name nn.scan gives the stacking axis (bigjax.models.layers.remat_and_scan)


def is_on(quant) -> bool:
    return bool(quant is not None and quant.bits)


def lora_on(config) -> bool:
    lora = config.get("lora")
    return bool(lora is not None and lora.rank)


def holds_integers(config) -> bool:
    """Are the run's quantized kernels integer arrays (post-training quantization, QLoRA's base), rather than the
    float kernels of quantization-aware training?"""
    quant = config.get("quant")
    return is_on(quant) and not quant.qat


def inference_only(config) -> bool:
    """A workdir of `bigjax quantize`: integer weights with nothing to train (QLoRA trains its adapters)."""
    return holds_integers(config) and not lora_on(config)


def check_lora(config, abstract_params) -> None:
    """The targets must reach some layer, lora.train must not name integers (QLoRA's base), and no adapter may be
    frozen (config.freeze): one error line each."""
    if not lora_on(config):
        return
    names = params_lib.by_path(abstract_params)
    adapters = [name for name in names if re.search(params_lib.ADAPTERS, name)]
    if not adapters:
        kernels = sorted({name.rpartition("/")[0] for name in names if name.endswith("kernel")})
        raise ConfigError(
            f"config.lora.targets={config.lora.targets!r} matches no layer that takes adapters (the matmuls of "
            f"{listed(kernels, 8)}; embeddings, output layers, heads and "
            "convolutions take none); change the targets"
        )
    check_rank(config.lora.rank, names, adapters)
    integers = [
        name
        for name in params_lib.trained_whole(abstract_params, config)
        if not jnp.issubdtype(names[name].dtype, jnp.floating)
    ]
    if integers:
        raise ConfigError(
            f"config.lora.train={config.lora.train!r} names {listed(integers)}, held as int{config.quant.bits} in "
            "this QLoRA run: integers do not train. Name only float parameters "
            "(the heads, norms, embeddings), or leave those layers out of the quantization (config.quant.bits=0)"
        )
    frozen = [name for name in adapters if re.search(config.freeze, name)] if config.freeze else []
    if frozen:
        raise ConfigError(
            f"config.freeze={config.freeze!r} freezes the LoRA adapters {listed(frozen)}: they would never train. "
            "LoRA already freezes the base; leave "
            "config.freeze empty or exclude these layers with config.lora.targets"
        )


def check_rank(rank: int, names: dict, adapters: list[str]) -> None:
    """A kernel's update A B has rank at most the narrower of its input and output widths: a larger lora.rank only
    adds adapter weights that change nothing."""
    kernels = {adapter.rpartition("_lora_")[0] for adapter in adapters}
    widths = {kernel: narrower_width(names, kernel, rank) for kernel in sorted(kernels)}
    narrowest = min(widths, key=widths.get)
    if rank > widths[narrowest]:
        raise ConfigError(
            f"config.lora.rank={rank} is above the width of {narrowest} ({widths[narrowest]} on its narrower side), "
            f"and an update of a kernel has at most its width's rank: the largest useful rank here is "
            f"{widths[narrowest]} (or leave the narrow layers out with config.lora.targets)"
        )


def narrower_width(names: dict, kernel: str, rank: int) -> int:
    """The narrower of a kernel's input and output widths, read off its adapters A [..., inputs, rank] and
    B [rank, outputs...], both led by the kernel's `layers` axis where scanned."""
    a, b = names[kernel + "_lora_a"], names[kernel + "_lora_b"]
    kernel_size = (names.get(kernel) or names[kernel + "/array/qvalue"]).size  # float, or QLoRA's integers
    layers = (a.size // rank) * (b.size // rank) // kernel_size
    return min(a.size, b.size) // rank // layers


def float_export_refusal(config, where) -> str | None:
    """Why a float exporter (Hugging Face, ONNX, StableHLO) cannot take this run as it is, with the way out; None
    when it can (a float run, or a QAT one: its weights are float)."""
    if lora_on(config):
        return (
            f"{where} is a LoRA run (config.lora.rank={config.lora.rank}): merge its adapters into the base first, "
            f"`bigjax lora merge --workdir RUN --out MERGED`, and export MERGED"
        )
    if holds_integers(config):
        return (
            f"{where} is a quantized run (config.quant.bits={config.quant.bits}) whose weights are integers; export "
            "writes float weights: export the float run it was quantized from"
        )
    return None


def qtype(bits: int):
    return {8: jnp.int8, 4: jnp.int4}[bits]


def rules(quant) -> list:
    """Qwix's rules for `quant` (config.quant): the first that matches a module path wins."""
    import qwix

    return [_float_rule(), _quantized_rule(quant, qwix.QtRule)]


def _float_rule():
    import qwix

    return qwix.QtRule(module_path=rf"(.*/)?({'|'.join(FLOAT_MODULES)})", weight_qtype=None)


def _quantized_rule(quant, rule_type, module_path: str = ".*", **settings):
    """The rule for the quantized (and LoRA's targeted) matmuls; float kernels when `quant` is off."""
    bits = quant.bits if is_on(quant) else 0
    return rule_type(
        module_path=module_path,
        op_names=QUANTIZED_OPS,
        weight_qtype=qtype(bits) if bits else None,
        act_qtype=jnp.int8 if bits and quant.mode == "dynamic" else None,
        tile_size=quant.sub_channel if bits == 4 else None,
        **settings,
    )


def lora_rules(config) -> list:
    """Adapters on the quantizable matmuls whose module path `lora.targets` finds (re.search); with `quant.bits`
    the base kernels, targeted or not, are integers (QLoRA)."""
    import qwix

    lora, quant = config.lora, config.get("quant")
    targeted = _quantized_rule(
        quant,
        qwix.LoraRule,
        module_path=f".*(?:{lora.targets}).*",
        rank=lora.rank,
        alpha=lora.alpha,
        dropout=lora.dropout,
    )
    rules = [_float_rule(), targeted]
    if is_on(quant):
        rules.append(_quantized_rule(quant, qwix.QtRule))
    return rules


def quantized(model: nn.Module, config) -> nn.Module:
    """`model` as `config.quant` and `config.lora` say (see the module docstring); `model` itself when both are
    off (or `config` is None), so that a float run builds exactly the module it always did."""
    provider = _provider(config) if config is not None else None
    if provider is None:
        return model
    import qwix

    return qwix.quantize_model(model, provider)


def _provider(config):
    import qwix
    from qwix._src.utils import flax_util

    quant = config.get("quant")

    class Named:
        """A Qwix provider whose shape errors name the layer and the config key to change."""

        def dot_general(self, *args, **kwargs):
            with _named_errors(quant):
                return super().dot_general(*args, **kwargs)

        def einsum(self, *args, **kwargs):
            with _named_errors(quant):
                return super().einsum(*args, **kwargs)

    class Lora(Named, qwix.LoraProvider):
        """Two workarounds for Qwix 0.1.8 under Linen. Making an adapter, Qwix reads the kernel's box unboxed with
        the adapter's value in it, which under logical-axis rules constrains a rank-2 array to the kernel's rank-3
        names and fails: the rules are lifted inside the op (the adapters keep their names, and get their
        shardings from them like every parameter). And its einsum records its einsum string on the module with
        setattr, which a Linen module allows only in setup(): let it (nothing reads it)."""

        def dot_general(self, *args, **kwargs):
            with nn.logical_axis_rules(()):
                return super().dot_general(*args, **kwargs)

        def einsum(self, *args, **kwargs):
            state = flax_util.get_current_module()._state
            in_setup, state.in_setup = state.in_setup, True
            try:
                with nn.logical_axis_rules(()):
                    return super().einsum(*args, **kwargs)
            finally:
                state.in_setup = in_setup

    class Ptq(Named, qwix.PtqProvider):
        pass

    class Qat(Named, qwix.QtProvider):
        pass

    if lora_on(config):
        return Lora(lora_rules(config))
    if not is_on(quant):
        return None
    return (Qat if quant.qat else Ptq)(rules(quant))


@contextlib.contextmanager
def _named_errors(quant):
    try:
        yield
    except ValueError as error:
        if "cannot be tiled" not in str(error):
            raise
        from qwix._src.utils import flax_util

        where = "/".join(map(str, flax_util.get_current_module_path()))
        raise ConfigError(
            f"config.quant.sub_channel={quant.sub_channel} does not divide the input channels of the kernel of "
            f"{where} (Qwix: {error}); pick a sub_channel that divides them, or bits=8 (per-channel scales)"
        ) from None


def quantize_params(params: dict, abstract_params: dict) -> dict:
    """A float parameter tree (unboxed) in the quantized model's form: each kernel the quantized model holds as
    integers (Qwix's `WithAux` of a `QArray` in `abstract_params`, the quantized model's boxed abstract
    parameters) quantized as Qwix decided for it, per layer where the kernel is stacked over scanned layers;
    every other parameter unchanged. Jit it with the quantized tree's shardings: it runs shard by shard."""
    from qwix._src.core import qarray
    from qwix._src.providers import ptq

    def quantize(value, target):
        return ptq.WithAux(_per_layer(lambda w: qarray.quantize(w, target.how), target)(value), target.how)

    return _map_quantized(quantize, params, abstract_params)


def dequantize_params(params: dict, abstract_params: dict) -> dict:
    """The float parameter tree a quantized one stands for (each integer kernel times its scales): what a float
    checkpoint is loaded into, to be quantized again (QLoRA from a float run), or what LoRA merges into."""
    from qwix._src.core import qarray

    dequantize = lambda value, target: _per_layer(qarray.dequantize, target)(value.array)  # noqa: E731
    return _map_quantized(dequantize, params, abstract_params)


def float_shardings(shardings: dict) -> dict:
    """A quantized parameter tree's shardings -> the float tree's: a kernel is sharded like its integers."""
    from qwix._src.providers import ptq

    is_quantized = lambda node: isinstance(node, ptq.WithAux)  # noqa: E731
    return jax.tree.map(lambda node: node.array.qvalue if is_quantized(node) else node, shardings, is_leaf=is_quantized)


def _map_quantized(fn, params: dict, abstract_params: dict) -> dict:
    """`params` with fn(value, its WithAux in abstract_params) at each kernel the quantized model holds as integers
    (nested dicts are walked; a WithAux, like an array, is a leaf)."""
    from qwix._src.providers import ptq

    targets = flax.traverse_util.flatten_dict(abstract_params)
    out = {
        path: fn(value, targets[path]) if isinstance(targets[path], ptq.WithAux) else value
        for path, value in flax.traverse_util.flatten_dict(params).items()
    }
    return flax.traverse_util.unflatten_dict(out)


def _per_layer(fn, target):
    """`fn` of one layer's kernel, mapped over the leading `layers` axis of a stacked (scanned) one."""
    return jax.vmap(fn) if _axis_names(target.array.qvalue)[:1] == (SCAN_AXIS,) else fn


def quantized_paths(abstract_params: dict) -> list[str]:
    """The "/"-joined paths of the kernels held as integers in a quantized model's parameters."""
    from qwix._src.providers import ptq

    flat = flax.traverse_util.flatten_dict(abstract_params, is_leaf=lambda _, node: isinstance(node, ptq.WithAux))
    return ["/".join(path) for path, leaf in flat.items() if isinstance(leaf, ptq.WithAux)]


def _axis_names(leaf) -> tuple:
    return tuple(leaf.names) if isinstance(leaf, nn.LogicallyPartitioned) else ()


def listed(names, shown: int = 4) -> str:
    return ", ".join(names[:shown]) + (", ..." if len(names) > shown else "")
