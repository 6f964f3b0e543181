"""`bigjax export --format onnx|stablehlo`: a trained model for serving outside bigjax's training code.

    bigjax export --workdir DIR --out OUT --format onnx        # OUT/model.onnx + OUT/model.json
    bigjax export --workdir DIR --out OUT --format stablehlo   # OUT/prefill.jax_exported, OUT/decode_step...

ONNX (bigjax.deploy.onnx_export) is the forward pass as one graph, for onnxruntime and whatever else reads ONNX:
a GPT causal LM's logits of a token batch, or an image classifier's (cnn, resnet, vit) class logits of a batch of
preprocessed NHWC images. StableHLO (bigjax.deploy.stablehlo) is `jax.export` of the GPT's KV-cache prefill and
one-token decode step, serialized, with the parameters beside them as an input, for serving from JAX without
bigjax. Each directory has a JSON file saying what goes in and what comes out.

Both read one committed checkpoint (the newest, or --step N) onto one device, with the model built from the config
saved in that checkpoint. What cannot be exported (a masked LM, a text classifier, a quantized or LoRA run) is
refused before any checkpoint is read. The Hugging Face format is bigjax.hf's.
"""

from __future__ import annotations

import json

import jax

from bigjax import paths
from bigjax.deploy.common import DeployError, check_exportable
from bigjax.run.workdir import Run

FORMATS = ("onnx", "stablehlo")
DESCRIPTION_FILES = {"onnx": "model.json", "stablehlo": "manifest.json"}  # what goes in and out, in JSON
__all__ = ["FORMATS", "DeployError", "export"]


def export(workdir, out, fmt: str, step: int | None = None, platforms=None) -> int:
    """Write `out` in format `fmt` from a committed checkpoint of `workdir`; returns the step exported."""
    run, out = Run(workdir), paths.check_new_output(out)
    check_exportable(run.saved_config(), fmt, run)  # refused before anything is read
    step = run.committed_step(step)
    config = run.config_at(step)
    check_exportable(config, fmt, run.step_dir(step))
    if jax.process_count() > 1:
        raise DeployError(f"--format {fmt} runs in one process; start it without a multi-process launcher")
    from bigjax.deploy import onnx_export, stablehlo

    # A missing optional dependency is one line naming the extra, before anything is written.
    if fmt == "onnx":
        onnx_export.import_converter()
    else:
        stablehlo.check_serializer()
    with paths.writing_new_output(out):  # a failed export leaves nothing
        if fmt == "onnx":
            description = onnx_export.export(config, run, step, out)
        else:
            description = stablehlo.export(config, run, step, out, platforms)
        description = {"workdir": str(run), "step": step, **description}
        (out / DESCRIPTION_FILES[fmt]).write_text(json.dumps(description, indent=2) + "\n")
    return step
