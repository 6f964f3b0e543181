"""`bigjax export --format onnx`: the forward pass as an ONNX graph (through jax2onnx), run in onnxruntime.

    OUT/model.onnx     inputs and outputs named as OUT/model.json says; the weights are constants of the graph
    OUT/model.json     their shapes and dtypes, the preprocessing or tokenizer the model expects, the check below
    OUT/tokenizer.*    a GPT run's tokenizer file, when it has one (the byte tokenizer needs none)

    import onnxruntime, numpy as np
    session = onnxruntime.InferenceSession("OUT/model.onnx")
    logits = session.run(None, {"tokens": np.array([[72, 105]], np.int32)})[0]    # [batch, length, vocab]

A GPT causal LM takes `tokens` int32 [batch, length] (any length up to model.max_len) and gives `logits` float32
[batch, length, vocab] (the tokenizer's vocabulary: the ids bigjax pads it with are cut off). An image classifier
(cnn, resnet, vit) takes `images` float32 [batch, height, width, channels], preprocessed as in training
(model.json: resize, / 255, - mean, / std), and gives `logits` float32 [batch, num_classes]. Batch and length are
dynamic dimensions of the graph. BatchNorm uses its running statistics (eval mode); dropout is off.

How the graph is made:
* The model is built unrolled (scan_layers=False), as jax2onnx cannot convert Flax's nn.scan, and the checkpoint's
  stacked layers are cut into per-layer parameters (unstack_layers); without remat, in float32 (ONNX runtimes
  have few bfloat16 kernels), with XLA's attention.
* The forward pass is traced to a jaxpr here, with plain JAX and Flax, and jax2onnx converts that jaxpr's
  primitives. Handed the Flax model, jax2onnx would swap its own versions in for some Flax layers while
  tracing (its avg_pool takes other arguments than Flax's, and its Conv prints debug lines).
* Two nodes jax2onnx writes are legal ONNX that onnxruntime's CPU provider has no kernel for; they are rewritten
  into equivalent ones (for_onnxruntime): Where over booleans (the causal mask) and a max-pool over NHWC, which
  jax2onnx writes as a pool over four "spatial" axes (ResNet's ImageNet stem).
* At export the file is run in onnxruntime on random inputs and compared with bigjax's own logits; model.json
  records the largest difference, relative to the largest logit.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import jaxpr_as_fun

from bigjax import config as config_lib
from bigjax import tasks
from bigjax.deploy.common import INSTALL_DEPLOY, DeployError, restore_on_one_device
from bigjax.params import by_path

ONNX_FILE = "model.onnx"
OPSET = 21  # onnxruntime >= 1.20 runs it
CHECK_BATCH = 2  # the batch the export-time check runs


def export(config, run, step: int, out) -> dict:
    """Write OUT/model.onnx (and the tokenizer) from checkpoint `step`; returns model.json's content."""
    onnx, onnxruntime, to_onnx = import_converter()
    _, variables = restore_on_one_device(config, run, step)
    served = serving_config(config)
    task = tasks.make_task(served)
    variables = unrolled_variables(variables, task)

    if config.task.name == "causal_lm":
        vocab = config.model.vocab_size  # the tokenizer's ids; the model pads its vocabulary beyond them
        batch, length = jax.export.symbolic_shape("batch, length")
        spec = jax.ShapeDtypeStruct((batch, length), jnp.int32)
        inputs, outputs = ["tokens"], ["logits"]

        def forward(tokens):
            return task.model.apply(variables, tokens)[..., :vocab]

        check_input = np.random.default_rng(0).integers(0, vocab, (CHECK_BATCH, config.model.max_len), np.int32)
        description = language_model_description(config, out)
    else:
        batch = jax.export.symbolic_shape("batch")[0]
        spec = jax.ShapeDtypeStruct((batch, *task.image_shape), jnp.float32)
        inputs, outputs = ["images"], ["logits"]

        def forward(images):
            return task.model.apply(variables, images, train=False)

        check_input = np.random.default_rng(0).standard_normal((CHECK_BATCH, *task.image_shape), np.float32)
        description = image_classifier_description(config, task)

    model = convert(forward, spec, inputs, outputs, to_onnx, onnx)
    onnx.save_model(model, str(out / ONNX_FILE))
    from_onnx = run_onnx(out / ONNX_FILE, {inputs[0]: check_input})[0]
    difference = max_relative_difference(from_onnx, jax.jit(forward)(check_input))
    return {
        "format": "onnx",
        "file": ONNX_FILE,
        "opset": OPSET,
        "family": config.model.family,
        "task": config.task.name,
        **description,
        "computed_in": "float32",
        "checked": {
            "what": f"onnxruntime {onnxruntime.__version__} against bigjax on a random batch of {CHECK_BATCH}",
            "max_relative_difference": difference,
        },
    }


