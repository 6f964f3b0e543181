"""The XLA flags bigjax sets for GPU runs, before the backend starts. A flag the user set in XLA_FLAGS always wins.

XLA reads XLA_FLAGS once, when the first backend initializes, so the CLI calls `apply_gpu_defaults()` first
thing, before anything imports jax. Nothing is set when:

  - BIGJAX_XLA_FLAGS=off: the switch, to measure without them or to rule them out;
  - the platform will not be a GPU: JAX_PLATFORMS names none (the tests set cpu), or, with JAX_PLATFORMS unset,
    no GPU plugin for jax is installed (`jax[cuda12]` installs one; without it jax cannot use a GPU);
  - for each flag, XLA_FLAGS already names it, with whatever value.

Where a plugin is installed but no GPU is present, jax falls back to the CPU and the flags, which XLA knows on
every platform, do nothing. An unknown flag would abort XLA at start-up: tests/test_xla_flags.py checks that the
installed jaxlib knows every one of these.

The flags start from those MaxText sets for GPUs (its A3/H100 configs) and JAX-Toolbox's GPU performance guide;
benchmarks/NOTES.md has the prediction and the command that measures each on its own. Left out on purpose:
  --xla_gpu_enable_command_buffer= (CUDA graphs off, MaxText's multi-node choice): on one GPU a small model's step
      is many short kernels, where graphs save launch overhead; XLA's default stays until measured.
  --xla_gpu_enable_while_loop_double_buffering: unrolls the layer scan by two, which costs compile time (the issue
      wants it flat in depth) for an FSDP overlap one GPU does not have; measured before adopting.
  --xla_disable_hlo_passes=rematerialization: MaxText turns XLA's own remat off because it plans memory itself;
      bigjax keeps it as a safety net that turns some out-of-memory failures into slower steps.
"""

from __future__ import annotations

import importlib.metadata
import os
import re

from bigjax.errors import UserError

SWITCH = "BIGJAX_XLA_FLAGS"

GPU_FLAGS = {
    # Schedules collectives (gradient all-reduces, FSDP all-gathers and reduce-scatters) to overlap compute.
    # Nothing to overlap on one GPU; on several, the largest single lever in MaxText's and NVIDIA's guides.
    "xla_gpu_enable_latency_hiding_scheduler": "true",
    # Matrix products through cuBLAS rather than Triton-generated GEMMs, as MaxText's H100 configs do: cuBLAS
    # is at least as fast for the large bf16 GEMMs of a transformer, and skips Triton's autotuning at compile time.
    "xla_gpu_enable_triton_gemm": "false",
    # Collectives on a high-priority stream, so compute kernels queued ahead do not delay them.
    "xla_gpu_enable_highest_priority_async_stream": "true",
    # FSDP over a layer scan: the next layer's all-gather and the last one's reduce-scatter run across loop
    # iterations, overlapping the current layer's compute.
    "xla_gpu_enable_pipelined_all_gather": "true",
    "xla_gpu_enable_pipelined_reduce_scatter": "true",
    "xla_gpu_enable_pipelined_all_reduce": "true",
    # Many small gradient collectives combined into few large ones (NCCL's per-call cost); MaxText's one-node values.
    "xla_gpu_all_reduce_combine_threshold_bytes": str(128 * 2**20),
    "xla_gpu_all_gather_combine_threshold_bytes": str(128 * 2**20),
    "xla_gpu_reduce_scatter_combine_threshold_bytes": str(64 * 2**20),
}

GPU_PLATFORMS = ("cuda", "gpu", "rocm")
GPU_PLUGIN = re.compile(r"jax[-_](cuda|rocm)\d+[-_]plugin")


class XlaFlagsError(UserError):
    """BIGJAX_XLA_FLAGS has a value bigjax does not know: a message for the user."""


def apply_gpu_defaults(env=os.environ) -> list[str]:
    """Add GPU_FLAGS that XLA_FLAGS does not name yet, when the platform will be a GPU; the flags added."""
    switch = env.get(SWITCH, "on").lower()
    if switch not in ("on", "off"):
        raise XlaFlagsError(f"{SWITCH}={env[SWITCH]!r}: use 'on' (the default) or 'off'")
    if switch == "off" or not platform_will_be_gpu(env):
        return []
    flags, added = merge(env.get("XLA_FLAGS", ""), GPU_FLAGS)
    if added:
        env["XLA_FLAGS"] = flags
    return added


def merge(user_flags: str, defaults: dict[str, str]) -> tuple[str, list[str]]:
    """(XLA_FLAGS with every default the user's flags do not name, the flags added). The user's come last."""
    named = {flag_name(token) for token in user_flags.split()}
    added = [f"--{name}={value}" for name, value in defaults.items() if name not in named]
    return " ".join([*added, user_flags.strip()]).strip(), added


def flag_name(token: str) -> str:
    """'--xla_a=1' -> 'xla_a'; a bare boolean '--xla_a' names it too."""
    return token.lstrip("-").split("=", 1)[0]


def platform_will_be_gpu(env=os.environ) -> bool:
    platforms = env.get("JAX_PLATFORMS", "")
    if platforms:
        return any(name.strip().lower() in GPU_PLATFORMS for name in platforms.split(","))
    return gpu_plugin_installed()


def gpu_plugin_installed() -> bool:
    names = (dist.metadata["Name"] or "" for dist in importlib.metadata.distributions())
    return any(GPU_PLUGIN.fullmatch(name.lower()) for name in names)
