"""`bigjax plan`: what one train step needs on each device, known before a job waits hours in a queue.

    bigjax plan --config experiments/llama_1b.py                                   # the devices present
    bigjax plan --config experiments/llama_1b.py --devices 64 --device-kind h100   # devices that are not

Parameters, optimizer state and the batch are exact either way: their shapes come from `jax.eval_shape` of the
real init and their per-device shards from the real sharding rules (on an AbstractMesh when the devices are
not present). Where the devices are present, the train step itself is lowered with abstract inputs and
compiled, and XLA's memory analysis gives what the step needs beyond its inputs (gradients, activations,
scratch) and its cost analysis the FLOPs; nothing is allocated. Otherwise gradients and activations come from
the model below, which states what it counts.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import jax
import numpy as np

from bigjax import config as config_lib
from bigjax import data
from bigjax.errors import UserError
from bigjax.models.gpt import GPTConfig, parameter_count
from bigjax.models.layers import attention_kernel, mask_beyond_causal, resolve_attention
from bigjax.ops import devices
from bigjax.parallel import mesh as mesh_lib
from bigjax.parallel import pipeline as pipeline_lib
from bigjax.run import state as state_lib
from bigjax.run import step as step_lib
from bigjax.run.setup import make_setup

GPU_MEMORY_FRACTION = 0.75  # JAX's default share of a GPU's memory (XLA_PYTHON_CLIENT_MEM_FRACTION)
ASSUMED_MFU = 0.4  # for the step-time estimate: what a well-tuned dense transformer step reaches


class PlanError(UserError):
    """The plan cannot be made as asked (an unknown device kind, say): a message for the user."""


@dataclasses.dataclass
class Plan:
    source: str  # "compiled" (XLA's analysis on the devices present) | "model" (devices not present)
    device_kind: str
    num_devices: int
    mesh: dict
    parameters: int
    per_device: dict  # bytes: parameters, optimizer_state, gradients, activations, batch, total
    xla: dict | None  # XLA's memory analysis of the compiled step, per device (bytes)
    usable_memory: float | None  # bytes one device can give the step
    memory_note: str
    flops_per_step: float  # model FLOPs of one step, all devices (6N per token + attention)
    xla_flops_per_device: float | None
    ideal_step_seconds: float | None  # flops_per_step at ASSUMED_MFU of the devices' peak
    warnings: list
    measured_peak: int | None = None  # --measure: the most memory a device held over a few real steps
    pipeline: dict | None = None  # config.mesh.stage > 1: the schedule and its bubble (pipeline.schedule_of)

    @property
    def fits(self) -> bool | None:
        return None if self.usable_memory is None else self.per_device["total"] <= self.usable_memory


def make_plan(config, num_devices: int | None = None, device_kind: str | None = None, measure: bool = False) -> Plan:
    """Plan the train step of `config` on `num_devices` devices of `device_kind` (default: those present).

    `measure` also runs a few steps on the devices present and records the memory they really used.
    """
    present = jax.devices()
    kind = resolve_device_kind(device_kind) if device_kind else present[0].device_kind
    num_devices = num_devices or len(present)
    compile_here = kind == present[0].device_kind and num_devices == len(present)
    if measure and not (compile_here and present[0].memory_stats()):
        raise PlanError(
            "--measure runs the step on the devices present (without --devices/--device-kind), and they must "
            f"report their memory: GPUs and TPUs do, a CPU does not (here: {len(present)} x {present[0].device_kind})"
        )
    attention = attention_on(kind, config.model)
    if not compile_here and "attention" in config.model:
        # The shapes do not depend on the attention kernel, and cuDNN's cannot be chosen without a GPU here.
        config = config_lib.from_dict(config.to_dict())
        config.model.attention = "xla"
    # The setup `bigjax train` builds (the same optimizer, frozen parameters included), on an AbstractMesh of
    # `num_devices` when those are not the devices present.
    setup = make_setup(config) if compile_here else make_setup(config, num_devices=num_devices)
    task, mesh, abstract_state, shardings = setup.task, setup.mesh, setup.abstract_state, setup.state_shardings

    params = per_device_bytes(abstract_state.params, shardings.params)
    per_device = {
        # Mutable model state (BatchNorm statistics) is counted with the parameters it belongs to.
        "parameters": params + per_device_bytes(abstract_state.model_state, shardings.model_state),
        "optimizer_state": per_device_bytes(abstract_state.opt_state, shardings.opt_state),
        "gradients": params * (1 if config.optim.grad_accum == 1 else 2),  # plus the accumulator
        "activations": activation_bytes(task, config, dict(mesh.shape), attention),
        "batch": batch_bytes(task, config, dict(mesh.shape)),
    }
    if per_device["activations"] is None and not compile_here:
        raise PlanError(
            f"bigjax plan models the activations of GPT-family models only, not config.model.family="
            f"{config.model.family!r}; plan it on the devices present (without --devices and --device-kind)"
        )
    xla = xla_flops = measured = None
    if compile_here:
        compiled, xla, xla_flops = compiled_analysis(setup)
        # XLA's temporaries hold the gradients, the activations and its scratch space: report its split.
        per_device["activations"] = max(xla["temporaries"] - per_device["gradients"], 0)
        if measure:
            measured = measure_peak_bytes(compiled, setup)
    per_device["total"] = xla["peak"] if xla else sum(per_device.values())

    usable, note = usable_memory(kind, present[0] if compile_here else None)
    flops_per_step = task.flops_per_example() * config.batch_size
    peak = devices.peak_flops_of_kind(kind)
    ideal = flops_per_step / (peak * num_devices * ASSUMED_MFU) if peak else None
    plan = Plan(
        source="compiled" if compile_here else "model",
        device_kind=kind,
        num_devices=num_devices,
        mesh=dict(mesh.shape),
        parameters=state_lib.count_parameters(abstract_state.params),
        per_device=per_device,
        xla=xla,
        usable_memory=usable,
        memory_note=note,
        flops_per_step=flops_per_step,
        xla_flops_per_device=xla_flops,
        ideal_step_seconds=ideal,
        warnings=[],
        measured_peak=measured,
        pipeline=pipeline_lib.schedule_of(config.model, mesh.shape["stage"]),
    )
    plan.warnings += replication_warnings(config, plan)
    return plan


def attention_on(device_kind: str, model_config) -> str:
    """The attention kernel `model.attention` picks on that device ("none" for a family without attention)."""
    if "attention" not in model_config:
        return "none"
    return resolve_attention(model_config.attention, model_config.dtype, device_kind)


def resolve_device_kind(name: str) -> str:
    """`h100` -> the device_kind JAX reports for one; a full device_kind passes through if bigjax knows it."""
    if name.lower() in devices.DEVICE_KIND_NAMES:
        return devices.DEVICE_KIND_NAMES[name.lower()]
    if devices.device_memory(name) is not None:
        return name
    raise PlanError(f"unknown --device-kind {name!r}; known: {', '.join(devices.DEVICE_KIND_NAMES)}")


# --------------------------------------------------------------------------------------------------
# Exact parts: shapes and shardings


def per_device_bytes(abstract_tree, shardings) -> int:
    """Bytes of the largest shard set one device holds: each leaf's shard shape times its item size."""
    return int(
        sum(
            math.prod(sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
            for leaf, sharding in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(shardings), strict=True)
        )
    )


