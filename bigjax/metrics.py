"""Metric writers (console, JSONL, TensorBoard) behind one interface; device peaks (MFU) and memory sizes.

Only process 0 writes; the other processes get a writer that does nothing, so callers never branch.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import jax
from etils import epath

from bigjax import paths

# Dense bf16 peak FLOP/s per device (no sparsity), keyed by a substring of `jax.Device.device_kind`.
# The one table of device peaks in bigjax.
PEAK_FLOPS = {
    "H200": 989e12,
    "H100 PCIe": 756e12,  # before "H100": the PCIe card runs at lower clocks than the SXM one
    "H100": 989e12,
    "A100": 312e12,
    "L4": 121e12,
    "TPU v6 lite": 918e12,  # v6e
    "TPU v5p": 459e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5": 459e12,
    "TPU v4": 275e12,
}


GiB = 2**30

# Memory per device (HBM), keyed like PEAK_FLOPS. Where the devices are present, bigjax reads their own
# figure (`memory_stats()["bytes_limit"]`) instead; the 40 GB A100 is listed for `bigjax plan` alone.
DEVICE_MEMORY = {
    "H200": 141e9,
    "H100": 80 * GiB,
    "A100-SXM4-40GB": 40 * GiB,
    "A100": 80 * GiB,
    "L4": 24e9,
    "TPU v6 lite": 32 * GiB,
    "TPU v5p": 95 * GiB,
    "TPU v5 lite": 16 * GiB,
    "TPU v5": 95 * GiB,
    "TPU v4": 32 * GiB,
}

# Short names for `bigjax plan --device-kind NAME` -> a device_kind as JAX reports it.
DEVICE_KIND_NAMES = {
    "h200": "NVIDIA H200",
    "h100": "NVIDIA H100 80GB HBM3",
    "a100": "NVIDIA A100-SXM4-80GB",
    "a100-40gb": "NVIDIA A100-SXM4-40GB",
    "l4": "NVIDIA L4",
    "v4": "TPU v4",
    "v5e": "TPU v5 lite",
    "v5p": "TPU v5p",
    "v6e": "TPU v6 lite",
}


def _lookup(table: dict, kind: str):
    """The first entry whose key is a substring of `kind` (so "TPU v5p" is listed before "TPU v5")."""
    for name, value in table.items():
        if name.lower() in kind.lower():
            return value
    return None


def peak_flops(device=None) -> float | None:
    return peak_flops_of_kind((device or jax.devices()[0]).device_kind)


def peak_flops_of_kind(device_kind: str) -> float | None:
    return _lookup(PEAK_FLOPS, device_kind)


def device_memory(device_kind: str) -> float | None:
    """Bytes of memory of one device of this kind, from the table; None when unknown (a CPU, say)."""
    return _lookup(DEVICE_MEMORY, device_kind)


def mfu(model_flops_per_second: float, num_devices: int, device=None) -> float | None:
    """Model FLOPs utilization: achieved model FLOP/s over the devices' summed peak; None when unknown."""
    peak = peak_flops(device)
    if peak is None:
        return None
    return model_flops_per_second / (peak * num_devices)


def _round(value):
    if isinstance(value, float) and math.isfinite(value):
        return float(f"{value:.6g}")
    return value


class MetricWriter:
    """Writes `{name: number}` at a step to the console, DIR/metrics.jsonl and TensorBoard events in DIR."""

    def __init__(self, directory, console_prefix: str = "", enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.prefix = console_prefix
        self.jsonl = self.tensorboard = None
        if self.enabled:
            directory = paths.workdir(directory)
            directory.mkdir(parents=True, exist_ok=True)
            self.jsonl = JsonLines(directory / "metrics.jsonl")
            from tensorboardX import SummaryWriter  # imported here: only process 0 needs it

            self.tensorboard = SummaryWriter(os.fspath(directory), flush_secs=10)

    def write(self, step: int, metrics: dict, console: bool = True) -> None:
        if not self.enabled:
            return
        metrics = {k: _round(float(v)) for k, v in metrics.items() if v is not None}
        self.jsonl.write(json.dumps({"step": step, **metrics, "time": round(time.time(), 3)}) + "\n")
        for name, value in metrics.items():
            self.tensorboard.add_scalar(name, value, step)
        if console:
            say(f"{self.prefix}step {step}: " + "  ".join(f"{k}={_format(v)}" for k, v in metrics.items()))

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tensorboard.close()


def _format(value: float) -> str:
    if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
        return f"{value:.3g}"
    return f"{value:.4g}"


def say(message: str) -> None:
    """A line on the console from process 0 (through tqdm, so an active progress bar stays intact)."""
    if jax.process_index() == 0:
        from tqdm import tqdm

        tqdm.write(message, file=sys.stdout)
        sys.stdout.flush()


def progress_bar(initial: int, total: int):
    """A progress bar on process 0 when the console is a terminal; None otherwise (logs are enough)."""
    if jax.process_index() != 0 or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(initial=initial, total=total, unit="step", dynamic_ncols=True, leave=False)


class JsonLines:
    """Appends lines to a file, on a disk or in a bucket. Objects in a bucket cannot be appended to, so there the
    whole file is rewritten at each write: a run's metrics are kilobytes, written every `log_every` steps."""

    def __init__(self, path):
        self.path = path
        if paths.is_url(path):
            self.file, self.lines = None, [path.read_text()] if path.exists() else []
        else:
            self.file, self.lines = open(path, "a", buffering=1), None

    def write(self, line: str) -> None:
        if self.file is not None:
            self.file.write(line)
        else:
            self.lines.append(line)
            self.path.write_text("".join(self.lines))

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def read_jsonl(path) -> list[dict]:
    path = epath.Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
