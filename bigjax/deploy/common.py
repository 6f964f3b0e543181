"""What both export formats share: the refusals, the step, restoring a checkpoint onto one device."""

from __future__ import annotations

import jax

from bigjax import config as config_lib
from bigjax.compress import quantized
from bigjax.errors import UserError
from bigjax.run import checkpoint


class DeployError(UserError):
    """A run or a request that cannot be exported: a message for the user."""


INSTALL_DEPLOY = "pip install 'bigjax[deploy]'"  # the extra holding both formats' optional dependencies


def check_exportable(config, fmt: str, where) -> None:
    """Refuse, with what can be exported, a run the format does not cover."""
    refusal = quantized.float_export_refusal(config, where)
    if refusal:
        raise DeployError(f"{refusal} (--format {fmt} exports float models)")
    family, task = config.model.family, config.task.name
    causal_lm = family == "gpt" and task == "causal_lm"
    if config.model.get("moe", {}).get("num_experts"):
        raise DeployError(
            f"{where} trained a mixture of experts, whose grouped matmuls (ragged_dot) --format {fmt} does not "
            "export yet; serve it with `bigjax generate`"
        )
    if fmt == "stablehlo" and not causal_lm:
        raise DeployError(
            f"{where} trained a {family} {task} model; --format stablehlo exports the decode step of a GPT causal LM"
        )
    if fmt == "onnx" and not (causal_lm or (task == "classification" and family in ("cnn", "resnet", "vit"))):
        raise DeployError(
            f"{where} trained a {family} {task} model; --format onnx exports a GPT causal LM or an image "
            "classifier (cnn, resnet, vit)"
        )


def restore_on_one_device(config, mngr, step: int):
    """(setup, variables) of checkpoint `step`, restored onto one device: serving needs no parallelism."""
    from bigjax.run.setup import make_setup

    config = config_lib.from_dict(config.to_dict())
    config.mesh.update(dict(data=1, fsdp=1, tensor=1))
    setup = make_setup(config, devices=jax.devices()[:1])
    return setup, checkpoint.restore_variables(mngr, step, setup.variables_target())