def total_bytes(abstract_tree) -> int:
    return int(sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(abstract_tree)))


def batch_bytes(task, config, mesh_shape: dict) -> int:
    """This device's rows of the batch, as the task lays a batch out."""
    rows = config.batch_size // (mesh_shape["data"] * mesh_shape["fsdp"] * mesh_shape["expert"])
    return total_bytes(task.batch_spec(rows))


# --------------------------------------------------------------------------------------------------
# The model for devices not present: what the backward pass keeps


def activation_bytes(task, config, mesh_shape: dict, attention: str) -> int | None:
    """Bytes of activations one device keeps for the backward pass of one microbatch, by remat policy.

    Per token and layer, with a = bytes of the compute dtype and t = the tensor-parallel ways (heads, MLP and
    vocabulary are split over `tensor`; batch over data x fsdp; the sequence over `context`, so that a device holds
    s / c of each row's tokens):
      residual stream and the two norms' inputs and outputs        4 d a
      q, k, v and the attention output (the projections' inputs)   (2 h + 2 kv) hd a / t
      XLA attention: fp32 logits and the probabilities             h s (4 + a) / t   (cuDNN: none, it recomputes,
                                                                   but a call that needs a mask runs XLA's kernel,
                                                                   see attention_kernel; ring: none, its backward
                                                                   pass goes round again)
      context_parallel="all_gather": the gathered keys and values   2 kv hd a (c - 1) / t
      MLP hidden: GELU in/out, or SwiGLU gate, up and product      (2 or 3) f a / t
    remat="full" keeps only each block's input (d a) and recomputes one block at a time; "dots" keeps the
    outputs of every matmul (the projections, and the attention einsums on XLA attention); "dots_no_batch"
    those of the weight matmuls only. Beyond the layers: the logits in the compute dtype, their fp32 copy
    and the fp32 gradient of the loss, V (a + 8) / t per token, for every token, or with `task.loss_chunk` for
    one piece of the sequence at a time. With the weights split (fsdp, or a rule that splits `embed` over
    context), the weights gathered whole for use: one layer's for the forward and one for the backward, and the
    (un)embedding's. Not counted: XLA's scratch and fusion temporaries (the ring's one block of scores at a time).
    None for models other than the GPT family: plan those on their devices.
    """
    m = getattr(task, "model_config", None)
    if not isinstance(m, GPTConfig):
        return None
    a = np.dtype(m.dtype).itemsize
    t, c = mesh_shape["tensor"], mesh_shape.get("context", 1)
    strategy = m.context_parallel if c > 1 else ""
    d, h, kv, hd, f, s, vocab = (
        m.d_model,
        m.num_heads,
        m.num_kv_heads,
        m.head_dim,
        m.mlp_dim,
        config.data.seq_len,
        m.vocab_size,
    )
    if m.moe:  # a MoE layer's hidden activations: the k picked experts' and the shared ones', per token
        f = (m.moe.experts_per_token + m.moe.num_shared_experts) * m.moe.expert_mlp_dim
    mlp_tensors = 3 if m.mlp == "swiglu" else 2
    qkv = (h + 2 * kv) * hd * a / t
    attention_out = h * hd * a / t
    # Packed rows (masked LM, classification) carry segment ids; every bidirectional family packs its rows, so
    # `causal` changes no kernel here.
    packed = "segment_ids" in task.batch_spec(1)
    kernel, _ = attention_kernel(
        attention, mask_beyond_causal(decode=False, strategy=strategy, causal=True, packed=packed)
    )
    scores = h * s * (4 + a) / t if kernel == "xla" and strategy != "ring" else 0
    gathered_kv = 2 * kv * hd * a * (c - 1) / t if strategy == "all_gather" else 0
    mlp = mlp_tensors * f * a / t
    whole_block = 4 * d * a + qkv + gathered_kv + attention_out + scores + mlp
    kept_per_layer = {
        "none": whole_block,
        "full": d * a,
        "dots": d * a + qkv + scores + attention_out + d * a + (mlp_tensors - 1) * f * a / t + d * a,
        "dots_no_batch": d * a + qkv + d * a + (mlp_tensors - 1) * f * a / t + d * a,
    }[m.remat]
    recompute = 0 if m.remat == "none" else whole_block  # one block rebuilt at a time during the backward
    logits = vocab * (a + 8) / t
    batch_axes = mesh_shape["data"] * mesh_shape["fsdp"] * mesh_shape.get("expert", 1)
    rows = config.batch_size // config.optim.grad_accum // batch_axes
    tokens, logit_tokens = rows * s / c, rows * (config.task.loss_chunk or s) / c
    # A pipeline stage keeps those of its own layers (for every micro-batch), and the stage's input and output of
    # every micro-batch (the micro-batches, and what comes back from the last stage).
    layers_here = m.num_layers // mesh_shape.get("stage", 1)
    pipeline_buffers = 2 * d * a if mesh_shape.get("stage", 1) > 1 else 0
    counts = parameter_count(m)
    gathered = 2 * counts["layers"] / m.num_layers + counts["embedding"] if weights_split(config, mesh_shape) else 0
    gathered_bytes = gathered * np.dtype(m.param_dtype).itemsize / t
    kept = layers_here * kept_per_layer + recompute + pipeline_buffers
    return int(tokens * kept + logit_tokens * logits + gathered_bytes)