def import_converter():
    """(onnx, onnxruntime, jax2onnx.to_onnx), or a DeployError naming the extra that installs them."""
    # Importing jax2onnx loads every plugin it has; those for libraries bigjax does not use warn about what this
    # jax lacks (the dm_pix ones), which concerns no conversion of ours.
    logging.getLogger("jax2onnx.plugins.plugin_system").setLevel(logging.ERROR)
    try:
        import onnx
        import onnxruntime
        from jax2onnx import to_onnx
    except ImportError as error:
        raise DeployError(f"--format onnx needs {error.name}: {INSTALL_DEPLOY}") from None
    return onnx, onnxruntime, to_onnx


def serving_config(config):
    """`config` with the model as it is served: layers unrolled, no remat, float32, XLA attention, no dropout."""
    served = config_lib.from_dict(config.to_dict())
    wanted = dict(scan_layers=False, remat="none", dtype="float32", param_dtype="float32", attention="xla", dropout=0.0)
    served.model.update({key: value for key, value in wanted.items() if key in served.model})
    return served


# --------------------------------------------------------------------------------------------------
# The parameters, unrolled


def unstack_layers(tree: dict) -> dict:
    """A collection of variables (params, batch_stats) of a scanned model as the unrolled model names them: the
    stacked `layers` of GPT and ViT (layer i at index i of axis 0) -> layers_0, layers_1, ...; ResNet's
    `stageN_rest` (the stage's blocks after its first, stacked) -> stageN_block2, stageN_block3, ..."""
    unrolled = {}
    for name, sub in tree.items():
        if name != "layers" and not re.fullmatch(r"stage\d+_rest", name):
            unrolled[name] = sub
            continue
        for i in range(jax.tree.leaves(sub)[0].shape[0]):
            layer = f"layers_{i}" if name == "layers" else f"{name.removesuffix('_rest')}_block{i + 2}"
            unrolled[layer] = jax.tree.map(lambda stacked, i=i: stacked[i], sub)
    return unrolled


def unrolled_variables(variables: dict, task) -> dict:
    """The checkpoint's variables as the served model (`task.model`, unrolled, float32) takes them."""
    # On the host first: cut from jax arrays, each layer's slice of each shape would be a compile of its own.
    unrolled = {
        collection: unstack_layers(jax.tree.map(lambda a: np.asarray(a, np.float32), tree))
        for collection, tree in variables.items()
    }
    wanted = jax.eval_shape(lambda: nn.unbox(task.init_variables(jax.random.key(0))))
    have = {path: tuple(a.shape) for path, a in by_path(unrolled).items()}
    need = {path: tuple(a.shape) for path, a in by_path(wanted).items()}
    if have != need:
        differences = sorted(set(have.items()) ^ set(need.items()))[:4]
        raise DeployError(f"the checkpoint's parameters do not unroll into the served model's: {differences}")
    return unrolled


# --------------------------------------------------------------------------------------------------
# JAX -> ONNX -> onnxruntime


def convert(forward, spec, input_names, output_names, to_onnx, onnx):
    """The ONNX model of `forward` at `spec` (symbolic dimensions stay dynamic), ready for onnxruntime."""
    closed = jax.make_jaxpr(forward)(spec)  # plain JAX and Flax: no jax2onnx patches while the model is traced
    run_jaxpr = jaxpr_as_fun(closed)
    with contextlib.redirect_stdout(io.StringIO()):  # jax2onnx's converters print debug lines
        model = to_onnx(
            lambda x: run_jaxpr(x)[0],
            [spec],
            model_name="bigjax",
            opset=OPSET,
            input_names=input_names,
            output_names=output_names,
        )
    model = for_onnxruntime(model, onnx)
    onnx.checker.check_model(model)
    return model


def for_onnxruntime(model, onnx):
    """`model` with the nodes onnxruntime's CPU provider has no kernel for rewritten into ones it has."""
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    types = {value.name: value.type.tensor_type.elem_type for value in [*graph.value_info, *graph.input, *graph.output]}
    nodes = []
    for node in model.graph.node:
        if node.op_type == "Where" and types.get(node.output[0]) == onnx.TensorProto.BOOL:
            nodes += boolean_where(node, onnx)
        elif node.op_type == "MaxPool" and len(attribute(node, "kernel_shape", onnx)) == 4:
            nodes += nhwc_max_pool(node, onnx)
        else:
            nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def attribute(node, name: str, onnx, default=()):
    found = [a for a in node.attribute if a.name == name]
    return onnx.helper.get_attribute_value(found[0]) if found else default


