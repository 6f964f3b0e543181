"""Metric writers (console, JSONL, TensorBoard) behind one interface; MFU against the peaks of bigjax.devices.

Only process 0 writes; the other processes get a writer that does nothing, so callers never branch. Each write to a
file is made inside `fence()` (the trainer's workdir lock, `lock.JobLock.fenced`), at the moment it is asked for: a
trainer that lost its lock writes no row and no event more.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time

import jax
from etils import epath

from bigjax import devices, paths


def mfu(model_flops_per_second: float, num_devices: int, device=None) -> float | None:
    """Model FLOPs utilization: achieved model FLOP/s over the devices' summed peak; None when unknown."""
    peak = devices.peak_flops(device)
    if peak is None:
        return None
    return model_flops_per_second / (peak * num_devices)


def _round(value):
    if isinstance(value, float) and math.isfinite(value):
        return float(f"{value:.6g}")
    return value


def tensorboardx():
    """tensorboardX, imported here: only process 0 needs it. It imports torch whenever torch is installed, only to
    accept torch tensors (bigjax writes floats): 1.2-1.5 s of CPU at every start on a machine that has torch (the GPU
    image, a dev venv). So, unless torch is imported already, it is imported with torch hidden, and `import torch`
    works as ever afterwards."""
    if "torch" in sys.modules:
        import tensorboardX

        return tensorboardX
    sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX expects
    try:
        import tensorboardX
    finally:
        del sys.modules["torch"]
    return tensorboardX


class MetricWriter:
    """Writes `{name: number}` at a step to the console, DIR/metrics.jsonl and TensorBoard events in DIR; each file
    write inside `fence()`."""

    def __init__(self, directory, console_prefix: str = "", enabled: bool | None = None, fence=contextlib.nullcontext):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.prefix = console_prefix
        self.jsonl = self.tensorboard = None
        if self.enabled:
            directory = paths.workdir(directory)
            with fence():
                directory.mkdir(parents=True, exist_ok=True)
            self.jsonl = JsonLines(directory / "metrics.jsonl", fence)
            self.tensorboard = TensorBoard(directory, fence)

    def write(self, step: int, metrics: dict, console: bool = True) -> None:
        if not self.enabled:
            return
        metrics = {k: _round(float(v)) for k, v in metrics.items() if v is not None}
        self.jsonl.write(json.dumps({"step": step, **metrics, "time": round(time.time(), 3)}) + "\n")
        self.tensorboard.write(step, metrics)
        if console:
            say(f"{self.prefix}step {step}: " + "  ".join(f"{k}={_format(v)}" for k, v in metrics.items()))

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tensorboard.close()


class TensorBoard:
    """TensorBoard's events file in a directory, written when `write` is called, inside `fence()`: not later, by a
    background thread, as tensorboardX's SummaryWriter does (its own synchronous EventsWriter underneath)."""

    def __init__(self, directory, fence=contextlib.nullcontext):
        self.tensorboardx, self.fence = tensorboardx(), fence
        with fence():
            self.events = self.tensorboardx.event_file_writer.EventsWriter(os.path.join(os.fspath(directory), "events"))
            self.events.flush()

    def write(self, step: int, metrics: dict) -> None:
        tbx, now = self.tensorboardx, time.time()
        events = [
            tbx.proto.event_pb2.Event(wall_time=now, step=step, summary=tbx.summary.scalar(name, value))
            for name, value in metrics.items()
        ]
        with self.fence():
            for event in events:
                self.events.write_event(event)
            self.events.flush()

    def close(self) -> None:
        self.events.close()  # writes nothing new: every event was flushed when written


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

    def __init__(self, path, fence=contextlib.nullcontext):
        self.path, self.fence = path, fence
        if paths.is_url(path):
            self.file, self.lines = None, [path.read_text()] if path.exists() else []
        else:
            with fence():
                self.file, self.lines = open(path, "a", buffering=1), None

    def write(self, line: str) -> None:
        with self.fence():
            if self.file is not None:
                self.file.write(line)  # line-buffered: written out at its newline, inside the fence
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