def weights_split(config, mesh_shape: dict) -> bool:
    """Whether the rules split the weights' `embed` axis over devices (fsdp, by default), so that each layer's
    weights are gathered whole where they are used."""
    axes = dict(mesh_lib.logical_rules(config)).get("embed")
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return math.prod(mesh_shape.get(axis, 1) for axis in axes) > 1


# --------------------------------------------------------------------------------------------------
# Compiled: XLA's own figures for the devices present


def compiled_analysis(setup) -> tuple:
    """Lower and compile the real train step with abstract inputs: (compiled, XLA's per-device bytes, FLOPs)."""
    compiled = step_lib.lower_train_step(setup).compile()
    stats = compiled.memory_analysis()
    xla = {
        "arguments": int(stats.argument_size_in_bytes),
        "outputs": int(stats.output_size_in_bytes),
        "aliased": int(stats.alias_size_in_bytes),  # donated state updated in place
        "temporaries": int(stats.temp_size_in_bytes),
    }
    xla["peak"] = xla["arguments"] + xla["outputs"] - xla["aliased"] + xla["temporaries"]
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return compiled, xla, (float(cost["flops"]) if cost and "flops" in cost else None)


def measure_peak_bytes(compiled_step, setup, steps: int = 3) -> int:
    """Run a few real steps of the compiled step; the most memory any local device held meanwhile."""
    state = setup.init_state()
    batches = data.train_batches(setup.config)
    for _ in range(steps):
        state, step_metrics = compiled_step(state, setup.sharding.global_batch(next(batches)))
    jax.block_until_ready(step_metrics)
    return max(int(device.memory_stats()["peak_bytes_in_use"]) for device in jax.local_devices())


