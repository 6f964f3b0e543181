"""`bigjax bench`: how fast the train step runs on these devices, on synthetic data of the experiment's shapes.

    bigjax bench --config experiments/gpt2_124m.py [--steps 100] [--warmup 10] [--windows 5] [--json PATH]
                 [--config.a.b=VALUE ...]

What is timed: the step `bigjax train` compiles (`step.compile_train_step` of the same `Setup`: the same
optimizer and frozen parameters, shardings and donation; only the data source is synthetic),
fed batches that already sit on the devices, so neither the input pipeline nor host-to-device copies are in the
figure (`bigjax train` with `data.source=synthetic` measures the whole loop). No checkpoints, no eval.

How: the step is compiled ahead of time (the compile time is reported apart), `warmup` steps are run and waited
for, then the timed steps run in `windows` consecutive windows. A window is dispatched without any host sync and
ended by one `block_until_ready` on its last step's outputs; the steps depend on each other through the state, so
the last one being ready means all are done. Tokens/s and examples/s are all timed steps over the summed window
times; the step time's median and spread (min, max) are those of the windows' mean step times: W windows, W host
syncs in all, none inside a window.

`--eval` times the eval step instead (the forward pass and loss of `bigjax eval`, no gradient or update; its
FLOPs a third of the train step's, the forward share of 6N), in the same windows. A quantized config
(`config.quant.bits` without QAT or LoRA, a workdir of `bigjax quantize`) is always timed so: integer weights are
run, not trained. So
`bigjax bench --config DIR/config.json --eval` against `--config DIR2/config.json` is the speed of the float run's
eval against the quantized one's, on the same shapes.

MFU is model FLOPs (the task's count, not XLA's, which includes remat's recomputation) per second over the
devices' dense bf16 peak from `bigjax.ops.devices.PEAK_FLOPS`: by the PaLM formula (attention counted in full, as
nanoGPT
does) and, for causal LMs, with attention halved as a causal mask leaves it (as MaxText does).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import pathlib
import platform
import statistics
import time

import jax
import numpy as np

from bigjax import config as config_lib
from bigjax import data
from bigjax.errors import UserError
from bigjax.ops import devices as devices_lib
from bigjax.ops import metrics
from bigjax.parallel import pipeline as pipeline_lib
from bigjax.run import state as state_lib
from bigjax.run import step as step_lib
from bigjax.run.setup import make_setup

BATCHES_ON_DEVICE = 2  # distinct synthetic batches placed on the devices once and used in turn
VERSIONS_REPORTED = ("jax", "jaxlib", "flax", "optax", "jax-cuda12-plugin", "jax-cuda13-plugin", "libtpu")


class BenchError(UserError):
    """Bench arguments that cannot work: a message for the user."""


@dataclasses.dataclass(frozen=True)
class Timing:
    compile_seconds: float
    window_steps: list[int]
    window_seconds: list[float]

    @property
    def steps(self) -> int:
        return sum(self.window_steps)

    @property
    def seconds(self) -> float:
        return sum(self.window_seconds)

    @property
    def window_step_times(self) -> list[float]:
        return [seconds / steps for seconds, steps in zip(self.window_seconds, self.window_steps, strict=True)]


def bench(
    config, steps: int = 100, warmup: int = 10, windows: int = 5, config_name: str = "", overrides=(), eval_step=False
) -> dict:
    """Compile and time the train step of `config` (or its eval step) on synthetic data; the report as a JSON-ready
    dict."""
    if warmup < 0 or steps < 1 or not 1 <= windows <= steps:
        raise BenchError(
            f"--steps={steps} --warmup={warmup} --windows={windows}: need steps >= windows >= 1 and warmup >= 0"
        )
    setup = make_setup(synthetic(config))
    config = setup.config
    state = setup.init_state()
    parameters = state_lib.count_parameters(state.params)
    metrics.say(
        f"bench: {config_name or 'config'} on {setup.sharding.describe()} x {jax.devices()[0].device_kind}, "
        f"{parameters / 1e6:.2f}M parameters, batch {config.batch_size}"
    )

    forward_only = eval_step or setup.variant.inference_only
    host_batches = data.train_batches(config)
    batches = [setup.sharding.global_batch(next(host_batches)) for _ in range(BATCHES_ON_DEVICE)]
    if forward_only:
        step, state, compile_seconds = start_eval_step(setup, state, batches[0])
    else:
        step, compile_seconds = step_lib.compile_train_step(setup)
        if setup.teacher is not None:  # distillation: the teacher's forward pass is part of the step timed
            step = step_lib.with_teacher(step, setup.teacher.load())
    metrics.say(f"bench: compiled in {compile_seconds:.1f}s; {warmup} warm-up steps, then {steps} timed")
    state = run_steps(step, state, batches, warmup)
    timing = time_windows(step, state, batches, steps, windows, compile_seconds)
    return report(setup, timing, parameters, config_name, list(overrides), warmup, forward_only)


def start_eval_step(setup, state, batch):
    """The eval job's step (the task's loss sums, train=False) as a (state, batch) -> (state, sums) step like the
    train step, so that the same windows time it; the state is donated and returned unchanged (aliased, not
    copied). Compiled by its first call, whose time is the compile time (and one step's):
    (jitted step, the state after it, seconds).

    Called through jit rather than compiled ahead of time: on the CPU, jax 0.10's ahead-of-time executable wants
    int4 arguments packed two to a byte, while the arrays jit makes carry the unpacked layout, and it refuses them."""

    def forward(state, batch):
        return state, setup.task.loss_sums(state.params, state.model_state, batch, train=False)[0]

    sharding = setup.sharding
    jitted = jax.jit(
        forward,
        in_shardings=(setup.state_shardings, sharding.batch),
        out_shardings=(setup.state_shardings, sharding.replicated),
        donate_argnums=(0,),
    )

    def step(state, batch):
        with sharding.activate():
            return jitted(state, batch)

    started = time.perf_counter()
    state = jax.block_until_ready(step(state, batch))[0]
    return step, state, time.perf_counter() - started


def synthetic(config):
    """A copy of `config` reading synthetic data of the same shapes."""
    config = config_lib.from_dict(config.to_dict())
    config.data.source = "synthetic"
    return config


def run_steps(step, state, batches: list, count: int, first: int = 0):
    """`count` steps, dispatched back to back, then one wait for the last: the state after them."""
    outputs = state
    for i in range(count):
        state, step_metrics = step(state, batches[(first + i) % len(batches)])
        outputs = (state, step_metrics)
    jax.block_until_ready(outputs)
    return state


def time_windows(step, state, batches: list, steps: int, windows: int, compile_seconds: float) -> Timing:
    sizes = window_sizes(steps, windows)
    seconds, done = [], 0
    for size in sizes:
        started = time.perf_counter()
        state = run_steps(step, state, batches, size, first=done)
        seconds.append(time.perf_counter() - started)
        done += size
    return Timing(compile_seconds, sizes, seconds)


def window_sizes(steps: int, windows: int) -> list[int]:
    """`steps` split into `windows` consecutive windows as equal as can be (the first ones one longer)."""
    return [len(part) for part in np.array_split(np.arange(steps), windows)]


def report(setup, timing: Timing, parameters: int, config_name: str, overrides, warmup, forward_only=False) -> dict:
    config, task, mesh = setup.config, setup.task, setup.mesh
    devices = mesh.devices.size
    examples_per_second = config.batch_size * timing.steps / timing.seconds
    share = 1 / 3 if forward_only else 1  # the forward pass is 2N of the 6N a trained token costs
    flops = task.flops_per_example() * share
    causal_flops = task.causal_flops_per_example() * share if hasattr(task, "causal_flops_per_example") else None
    step_times = timing.window_step_times
    peak_bytes, memory_note = peak_memory()
    return {
        "config": config_name,
        "overrides": overrides,
        "data_source": config.data.source,
        "step": "eval (forward only)" if forward_only else "train",
        "quant": config.quant.to_dict(),
        "input": f"{BATCHES_ON_DEVICE} synthetic batches resident on the devices (input pipeline not timed)",
        "device_kind": jax.devices()[0].device_kind,
        "num_devices": devices,
        "num_processes": jax.process_count(),
        "mesh": dict(mesh.shape),
        "pipeline": pipeline_lib.schedule_of(config.model, mesh.shape["stage"]),  # None: no pipeline
        "versions": versions(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "parameters": parameters,
        "batch_size": config.batch_size,
        "tokens_per_example": task.tokens_per_example,
        "warmup_steps": warmup,
        "timed_steps": timing.steps,
        "windows": len(timing.window_steps),
        "timed_seconds": timing.seconds,
        "compile_seconds": timing.compile_seconds,
        "examples_per_second": examples_per_second,
        "tokens_per_second": examples_per_second * task.tokens_per_example if task.tokens_per_example else None,
        "step_time_median": statistics.median(step_times),
        "step_time_min": min(step_times),
        "step_time_max": max(step_times),
        "window_step_times": step_times,
        "flops_per_example": flops,
        "causal_flops_per_example": causal_flops,
        "model_flops_per_second": flops * examples_per_second,
        "peak_flops_per_device": devices_lib.peak_flops(),
        "mfu": metrics.mfu(flops * examples_per_second, devices),
        "mfu_causal": metrics.mfu(causal_flops * examples_per_second, devices) if causal_flops is not None else None,
        "peak_memory_bytes": peak_bytes,
        "peak_memory_note": memory_note,
    }


def peak_memory() -> tuple[int | None, str]:
    """The most memory any local device has held in this process, and where the figure comes from."""
    stats = [device.memory_stats() for device in jax.local_devices()]
    if not all(stats) or not all("peak_bytes_in_use" in s for s in stats):
        platform_name = jax.local_devices()[0].platform
        return None, f"unavailable: {platform_name} devices report no memory_stats()['peak_bytes_in_use']"
    return max(int(s["peak_bytes_in_use"]) for s in stats), "max over local devices of peak_bytes_in_use"


def versions() -> dict:
    found = {"python": platform.python_version()}
    for name in VERSIONS_REPORTED:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def format_report(result: dict) -> str:
    def rate(value, unit):
        return f"{value:,.0f} {unit}" if value is not None else "n/a"

    def percent(value):
        return f"{value:.1%}" if value is not None else "n/a (no peak known for this device)"

    memory = result["peak_memory_bytes"]
    lines = [
        f"{result['config']} {' '.join('--' + o for o in result['overrides'])}".rstrip(),
        f"  step           {result['step']}"
        + (f", int{result['quant']['bits']} {result['quant']['mode']}" if result["quant"]["bits"] else ""),
        f"  devices        {result['num_devices']} x {result['device_kind']}, mesh {result['mesh']}",
        *([f"  {pipeline_lib.describe(result['pipeline'])}"] if result.get("pipeline") else []),
        f"  tokens/s       {rate(result['tokens_per_second'], 'tokens/s')}",
        f"  examples/s     {rate(result['examples_per_second'], 'examples/s')}",
        f"  step time      median {result['step_time_median'] * 1e3:.2f} ms (min {result['step_time_min'] * 1e3:.2f}, "
        f"max {result['step_time_max'] * 1e3:.2f}) over {result['windows']} windows, {result['timed_steps']} steps",
        f"  MFU            {percent(result['mfu'])} (PaLM: 6N + 12·L·H·Q·T)",
        f"  MFU causal     {percent(result['mfu_causal'])} (attention halved, MaxText)",
        f"  compile        {result['compile_seconds']:.1f} s",
        f"  peak memory    {f'{memory / 2**30:.2f} GiB' if memory is not None else result['peak_memory_note']}",
        f"  versions       {' '.join(f'{k} {v}' for k, v in result['versions'].items())}",
    ]
    return "\n".join(lines)


def write_json(result: dict, path) -> None:
    if jax.process_index() == 0:
        path = pathlib.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
