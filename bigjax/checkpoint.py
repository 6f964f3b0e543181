"""Orbax checkpoints in WORKDIR/checkpoints/STEP: params, optimizer state, model state (BatchNorm statistics,
where a model has them), data-iterator state, config.

Parameters and optimizer state are separate items so that eval, generation and fine-tuning can restore the
parameters alone. Restores take their target shardings from the *current* mesh, so a run can resume on a
different mesh shape than the one that saved it. Saves are async: training continues while they are written;
Orbax commits a step only when it is complete, so readers never see a half-written checkpoint.
"""

from __future__ import annotations

import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp

from bigjax import config as config_lib


def checkpoint_dir(workdir) -> pathlib.Path:
    return pathlib.Path(workdir).absolute() / "checkpoints"


def manager(
    workdir, keep: int = 3, read_only: bool = False, best_metric: str = "", best_mode: str = "max"
) -> ocp.CheckpointManager:
    """`best_metric`: checkpoints saved with eval metrics are ranked by it, and the best one is kept besides the
    newest `keep` (early stopping); `mngr.best_step()` names it."""
    retention = dict(max_to_keep=keep)
    if best_metric and not read_only:
        retention = dict(
            best_fn=lambda saved_metrics: saved_metrics[best_metric],
            best_mode=best_mode,
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(
                [
                    ocp.checkpoint_managers.LatestN(keep),
                    ocp.checkpoint_managers.BestN(
                        get_metric_fn=lambda saved_metrics: saved_metrics[best_metric],
                        reverse=best_mode == "min",
                        n=1,
                        keep_checkpoints_without_metrics=False,
                    ),
                ]
            ),
        )
    options = ocp.CheckpointManagerOptions(
        create=not read_only,
        read_only=read_only,
        enable_async_checkpointing=not read_only,
        **retention,
    )
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def save(mngr: ocp.CheckpointManager, step: int, state, data_state: dict, config, eval_metrics=None) -> None:
    """Start an async save of everything a resume needs (and the eval metrics early stopping ranks it by)."""
    items = dict(
        params=ocp.args.StandardSave(state.params),
        opt_state=ocp.args.StandardSave(state.opt_state),
        data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(config.to_dict()),
    )
    if state.model_state:  # Orbax refuses an empty item; most models have no state besides parameters
        items["model_state"] = ocp.args.StandardSave(state.model_state)
    mngr.save(step, args=ocp.args.Composite(**items), metrics=eval_metrics)


def restore_train_state(mngr, step: int, target_state):
    """(state, data_state) at `step`, laid out as `target_state` (ShapeDtypeStructs with shardings) says."""
    items = dict(
        params=ocp.args.StandardRestore(target_state.params),
        opt_state=ocp.args.StandardRestore(target_state.opt_state),
        data=ocp.args.JsonRestore(),
    )
    if target_state.model_state:
        items["model_state"] = ocp.args.StandardRestore(target_state.model_state)
    restored = mngr.restore(step, args=ocp.args.Composite(**items))
    step_array = jax.device_put(np.int32(step), target_state.step.sharding)
    state = target_state.replace(
        step=step_array,
        params=restored["params"],
        opt_state=restored["opt_state"],
        model_state=restored["model_state"] if target_state.model_state else {},
    )
    return state, restored["data"]


def restore_variables(mngr, step: int, target_variables: dict) -> dict:
    """The model's variables alone, {"params": ..., other collections}, onto the target's shardings: for eval,
    generation and fine-tuning. Optimizer state and data state are not read."""
    state_target = dict(target_variables)
    params_target = state_target.pop("params")
    items = dict(params=ocp.args.StandardRestore(params_target))
    if state_target:
        items["model_state"] = ocp.args.StandardRestore(state_target)
    restored = mngr.restore(step, args=ocp.args.Composite(**items))
    return {"params": restored["params"], **(restored["model_state"] if state_target else {})}


def saved_config(mngr, step: int):
    restored = mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return config_lib.from_dict(restored["config"])


def saved_params(mngr, step: int) -> dict:
    """The tree of the parameters saved at `step`, as metadata (shape, dtype): nothing is read but the index."""
    reader = ocp.CheckpointManager(
        mngr.directory,
        item_handlers={"params": ocp.StandardCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(read_only=True),
    )
    return reader.item_metadata(step)["params"].tree


def restore_params_subset(mngr, step: int, target: dict) -> dict:
    """Only the parameters named in `target` (a sub-tree of those saved, ShapeDtypeStructs with shardings),
    restored onto its shardings: fine-tuning loads a backbone and leaves the rest of a checkpoint unread."""
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    args = ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True)
    return mngr.restore(step, args=ocp.args.Composite(params=args))["params"]
