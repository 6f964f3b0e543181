"""`bigjax quantize`: post-training quantization of a trained run into a new workdir.

    bigjax quantize --workdir DIR --out DIR2 [--bits 8|4] [--mode weight_only|dynamic] [--sub-channel N] [--step N]

DIR2 is a workdir like any run's, holding a committed checkpoint of the quantized parameters at the step quantized:
the kernels as int8 or int4 arrays with their float32 scales (integers on disk, not float values rounded to a
grid), and everything that stays float (bigjax.compress.quantized says what and why) as it was. Its config.json is
DIR's with `quant` set, so `bigjax eval`, `generate` and `bench` build the quantized model from it and run it
unchanged:

    bigjax eval --workdir DIR2 --once
    bigjax generate --workdir DIR2 --prompt "ROMEO:"
    bigjax bench --config DIR2/config.json

What DIR2 does not hold: optimizer state (integer weights are not trained; `bigjax train` refuses a quantized
config with one line) and the data iterator's position. Its `total_steps` is the step quantized, so the eval job
that follows it stops after that step. `quantized.json` records where it came from.

The float parameters are restored onto this process's mesh (DIR's mesh config), quantized shard by shard inside
one jit whose outputs have the quantized tree's shardings, and saved by the trainer's checkpoint writer under
DIR2's workdir lock. DIR's checkpoints and config are only read (library warnings go to DIR/logs, as for export).
A pruned run's zeros stay exact zeros (absmax rounding maps 0 to 0).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from bigjax import config as config_lib
from bigjax import paths
from bigjax.compress import quantized
from bigjax.compress.variant import Quant, Variant
from bigjax.errors import UserError
from bigjax.run import checkpoint
from bigjax.run import state as state_lib
from bigjax.run.setup import make_setup
from bigjax.run.workdir import Run

SOURCE_FILE = "quantized.json"  # in DIR2: the run, step and settings it was quantized from


class QuantizeError(UserError):
    """A quantization that cannot be done: a message for the user."""


def quantize(workdir, out, bits=None, mode=None, sub_channel: int | None = None, step=None):
    """Write `out` as the quantized run of `workdir`'s newest committed checkpoint (or `step`); returns a dict of
    what was done (step, the kernels quantized, parameters, bits, mode). `bits`, `mode` and `sub_channel` default to
    those a quantization-aware run trained for, else to int8 weight-only."""
    run, out = Run(workdir), paths.check_new_output(out)
    workdir, config = run.path, run.saved_config()
    variant = Variant.of(config)
    if variant.lora:
        raise QuantizeError(
            f"{workdir} is a LoRA run (config.lora.rank={variant.lora.rank}); merge its adapters first (`bigjax lora "
            "merge --workdir RUN --out MERGED`) and quantize MERGED"
        )
    if variant.holds_integers:
        raise QuantizeError(
            f"{workdir} is a quantized run already (config.quant.bits={variant.bits}); quantize the float run "
            "it came from"
        )
    bits, mode, sub_channel = settings_for(variant, bits, mode, sub_channel)
    step = run.committed_step(step)

    target = quantized_config(config, bits, mode, sub_channel, step)
    float_setup = make_setup(config)
    quant_setup = make_setup(target)  # a sub_channel that does not divide a kernel is refused here
    with quant_setup.sharding.activate():
        boxed = jax.eval_shape(quant_setup.task.init_variables, jax.random.key(target.seed))
    kernels = quantized.quantized_paths(boxed["params"])
    if not kernels:
        raise QuantizeError(
            f"{config.model.family}: no layer of this model is quantized (convolutions, embeddings and the output "
            "layer stay float; see `bigjax/compress/quantized.py`), so quantizing it would change nothing"
        )

    float_params, model_state = state_lib.split_variables(run.restore_onto(float_setup, step))
    to_integers = jax.jit(
        lambda params: quantized.quantize_params(params, boxed["params"]),
        out_shardings=quant_setup.state_shardings.params,
    )
    with quant_setup.sharding.activate():
        params = to_integers(float_params)
    state = state_lib.TrainState(
        step=jnp.int32(step), params=params, opt_state=quant_setup.abstract_state.opt_state, model_state=model_state
    )

    source = dict(workdir=str(workdir), step=step, **dataclasses.asdict(quant_setup.variant.quant), kernels=kernels)
    checkpoint.write_derived_run(out, state, target, SOURCE_FILE, source)
    return dict(step=step, kernels=kernels, parameters=state_lib.count_parameters(float_params), bits=bits, mode=mode)


def settings_for(variant: Variant, bits, mode, sub_channel) -> tuple:
    """(bits, mode, sub_channel): as asked, else as a quantization-aware run trained for, else int8 weight-only. A
    QAT run is quantized only as it was trained: its weights learned that rounding, not another."""
    if variant.kind != "qat":
        return bits or 8, mode or "weight_only", sub_channel
    trained = variant.quant
    asked = dict(bits=bits, mode=mode, sub_channel=sub_channel)
    differ = [
        f"--{key.replace('_', '-')} {value}"
        for key, value in asked.items()
        if value not in (None, getattr(trained, key))
    ]
    if differ:
        raise QuantizeError(
            f"this run was trained for int{trained.bits} {trained.mode} (sub-channel {trained.sub_channel}) by "
            f"quantization-aware training (config.quant.qat); {' '.join(differ)} is another rounding than it learned. "
            "Leave those flags out to quantize it as trained"
        )
    return trained.bits, trained.mode, trained.sub_channel


def quantized_config(config, bits: int, mode: str, sub_channel: int | None, step: int):
    """`config` with its quant section set (checked like any config), ending at `step`."""
    target = config_lib.from_dict(config.to_dict())
    Variant(Quant(bits, mode, sub_channel, qat=False)).write_into(target)  # sub_channel None: the config's
    if bits == 0:
        raise QuantizeError("--bits 0 is no quantization; use --bits 8 or --bits 4")
    target.total_steps = step or target.total_steps  # the eval job that follows DIR2 ends after this checkpoint
    config_lib.check_values(target)
    return target
