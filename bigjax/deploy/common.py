"""What both export formats share: the refusals, the step, restoring a checkpoint onto one device."""

from __future__ import annotations

import jax

from bigjax import config as config_lib
from bigjax import families
from bigjax.compress.variant import Variant
from bigjax.errors import UserError
from bigjax.parallel.mesh import MESH_AXES


class DeployError(UserError):
    """A run or a request that cannot be exported: a message for the user."""


INSTALL_DEPLOY = "pip install 'bigjax[deploy]'"  # the extra holding both formats' optional dependencies


def check_exportable(config, fmt: str, where) -> None:
    """Refuse, with what can be exported, a run the format does not cover."""
    refusal = Variant.of(config).float_export_refusal(where)
    if refusal:
        raise DeployError(f"{refusal} (--format {fmt} exports float models)")
    family, task = config.model.family, config.task.name
    if config.model.get("moe", {}).get("num_experts"):
        raise DeployError(
            f"{where} trained a mixture of experts, whose grouped matmuls (ragged_dot) --format {fmt} does not "
            "export yet; serve it with `bigjax generate`"
        )
    if not families.deploys(family, task, fmt):
        raise DeployError(
            f"{where} trained a {family} {task} model; --format {fmt} exports {families.EXPORT_FORMATS[fmt]} of: "
            f"{families.deployed_in(fmt)}"
        )


def restore_on_one_device(config, run, step: int):
    """(setup, variables) of checkpoint `step` of `run` (a workdir.Run), restored onto one device: serving needs
    no parallelism."""
    from bigjax.run.setup import make_setup

    config = config_lib.from_dict(config.to_dict())
    config.mesh.update({axis: 1 for axis in MESH_AXES})
    setup = make_setup(config, devices=jax.devices()[:1])
    return setup, run.restore_onto(setup, step)
