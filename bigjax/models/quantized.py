"""Quantized weights through Qwix (Google's JAX quantization library, which MaxText uses): the rules that say which
layers hold integers, the model that runs them, and the float -> integer conversion of a trained parameter tree.

    model = quantized(GPT(cfg), config.quant)           # the same module when config.quant.bits is 0
    abstract = jax.eval_shape(model.init, rng, tokens)  # kernels are now {qvalue: int8/int4, scale: float32}
    params = quantize_params(float_params, abstract)    # a trained float tree in that form
    logits = model.apply({"params": params}, tokens)

`config.quant` (bigjax.config.defaults) is the one description of a quantization, written into a quantized
workdir's config.json, so that every command that builds the model from that config builds the quantized one:

* bits=8: int8 kernels with one float32 scale per output channel (absmax, symmetric: w ~ q * scale).
* bits=4: int4 kernels with one scale per `sub_channel` input channels of each output channel (sub-channel: a
  4-bit grid is too coarse for one scale over a whole input dimension). `sub_channel` must divide the input
  channels of every quantized kernel (the last contracted axis, as Qwix tiles it); otherwise one error names it.
* mode=weight_only: activations stay in the compute dtype; the integer kernel is scaled back inside the matmul.
  mode=dynamic: activations are also quantized to int8 at run time, per token (an integer x integer matmul where
  the backend has one).

What stays float, and why:

* token, position and token-type embeddings: a table lookup, not a matmul; Qwix quantizes the operands of
  matmuls and convolutions only. With tied embeddings the output layer is the same table.
* the output layers (an untied `unembed`, the classifiers' `classifier`/`head`): their errors go straight into
  the logits, and they are one matrix among many (the classic recipe keeps the first and last layers float).
* norms and biases: vectors, a rounding error of the size, and the norms are precision-sensitive.
* attention's own products (q.k and the weighted sum of v): activations against activations, not weights.
* convolutions (ViT's patch embedding, the CNN's and ResNet's layers): Qwix's PTQ quantizes a convolution only
  together with its input at the same type (`PtqProvider.conv_general_dilated` refuses a weight-only one), and
  the first layer, which sees pixels, is kept float by every recipe anyway. The CNN's Dense layer is quantized.

The rules are Qwix `QtRule`s, which quantization-aware training (`QtProvider`) and QLoRA (`LoraProvider`) take as
they are: a later `config.quant` user builds its provider from `rules(config.quant)`.

Scanned layers: a kernel of `nn.scan`ned blocks is stacked [layers, ...]; Qwix computes how to quantize one layer's
kernel, so `quantize_params` maps that over the leading `layers` axis (named by the scan's partitioning metadata).
Every integer array keeps its kernel's logical axis names, and each scale those of the axes it spans, so the
quantized tree is sharded by the same rules as the float one and restores onto any mesh.
"""

from __future__ import annotations

import contextlib

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from bigjax.config import ConfigError

# Module names (the last part of a module path) whose matmuls stay float; see the module docstring for why.
FLOAT_MODULES = ("embed", "position_embed", "token_type_embed", "unembed", "classifier", "head", "attention")
QUANTIZED_OPS = ("dot_general", "einsum")  # Dense and Einsum layers; not conv_general_dilated (docstring)
SCAN_AXIS = "layers"  # the logical name nn.scan gives the stacking axis (bigjax.models.layers.remat_and_scan)


def is_on(quant) -> bool:
    return bool(quant is not None and quant.bits)


def qtype(bits: int):
    return {8: jnp.int8, 4: jnp.int4}[bits]


def rules(quant) -> list:
    """Qwix's rules for `quant` (config.quant): the first that matches a module path wins."""
    import qwix

    return [
        qwix.QtRule(module_path=rf"(.*/)?({'|'.join(FLOAT_MODULES)})", weight_qtype=None),
        qwix.QtRule(
            module_path=".*",
            op_names=QUANTIZED_OPS,
            weight_qtype=qtype(quant.bits),
            act_qtype=jnp.int8 if quant.mode == "dynamic" else None,
            tile_size=quant.sub_channel if quant.bits == 4 else None,
        ),
    ]


def quantized(model: nn.Module, quant) -> nn.Module:
    """`model` running Qwix's post-training-quantized kernels as `quant` says; `model` itself when quant is off
    (or None), so that a float run builds exactly the module it always did."""
    if not is_on(quant):
        return model
    import qwix

    return qwix.quantize_model(model, _provider(quant))


def _provider(quant):
    import qwix

    class Provider(qwix.PtqProvider):
        """Qwix's PTQ provider, whose shape errors name the layer and the config key to change."""

        def dot_general(self, *args, **kwargs):
            with _named_errors(quant):
                return super().dot_general(*args, **kwargs)

        def einsum(self, *args, **kwargs):
            with _named_errors(quant):
                return super().einsum(*args, **kwargs)

    return Provider(rules(quant))


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

    flat_abstract = flax.traverse_util.flatten_dict(
        abstract_params, is_leaf=lambda _, node: isinstance(node, ptq.WithAux)
    )
    out = {}
    for path, value in flax.traverse_util.flatten_dict(params).items():
        target = flat_abstract[path]
        if isinstance(target, ptq.WithAux):
            quantize = lambda w, how=target.how: qarray.quantize(w, how)  # noqa: E731
            if _axis_names(target.array.qvalue)[:1] == (SCAN_AXIS,):
                quantize = jax.vmap(quantize)
            value = ptq.WithAux(quantize(value), target.how)
        out[path] = value
    return flax.traverse_util.unflatten_dict(out)


def quantized_paths(abstract_params: dict) -> list[str]:
    """The "/"-joined paths of the kernels held as integers in a quantized model's parameters."""
    from qwix._src.providers import ptq

    flat = flax.traverse_util.flatten_dict(abstract_params, is_leaf=lambda _, node: isinstance(node, ptq.WithAux))
    return ["/".join(path) for path, leaf in flat.items() if isinstance(leaf, ptq.WithAux)]


def _axis_names(leaf) -> tuple:
    return tuple(leaf.names) if isinstance(leaf, nn.LogicallyPartitioned) else ()
