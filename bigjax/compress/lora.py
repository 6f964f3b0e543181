"""LoRA and QLoRA runs: their checks, their adapters saved and loaded on their own, and merging them into the base.

    c.lora = dict(rank=8, alpha=16.0, targets=".*")           # + c.init_from.workdir=DIR (or hf:PATH) to adapt
    c.quant.bits = 4                                          # QLoRA: the frozen base held as int4
    bigjax lora save  --workdir DIR --out ADAPTERS            # the trained parameters alone: adapters.safetensors
    bigjax train ... --config.lora.adapters=ADAPTERS          # a new run starting from them
    bigjax lora merge --workdir DIR --out DIR2                # a plain float run: W + (alpha/rank) A B

The model is bigjax.compress.quantized's (Qwix's LoraProvider): beside every targeted kernel `kernel_lora_a`
[inputs, rank] and `kernel_lora_b` [rank, outputs], B zero at the start. The run's Variant.frozen keeps every other
parameter fixed but `lora.train`'s (a classifier's new head): no gradient, no optimizer state, no update. So only
the adapters (and those) get optimizer state; the checkpoint holds the base too, so a LoRA run resumes, evaluates
and generates like any run.

The adapters file is safetensors, one array per "/"-named parameter (`layers/mlp/up/kernel_lora_a`, stacked over
the layers as bigjax holds them), with `adapters.json` beside it: the LoRA settings (a run loading them must have
the same), the model they were trained on, and where they came from.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from bigjax import config as config_lib
from bigjax import params as params_lib
from bigjax import paths
from bigjax.compress import quantized
from bigjax.compress.variant import Variant
from bigjax.errors import UserError
from bigjax.ops import metrics
from bigjax.run import checkpoint
from bigjax.run import state as state_lib
from bigjax.run.workdir import Run

WEIGHTS_FILE = "adapters.safetensors"
SETTINGS_FILE = "adapters.json"
MERGED_FILE = "merged.json"  # in a merged workdir: the LoRA run, step and settings it came from
MUST_MATCH = ("rank", "alpha", "targets", "train")  # the settings a run loading adapters must share with theirs


class LoraError(UserError):
    """A LoRA setting or request that cannot work: a message for the user."""


def trained_names(variant, freeze: str, params) -> list[str]:
    """The "/"-names of what a LoRA run (its `variant`, and config.freeze) trains: the adapters and lora.train's
    parameters."""
    frozen = params_lib.by_path(variant.frozen(params, freeze))
    return [name for name, fixed in frozen.items() if not fixed]


# --------------------------------------------------------------------------------------------------
# Adapters on their own


def save(workdir, out, step: int | None = None) -> dict:
    """Write the trained parameters of `workdir`'s checkpoint (the newest, or `step`) to `out`; returns what was
    written. Every process takes part (the arrays are gathered); process 0 writes."""
    from bigjax.hf import files
    from bigjax.run.setup import make_setup

    run, out = Run(workdir), paths.check_new_output(out)  # saved adapters are never replaced
    config = lora_run_config(run, "save its adapters")
    step = run.committed_step(step)
    setup = make_setup(config)
    params, _ = restore(setup, run, step)
    names = trained_names(setup.variant, config.freeze, params)
    flat = params_lib.by_path(params)
    arrays = {name: np.asarray(multihost_utils.process_allgather(flat[name], tiled=True)) for name in names}
    settings = dict(
        lora={key: getattr(setup.variant.lora, key) for key in MUST_MATCH},
        model=config.model.to_dict(),
        quant=config.quant.to_dict(),
        workdir=str(run),
        step=step,
        shapes={name: list(array.shape) for name, array in arrays.items()},
    )
    if jax.process_index() == 0:
        with paths.writing_new_output(out):  # a failed write (a full disk) leaves nothing
            files.save_safetensors(arrays, out / WEIGHTS_FILE)
            (out / SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n")
    return dict(step=step, names=names, numbers=int(sum(a.size for a in arrays.values())))


def load(state, setup):
    """`state` (a run starting from scratch) with its trained parameters from config.lora.adapters."""
    from safetensors import safe_open

    directory, wanted = check_adapters(setup)
    shardings = params_lib.by_path(setup.state_shardings.params)
    flat = params_lib.by_path(state.params)
    with safe_open(str(directory / WEIGHTS_FILE), framework="numpy") as f:
        loaded = {name: jax.device_put(f.get_tensor(name).astype(flat[name].dtype), shardings[name]) for name in wanted}
    metrics.say(f"lora: loaded {len(loaded)} trained parameters from {directory}")
    params = jax.tree_util.tree_map_with_path(
        lambda path, leaf: loaded.get(params_lib.param_path(path), leaf), state.params
    )
    return state.replace(params=params)


def check_adapters(setup) -> tuple:
    """(the directory, the names to load) of config.lora.adapters, or a LoraError if they do not fit this run: other
    LoRA settings, names or shapes. Reads their settings and the weights file's header alone, so that `bigjax train`
    refuses them before it writes anything."""
    from safetensors import safe_open

    config, directory = setup.config, paths.workdir(setup.config.lora.adapters)
    settings = read_settings(directory)
    differences = [
        f"lora.{key}: {settings['lora'][key]!r} there, {config.lora[key]!r} here"
        for key in MUST_MATCH
        if config_lib._normalize(settings["lora"][key]) != config_lib._normalize(config.lora[key])
    ]
    if differences:
        raise LoraError(
            f"config.lora.adapters={directory} were trained with other LoRA settings ({'; '.join(differences)}); "
            "set this run's config.lora to theirs"
        )
    params = setup.state_target().params
    flat = params_lib.by_path(params)
    wanted = trained_names(setup.variant, config.freeze, params)
    with safe_open(str(directory / WEIGHTS_FILE), framework="numpy") as f:
        stored = set(f.keys())
        missing = [name for name in wanted if name not in stored]
        if missing:
            raise LoraError(
                f"config.lora.adapters={directory} has no {quantized.listed(missing)} that this model trains: they "
                "were saved from another model"
            )
        for name in wanted:
            shape = tuple(f.get_slice(name).get_shape())
            if shape != tuple(flat[name].shape):
                raise LoraError(
                    f"config.lora.adapters={directory}: {name} has shape {shape} there but {tuple(flat[name].shape)} "
                    "here; the adapters were saved from another model"
                )
    return directory, wanted


def read_settings(directory) -> dict:
    path = directory / SETTINGS_FILE
    if not path.exists() or not (directory / WEIGHTS_FILE).exists():
        raise LoraError(
            f"config.lora.adapters={directory} holds no {WEIGHTS_FILE} and {SETTINGS_FILE}; write them with "
            "`bigjax lora save --workdir RUN --out DIR`"
        )
    try:
        return json.loads(path.read_text())
    except ValueError as error:
        raise LoraError(f"{path} is not valid JSON ({error}); save the adapters again") from None


# --------------------------------------------------------------------------------------------------
# Merging


def merge(workdir, out, step: int | None = None) -> dict:
    """Write `out` as a plain float run (lora and quant off) whose kernels are the base's plus (alpha/rank) A B,
    at `workdir`'s newest checkpoint (or `step`); it evaluates, generates, exports and trains on like any run (from
    the step merged, with a fresh optimizer, on the data where the LoRA run stopped)."""
    from bigjax.run.setup import make_setup

    run, out = Run(workdir), paths.check_new_output(out)
    config = lora_run_config(run, "merge")
    step = run.committed_step(step)
    setup = make_setup(config)
    target = merged_config(config, step)
    merged_setup = make_setup(target)
    params, model_state = restore(setup, run, step)
    boxed = setup.boxed_params()
    boxes = params_lib.boxes_by_path(boxed)

    def merged(params):
        floats = quantized.dequantize_params(params, boxed)
        return merge_adapters(floats, boxes, setup.variant.lora.alpha / setup.variant.lora.rank)

    with merged_setup.sharding.activate():
        params = jax.jit(merged, out_shardings=merged_setup.state_shardings.params)(params)
        opt_state = jax.jit(merged_setup.tx.init, out_shardings=merged_setup.state_shardings.opt_state)(params)
    state = state_lib.TrainState(step=jnp.int32(step), params=params, opt_state=opt_state, model_state=model_state)
    source = dict(workdir=str(run), step=step, lora=config.lora.to_dict(), quant=config.quant.to_dict())
    # The data's position goes with it: fine-tuned on in DIR2, the merged run reads on where the LoRA run stopped.
    data_state = checkpoint.saved_json(run.reader(), step, "data")
    checkpoint.write_derived_run(out, state, target, MERGED_FILE, source, data_state)
    return dict(step=step, kernels=adapted_kernels(boxes))


def merge_adapters(floats: dict, boxes: dict, scale: float) -> dict:
    """The float parameters with each adapted kernel replaced by kernel + scale * A B and the adapters dropped.
    A is [contracted..., rank] (Einsum) or [prod(contracted), rank] (Dense), B [rank, kept...] or [rank,
    prod(kept)]: both layouts put the contracted axes first, as the kernel does, so A B reshapes to the kernel."""
    flat = params_lib.by_path(floats)
    for kernel in adapted_kernels(boxes):
        a, b = flat.pop(kernel + "_lora_a"), flat.pop(kernel + "_lora_b")
        product = lambda a, b: jnp.tensordot(a, b, axes=1)  # noqa: E731
        if tuple(getattr(boxes[kernel + "_lora_a"], "names", ()))[:1] == (quantized.SCAN_AXIS,):
            product = jax.vmap(product)  # stacked over scanned layers: one product per layer, the layers leading
        delta = product(a, b).reshape(flat[kernel].shape)
        flat[kernel] = (flat[kernel] + scale * delta).astype(flat[kernel].dtype)
    return params_lib.nest(flat)


def adapted_kernels(boxes: dict) -> list[str]:
    return [name.removesuffix("_lora_a") for name in boxes if name.endswith("_lora_a")]


def merged_config(config, step: int):
    target = config_lib.from_dict(config.to_dict())
    Variant().write_into(target)  # float, no adapters
    target.init_from.workdir = ""
    target.total_steps = step  # the eval job that follows DIR2 ends after this checkpoint
    config_lib.check_values(target)
    return target


# --------------------------------------------------------------------------------------------------
# Shared


def lora_run_config(run: Run, what: str):
    config = run.saved_config()
    if not Variant.of(config).lora:
        raise LoraError(f"{run} is not a LoRA run (config.lora.rank=0): there are no adapters to {what}")
    return config


def restore(setup, workdir, step: int) -> tuple[dict, dict]:
    """(params, model state) of `workdir`'s checkpoint `step` (a path or a Run), on `setup`'s mesh."""
    return state_lib.split_variables(Run(workdir).restore_onto(setup, step))