def usable_memory(kind: str, device=None) -> tuple[float | None, str]:
    """Bytes one device can give the step, and how that was found."""
    if device is not None:
        stats = device.memory_stats() if hasattr(device, "memory_stats") else None
        if stats and stats.get("bytes_limit"):
            return float(stats["bytes_limit"]), f"{kind}: the allocator's limit on this device"
    size = devices.device_memory(kind)
    if size is None:
        return None, f"{kind}: memory size unknown to bigjax; pass --device-kind to compare"
    if "tpu" in kind.lower():
        return size, f"{kind}: {fmt_bytes(size)} of HBM"
    fraction = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", GPU_MEMORY_FRACTION))
    return size * fraction, f"{kind}: {fraction:.0%} of {fmt_bytes(size)}, XLA_PYTHON_CLIENT_MEM_FRACTION={fraction}"


# --------------------------------------------------------------------------------------------------
# Advice


def replication_warnings(config, plan: Plan) -> list[str]:
    """Parameters and optimizer state copied on every data-parallel device: say what FSDP would save."""
    if plan.mesh["data"] == 1:
        return []
    state_now = plan.per_device["parameters"] + plan.per_device["optimizer_state"]
    fsdp_config = config_lib.from_dict(config.to_dict())
    fsdp_config.mesh.fsdp, fsdp_config.mesh.data = plan.mesh["data"] * plan.mesh["fsdp"], 1
    fsdp = make_setup(fsdp_config, num_devices=plan.num_devices)
    abstract, shardings = fsdp.abstract_state, fsdp.state_shardings
    state_fsdp = per_device_bytes(abstract.params, shardings.params) + per_device_bytes(
        abstract.opt_state, shardings.opt_state
    )
    if state_fsdp >= state_now:
        return []
    return [
        f"parameters and optimizer state ({fmt_bytes(state_now)} per device) are replicated over data="
        f"{plan.mesh['data']}; --config.mesh.data=1 --config.mesh.fsdp={fsdp_config.mesh.fsdp} would shard them "
        f"to {fmt_bytes(state_fsdp)} per device"
    ]