def boolean_where(node, onnx) -> list:
    """Where(c, a, b) over booleans as (c and a) or (not c and b)."""
    make, (c, a, b), out, name = onnx.helper.make_node, node.input, node.output[0], node.name
    return [
        make("And", [c, a], [f"{name}_c_and_a"], name=f"{name}_and_1"),
        make("Not", [c], [f"{name}_not_c"], name=f"{name}_not"),
        make("And", [f"{name}_not_c", b], [f"{name}_not_c_and_b"], name=f"{name}_and_2"),
        make("Or", [f"{name}_c_and_a", f"{name}_not_c_and_b"], [out], name=f"{name}_or"),
    ]


def nhwc_max_pool(node, onnx) -> list:
    """jax2onnx's max-pool of an NHWC array x: MaxPool over [1, 1, N, H, W, C] with a 4-axis window that is 1 over
    N and C. onnxruntime pools at most 3 axes: pool [N, C, H, W] over H and W instead, and give back the shape."""
    kernel, strides = attribute(node, "kernel_shape", onnx), attribute(node, "strides", onnx, (1, 1, 1, 1))
    pads, dilations = attribute(node, "pads", onnx, (0,) * 8), attribute(node, "dilations", onnx, (1, 1, 1, 1))
    if kernel[0] != 1 or kernel[3] != 1 or strides[0] != 1 or strides[3] != 1 or any(pads[i] for i in (0, 3, 4, 7)):
        raise DeployError(f"{node.name}: a max-pool across the batch or the channels has no ONNX form here")
    make, name = onnx.helper.make_node, node.name
    axes = onnx.helper.make_tensor(f"{name}_axes", onnx.TensorProto.INT64, [2], [0, 1])
    return [
        make("Constant", [], [f"{name}_axes"], value=axes, name=f"{name}_axes"),
        make("Squeeze", [node.input[0], f"{name}_axes"], [f"{name}_nhwc"], name=f"{name}_squeeze"),
        make("Transpose", [f"{name}_nhwc"], [f"{name}_nchw"], perm=[0, 3, 1, 2], name=f"{name}_to_nchw"),
        make(
            "MaxPool",
            [f"{name}_nchw"],
            [f"{name}_pooled"],
            kernel_shape=kernel[1:3],
            strides=strides[1:3],
            pads=[pads[1], pads[2], pads[5], pads[6]],
            dilations=dilations[1:3],
            name=f"{name}_pool",
        ),
        make("Transpose", [f"{name}_pooled"], [f"{name}_pooled_nhwc"], perm=[0, 2, 3, 1], name=f"{name}_to_nhwc"),
        make("Unsqueeze", [f"{name}_pooled_nhwc", f"{name}_axes"], [node.output[0]], name=f"{name}_unsqueeze"),
    ]


def run_onnx(path, feeds: dict) -> list:
    """The outputs of the ONNX file at `path` on `feeds`, computed by onnxruntime on the CPU."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def max_relative_difference(values, reference) -> float:
    """The largest difference of `values` from `reference`, relative to `reference`'s largest magnitude."""
    reference = np.asarray(reference, np.float64)
    scale = float(np.max(np.abs(reference), initial=0.0)) or 1.0
    return float(np.max(np.abs(np.asarray(values, np.float64) - reference), initial=0.0) / scale)


# --------------------------------------------------------------------------------------------------
# What model.json says about inputs and outputs


def language_model_description(config, out) -> dict:
    from bigjax import data
    from bigjax.data import tokenizers

    tokenizer = data.make_tokenizer(config.data.tokenizer)
    kind, path = tokenizers.parse_spec(config.data.tokenizer)
    tokenizer_file = None
    if kind != "byte":
        tokenizer_file = "tokenizer.model" if kind == "sentencepiece" else "tokenizer.json"
        shutil.copyfile(path, out / tokenizer_file)
    vocab = config.model.vocab_size
    return {
        "inputs": [{"name": "tokens", "dtype": "int32", "shape": ["batch", "length"]}],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", "length", vocab]}],
        "max_length": config.model.max_len,
        "note": "logits[:, i] are the next-token logits after tokens[:, :i+1] (causal); length <= max_length",
        "tokenizer": {
            "kind": kind,  # byte: UTF-8 bytes are ids 0..255, the special tokens follow
            "file": tokenizer_file,
            "vocab_size": tokenizer.vocab_size,
            "special_ids": dict(tokenizer.special_ids),
        },
    }


def image_classifier_description(config, task) -> dict:
    d = config.data
    return {
        "inputs": [{"name": "images", "dtype": "float32", "shape": ["batch", *task.image_shape]}],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", task.num_classes]}],
        "preprocessing": {
            "layout": "NHWC",
            "resize": f"bilinear, to {d.image_size}x{d.image_size}",
            "channels": d.channels,
            "formula": "(pixel / 255 - mean) / std, per channel, pixels uint8 0..255",
            "mean": list(d.image_mean),
            "std": list(d.image_std),
        },
    }
