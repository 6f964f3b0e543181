"""Quantized weights and low-rank adapters through Qwix (Google's JAX quantization library, which MaxText uses):
the rules that say which layers hold integers or adapters, the model that runs them, and the float <-> integer
conversion of a parameter tree.

    model = quantized(GPT(cfg), variant)                # the same module for a float variant
    abstract = jax.eval_shape(model.init, rng, tokens)  # kernels are now {qvalue: int8/int4, scale: float32}
    params = quantize_params(float_params, abstract)    # a trained float tree in that form
    logits = model.apply({"params": params}, tokens)

The variant (bigjax.compress.variant.Variant, from `config.quant` and `config.lora`, which a run's config.json
records) is the one description of a quantization and of the adapters, so that every command that builds the model
from that config builds the same one. Four models come out of it, each through its Qwix provider:

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

What stays float (and gets no adapter), and why. A layer says so by its class (`keeps_float = True`: the models'
`layers.FloatDense` and `layers.FloatEmbed`, and `layers.Attention`), never by its name, so that a renamed layer
keeps its precision:

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
import functools
import re

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from bigjax import params as params_lib
from bigjax.compress.variant import Quant, Variant
from bigjax.config import ConfigError

QUANTIZED_OPS = ("dot_general", "einsum")  # Dense and Einsum layers; not conv_general_dilated (docstring)
SCAN_AXIS = "layers"  # the logical name nn.scan gives the stacking axis (bigjax.models.layers.remat_and_scan)


def check_lora(variant: Variant, freeze: str, abstract_params) -> None:
    """The targets must reach some layer, lora.train must not name integers (QLoRA's base), and no adapter may be
    frozen (`freeze`, config.freeze): one error line each."""
    lora = variant.lora
    if not lora:
        return
    names = params_lib.by_path(abstract_params)
    adapters = [name for name in names if re.search(params_lib.ADAPTERS, name)]
    if not adapters:
        kernels = sorted({name.rpartition("/")[0] for name in names if name.endswith("kernel")})
        raise ConfigError(
            f"config.lora.targets={lora.targets!r} matches no layer that takes adapters (the matmuls of "
            f"{listed(kernels, 8)}; embeddings, output layers, heads and "
            "convolutions take none); change the targets"
        )
    check_rank(lora.rank, names, adapters)
    integers = [
        name for name in variant.trained_whole(abstract_params) if not jnp.issubdtype(names[name].dtype, jnp.floating)
    ]
    if integers:
        raise ConfigError(
            f"config.lora.train={lora.train!r} names {listed(integers)}, held as int{variant.bits} in "
            "this QLoRA run: integers do not train. Name only float parameters "
            "(the heads, norms, embeddings), or leave those layers out of the quantization (config.quant.bits=0)"
        )
    frozen = [name for name in adapters if re.search(freeze, name)] if freeze else []
    if frozen:
        raise ConfigError(
            f"config.freeze={freeze!r} freezes the LoRA adapters {listed(frozen)}: they would never train. "
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


def qtype(bits: int):
    return {8: jnp.int8, 4: jnp.int4}[bits]


def rules(quant: Quant) -> list:
    """Qwix's rules for `quant`: the first that matches a module path wins."""
    import qwix

    return [_quantized_rule(quant, qwix.QtRule)]


def keeps_float(module) -> bool:
    """Whether the layer running an op keeps its own matmuls float: its class says so (`keeps_float = True`:
    bigjax.models.layers' FloatDense, FloatEmbed and Attention), not its name, so that renaming a layer cannot
    quantize it. See the module docstring for which layers and why."""
    return getattr(module, "keeps_float", False)


def _quantized_rule(quant, rule_type, module_path: str = ".*", **settings):
    """The rule for the quantized (and LoRA's targeted) matmuls; float kernels when `quant` is None."""
    bits = quant.bits if quant else 0
    return rule_type(
        module_path=module_path,
        op_names=QUANTIZED_OPS,
        weight_qtype=qtype(bits) if bits else None,
        act_qtype=jnp.int8 if bits and quant.mode == "dynamic" else None,
        tile_size=quant.sub_channel if bits == 4 else None,
        **settings,
    )


def lora_rules(variant: Variant) -> list:
    """Adapters on the quantizable matmuls whose module path `lora.targets` finds (re.search); with `quant` the
    base kernels, targeted or not, are integers (QLoRA)."""
    import qwix

    lora, quant = variant.lora, variant.quant
    targeted = _quantized_rule(
        quant,
        qwix.LoraRule,
        module_path=f".*(?:{lora.targets}).*",
        rank=lora.rank,
        alpha=lora.alpha,
        dropout=lora.dropout,
    )
    rules = [targeted]
    if quant:
        rules.append(_quantized_rule(quant, qwix.QtRule))
    return rules


def quantized(model: nn.Module, variant: Variant | None) -> nn.Module:
    """`model` as `variant` says (see the module docstring); `model` itself for a float variant (or None), so that
    a float run builds exactly the module it always did."""
    if variant is None or not (variant.lora or variant.quant):
        return model  # a float model: Qwix (a second to import) is not even imported
    import qwix

    return qwix.quantize_model(model, _provider(variant))


def _provider(variant: Variant):
    import qwix

    quant = variant.quant

    class Named:
        """A Qwix provider that leaves the matmuls of the layers that keep float alone (the original op: Qwix runs
        its providers with its interception off), and whose shape errors name the layer and the config key."""

        def dot_general(self, *args, **kwargs):
            if keeps_float(_current_module()):
                return jax.lax.dot_general(*args, **kwargs)
            with _named_errors(quant):
                return super().dot_general(*args, **kwargs)

        def einsum(self, *args, **kwargs):
            if keeps_float(_current_module()):
                return jnp.einsum(*args, **kwargs)
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
            # Flax's private _state: Linen has no public way to allow a setattr outside setup() (see above).
            state = _current_module()._state
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

    if variant.lora:
        return Lora(lora_rules(variant))
    return (Qat if quant.qat else Ptq)(rules(quant))


@contextlib.contextmanager
def _named_errors(quant):
    try:
        yield
    except ValueError as error:
        if "cannot be tiled" not in str(error):
            raise
        where = "/".join(map(str, _current_module().path))
        raise ConfigError(
            f"config.quant.sub_channel={quant.sub_channel} does not divide the input channels of the kernel of "
            f"{where} (Qwix: {error}); pick a sub_channel that divides them, or bits=8 (per-channel scales)"
        ) from None


def quantize_params(params: dict, abstract_params: dict) -> dict:
    """A float parameter tree (unboxed) in the quantized model's form: each kernel the quantized model holds as
    integers (Qwix's `WithAux` of a `QArray` in `abstract_params`, the quantized model's boxed abstract
    parameters) quantized as Qwix decided for it, per layer where the kernel is stacked over scanned layers;
    every other parameter unchanged. Jit it with the quantized tree's shardings: it runs shard by shard."""
    import qwix

    def quantize(value, target):
        how = target.how  # what Qwix decided for this kernel, asked again of its public quantize
        one_layer = functools.partial(
            qwix.quantize,
            qtype=how.qtype,
            channelwise_axes=how.channelwise_axes,
            tiled_axes=how.tiled_axes,
            calibration_method=how.calibration_method,
        )
        return target.replace(array=_per_layer(one_layer, target)(value))

    return _map_quantized(quantize, params, abstract_params)


def dequantize_params(params: dict, abstract_params: dict) -> dict:
    """The float parameter tree a quantized one stands for (each integer kernel times its scales): what a float
    checkpoint is loaded into, to be quantized again (QLoRA from a float run), or what LoRA merges into."""
    import qwix

    dequantize = lambda value, target: _per_layer(qwix.dequantize, target)(value.array)  # noqa: E731
    return _map_quantized(dequantize, params, abstract_params)


def float_shardings(shardings: dict) -> dict:
    """A quantized parameter tree's shardings -> the float tree's: a kernel is sharded like its integers."""
    return jax.tree.map(lambda node: node.array.qvalue if _is_integer(node) else node, shardings, is_leaf=_is_integer)


def _map_quantized(fn, params: dict, abstract_params: dict) -> dict:
    """`params` with fn(value, its WithAux in abstract_params) at each kernel the quantized model holds as integers
    (nested dicts are walked; a WithAux, like an array, is a leaf)."""
    targets = flax.traverse_util.flatten_dict(abstract_params)
    out = {
        path: fn(value, targets[path]) if _is_integer(targets[path]) else value
        for path, value in flax.traverse_util.flatten_dict(params).items()
    }
    return flax.traverse_util.unflatten_dict(out)


def _per_layer(fn, target):
    """`fn` of one layer's kernel, mapped over the leading `layers` axis of a stacked (scanned) one."""
    return jax.vmap(fn) if _axis_names(target.array.qvalue)[:1] == (SCAN_AXIS,) else fn


def quantized_paths(abstract_params: dict) -> list[str]:
    """The "/"-joined paths of the kernels held as integers in a quantized model's parameters."""
    flat = flax.traverse_util.flatten_dict(abstract_params, is_leaf=lambda _, node: _is_integer(node))
    return ["/".join(path) for path, leaf in flat.items() if _is_integer(leaf)]


# Qwix's private names, in one place: Qwix 0.1.8 exports neither (everything else here is its public API).


def _is_integer(node) -> bool:
    """Is `node` an integer kernel of a quantized model's parameters: Qwix's WithAux (the QArray with how it was
    quantized), the type its PTQ provider puts in the tree, which qwix does not export?"""
    from qwix._src.providers.ptq import WithAux

    return isinstance(node, WithAux)


def _current_module() -> nn.Module:
    """The Linen module whose op Qwix is intercepting: Qwix's own helper (Flax has no public accessor for it)."""
    from qwix._src.utils import flax_util

    return flax_util.get_current_module()


def _axis_names(leaf) -> tuple:
    return tuple(leaf.names) if isinstance(leaf, nn.LogicallyPartitioned) else ()


def listed(names, shown: int = 4) -> str:
    return ", ".join(names[:shown]) + (", ..." if len(names) > shown else "")