# --------------------------------------------------------------------------------------------------
# Output


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def format_plan(plan: Plan, config_name: str) -> str:
    mesh = " x ".join(f"{axis}={size}" for axis, size in plan.mesh.items())
    how = "XLA's analysis of the compiled step" if plan.source == "compiled" else "shapes, shardings and a model"
    lines = [
        f"plan for {config_name} on {plan.num_devices} x {plan.device_kind} (mesh {mesh}), from {how}",
        f"{plan.parameters:,} parameters",
    ]
    if plan.pipeline:
        lines.append(pipeline_lib.describe(plan.pipeline))
    stage = f" = per stage ({plan.pipeline['layers_per_stage']} layers each)" if plan.pipeline else ""
    lines += ["", f"per device{stage}:"]
    labels = {
        "parameters": "parameters",
        "optimizer_state": "optimizer state",
        "gradients": "gradients",
        "activations": "activations + XLA scratch" if plan.source == "compiled" else "activations",
        "batch": "batch",
        "total": "total",
    }
    for key, label in labels.items():
        lines.append(f"  {label:<28}{fmt_bytes(plan.per_device[key]):>12}")
    if plan.xla:
        x = plan.xla
        lines.append(
            f"  XLA: arguments {x['arguments']} + outputs {x['outputs']} - aliased {x['aliased']} + temporaries "
            f"{x['temporaries']} = peak {x['peak']} bytes"
        )
    lines.append(f"  peak, in bytes: {plan.per_device['total']:,} (a run's memory_stats()['peak_bytes_in_use'])")
    if plan.measured_peak is not None:
        lines.append(f"  measured over 3 steps here: {plan.measured_peak:,} bytes ({fmt_bytes(plan.measured_peak)})")
    if plan.usable_memory is None:
        lines.append(f"  fits: unknown ({plan.memory_note})")
    else:
        verdict = "yes" if plan.fits else "NO"
        lines.append(
            f"  fits: {verdict}, {fmt_bytes(plan.per_device['total'])} of {fmt_bytes(plan.usable_memory)} usable "
            f"({plan.memory_note})"
        )
    lines += ["", f"FLOPs per step: {plan.flops_per_step:.3g} (the task's model FLOPs, all devices)"]
    if plan.xla_flops_per_device:
        lines.append(f"  XLA's count per device: {plan.xla_flops_per_device:.3g} (with remat's recomputation)")
    if plan.ideal_step_seconds:
        lines.append(f"  step time at {ASSUMED_MFU:.0%} MFU: {plan.ideal_step_seconds:.3g} s")
    lines += [f"warning: {w}" for w in plan.warnings]
    return "\n".join(lines)


def to_json(plan: Plan) -> str:
    return json.dumps({**dataclasses.asdict(plan), "fits": plan.fits}, indent=2)
