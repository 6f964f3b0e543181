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
import pathlib

import jax

from bigjax import checkpoint, paths
from bigjax import config as config_lib
from bigjax.errors import UserError

FORMATS = ("onnx", "stablehlo")
DESCRIPTION_FILES = {"onnx": "model.json", "stablehlo": "manifest.json"}  # what goes in and out, in JSON
# Sections other work in progress adds to a config: a run that uses them trains a model these exports do not build.
UNSUPPORTED_SECTIONS = {"quant": "a quantized run", "lora": "a LoRA run"}


class DeployError(UserError):
    """A run or a request that cannot be exported: a message for the user."""


def export(workdir, out, fmt: str, step: int | None = None, platforms=None) -> int:
    """Write `out` in format `fmt` from a committed checkpoint of `workdir`; returns the step exported."""
    workdir = paths.workdir(workdir)
    check_exportable(config_lib.load_saved(workdir), fmt, workdir)  # refused before anything is read
    step = committed_step(workdir, step)
    out = pathlib.Path(out)
    if out.exists() and any(out.iterdir()):
        raise DeployError(f"--out {out} exists and is not empty; export into a new directory")
    mngr = checkpoint.manager(workdir, read_only=True)
    config = config_lib.from_dict(checkpoint.saved_config(mngr, step).to_dict())  # upgraded like config.json
    check_exportable(config, fmt, checkpoint.step_dir(workdir, step))
    if jax.process_count() > 1:
        raise DeployError(f"--format {fmt} runs in one process; start it without a multi-process launcher")
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "onnx":
        from bigjax.deploy import onnx_export

        description = onnx_export.export(config, mngr, step, out)
    else:
        from bigjax.deploy import stablehlo

        description = stablehlo.export(config, mngr, step, out, platforms)
    description = {"workdir": str(workdir), "step": step, **description}
    (out / DESCRIPTION_FILES[fmt]).write_text(json.dumps(description, indent=2) + "\n")
    return step


def check_exportable(config, fmt: str, where) -> None:
    """Refuse, with what can be exported, a run the format does not cover."""
    for section, what in UNSUPPORTED_SECTIONS.items():
        if is_set(config.get(section)):
            raise DeployError(
                f"{where} is {what} (config.{section}); --format {fmt} exports unquantized, merged models only"
            )
    family, task = config.model.family, config.task.name
    causal_lm = family == "gpt" and task == "causal_lm"
    if fmt == "stablehlo" and not causal_lm:
        raise DeployError(
            f"{where} trained a {family} {task} model; --format stablehlo exports the decode step of a GPT causal LM"
        )
    if fmt == "onnx" and not (causal_lm or (task == "classification" and family in ("cnn", "resnet", "vit"))):
        raise DeployError(
            f"{where} trained a {family} {task} model; --format onnx exports a GPT causal LM or an image "
            "classifier (cnn, resnet, vit)"
        )


def is_set(section) -> bool:
    """Is a config section present and switched on? Empty, None, `enabled=False`, `mode="none"` or `bits=0` mean
    off."""
    if not section:
        return False
    if hasattr(section, "get") and "bits" in section:  # config.quant (bigjax.models.quantized): bits=0 is off
        return bool(section["bits"])
    if hasattr(section, "get"):
        return bool(section.get("enabled", True)) and section.get("mode", section.get("method", "on")) not in (
            "none",
            "",
            None,
        )
    return True


def committed_step(workdir, step: int | None) -> int:
    committed = checkpoint.committed_steps(workdir)
    if not committed:
        raise DeployError(f"no committed checkpoint in {checkpoint.checkpoint_dir(workdir)} yet; train first")
    if step is not None and step not in committed:
        raise DeployError(
            f"checkpoint {step} is not a committed checkpoint of {workdir}; committed: {', '.join(map(str, committed))}"
        )
    return committed[-1] if step is None else step


def restore_on_one_device(config, mngr, step: int):
    """(setup, variables) of checkpoint `step`, restored onto one device: serving needs no parallelism."""
    from bigjax.setup import make_setup

    config = config_lib.from_dict(config.to_dict())
    config.mesh.update(dict(data=1, fsdp=1, tensor=1))
    setup = make_setup(config, devices=jax.devices()[:1])
    return setup, checkpoint.restore_variables(mngr, step, setup.variables_target())
