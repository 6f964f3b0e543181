"""Metric writers (console, JSONL, TensorBoard) behind one interface; MFU against the peaks of bigjax.ops.devices.

Only process 0 writes; the other processes get a writer that does nothing, so callers never branch. Each write to a
file is made inside `fence()` (the trainer's workdir lock, `lock.JobLock.fenced`), at the moment it is asked for: a
trainer that lost its lock writes no row and no event more.

A metrics file that cannot be written (a full disk, a file-size limit, a directory in its place) is a MetricsError,
one line for the user. A write that failed part-way, or a kill mid-write, leaves the file's last line cut off: the
next writer to open the file moves that fragment into a file beside it (`metrics.jsonl.cut-off.TIME`, never deleted)
before it appends, and readers skip any line that is not a row, saying which.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib
import json
import math
import os
import sys
import time

import jax
from etils import epath

from bigjax import errors, paths
from bigjax.ops import devices


class MetricsError(errors.UserError):
    """A metrics file that cannot be written or read: a message for the user."""


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


def tensorboardx(bucket: bool = False):
    """tensorboardX, imported here: only process 0 needs it. Whenever they are installed, it imports torch (only to
    accept torch tensors; bigjax writes floats), boto3 (for s3:// event files) and google-cloud-storage (for gs://):
    1.2-1.5 s of CPU for torch and 0.35 s for google-cloud-storage at every start on a machine that has them (the GPU
    image, a dev venv). So those not imported already are hidden while it imports (it expects their ImportError) and
    import as ever afterwards; google-cloud-storage is left visible for events in a bucket (`bucket`), and a
    tensorboardX imported without it gets it then."""
    unneeded = ("torch", "boto3") if bucket else ("torch", "boto3", "google.cloud.storage")
    hidden = [name for name in unneeded if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # `import name` raises ImportError
    try:
        import tensorboardX
        from tensorboardX import record_writer

        if bucket and not record_writer.GCS_ENABLED:  # imported earlier in this process, for a local directory
            importlib.reload(record_writer)  # its writers read the module's globals, so they see the bucket now
    finally:
        for name in hidden:
            del sys.modules[name]
    return tensorboardX


METRICS_FILE = "metrics.jsonl"  # in a workdir (the trainer) or WORKDIR/eval (the eval job)


class MetricWriter:
    """Writes `{name: number}` at a step to the console, DIR/metrics.jsonl, TensorBoard events in DIR (`tensorboard`)
    and the runs of `trackers` (bigjax.ops.trackers: each has `write(step, metrics)` and `close(failed)`); each file
    write inside `fence()`."""

    def __init__(
        self,
        directory,
        console_prefix: str = "",
        enabled: bool | None = None,
        fence=contextlib.nullcontext,
        tensorboard: bool = True,
        trackers=(),
    ):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.prefix = console_prefix
        self.jsonl = self.tensorboard = None
        self.trackers = list(trackers)
        if self.enabled:
            directory = epath.Path(directory)  # a workdir, normalised by the command (paths.workdir)
            try:
                with fence():
                    directory.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise cannot("create", directory, error) from error
            self.jsonl = JsonLines(directory / METRICS_FILE, fence)
            try:
                self.tensorboard = TensorBoard(directory, fence) if tensorboard else None
            except OSError as error:
                self.jsonl.close()
                raise cannot("write TensorBoard events into", directory, error) from error

    def write(self, step: int, metrics: dict, console: bool = True) -> None:
        if not self.enabled:
            return
        metrics = {k: _round(float(v)) for k, v in metrics.items() if v is not None}
        self.jsonl.write(json.dumps({"step": step, **metrics, "time": round(time.time(), 3)}) + "\n")
        if self.tensorboard:
            self.tensorboard.write(step, metrics)
        for tracker in self.trackers:
            tracker.write(step, metrics)
        if console:
            say(f"{self.prefix}step {step}: " + "  ".join(f"{k}={_format(v)}" for k, v in metrics.items()))

    def close(self, quietly: bool = False) -> None:
        """Flush and close both files. `quietly`: while another error stops the run, which is the one to report: a
        full disk that failed a save fails these flushes too, and their errors would hide it."""
        if not self.enabled:
            return
        try:
            self.jsonl.close()
            if self.tensorboard:
                self.tensorboard.close()
            for tracker in self.trackers:
                tracker.close(failed=quietly)
        except Exception as error:
            if not quietly:
                raise MetricsError(
                    f"cannot write the metrics in {self.jsonl.path.parent}: {error}; {errors.remedy(str(error))}"
                ) from error


class TensorBoard:
    """TensorBoard's events file in a directory, written when `write` is called, inside `fence()`: not later, by a
    background thread, as tensorboardX's SummaryWriter does (its own synchronous EventsWriter underneath)."""

    def __init__(self, directory, fence=contextlib.nullcontext):
        self.tensorboardx, self.fence = tensorboardx(bucket=paths.is_url(directory)), fence
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
        try:
            with fence():
                set_aside_cut_off_line(path)
                if paths.is_url(path):
                    self.file, self.lines = None, [path.read_text()] if path.exists() else []
                else:
                    # Unbuffered: what a failed write leaves is on disk already, and nothing retried at close.
                    self.file, self.lines = open(path, "ab", buffering=0), None
        except OSError as error:
            raise cannot("write", path, error) from error

    def write(self, line: str) -> None:
        try:
            with self.fence():
                if self.file is not None:
                    data = line.encode()
                    while data:  # a write may take part of it (a disk filling up): the rest, or the error, comes next
                        data = data[self.file.write(data) :]
                else:
                    self.lines.append(line)
                    self.path.write_text("".join(self.lines))
        except OSError as error:
            raise cannot("write", self.path, error) from error

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def cannot(what: str, path, error: OSError) -> MetricsError:
    reason = error.strerror or str(error)
    return MetricsError(
        f"cannot {what} {path}: {reason}; {errors.remedy(reason)}, then rerun the same command (checkpoints are not "
        "affected)"
    )


def set_aside_cut_off_line(path) -> None:
    """If `path`'s last line was cut off (a write that failed part-way, a kill mid-write), move that fragment into
    PATH.cut-off.TIME beside it, so that the next row starts a line of its own. Nothing is deleted."""
    if not path.is_file():
        return
    with path.open("rb") as f:
        start = start_of_cut_off_line(f)
        if start is None:
            return
        f.seek(start)
        fragment = f.read()
    aside = path.with_name(f"{path.name}.cut-off.{datetime.datetime.now():%Y%m%dT%H%M%S.%f}")
    aside.write_bytes(fragment)  # first: a kill between the two steps loses nothing
    if paths.is_url(path):
        path.write_bytes(path.read_bytes()[:start])
    else:
        os.truncate(path, start)
    say(f"warning: {path} ended in a cut-off line (a write that failed, or a kill mid-write); moved it to {aside}")


def start_of_cut_off_line(f, chunk: int = 1 << 16) -> int | None:
    """Where the unfinished last line of the binary file `f` starts; None if it ends a line or is empty. Reads back
    from the end, a chunk at a time: a long run's metrics file is not read whole."""
    end = position = f.seek(0, os.SEEK_END)
    while position > 0:
        start = max(0, position - chunk)
        f.seek(start)
        data = f.read(position - start)
        if position == end and data.endswith(b"\n"):
            return None
        newline = data.rfind(b"\n")
        if newline >= 0:
            return start + newline + 1
        position = start
    return 0 if end else None


def read_jsonl(path) -> list[dict]:
    """The rows of a metrics file. A line that is not a row (a JSON object with a step), such as one cut off by a
    kill or edited by hand, is skipped and said by its line number: one bad line does not hide the others."""
    path = epath.Path(path)
    try:
        if not path.exists():
            return []
        text = path.read_bytes().decode("utf-8", errors="replace")  # a damaged byte damages its line alone
    except OSError as error:
        raise cannot("read", path, error) from error
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
        else:
            say(f"warning: {path}:{number} is not a metrics row (a JSON object with a step): {line[:60]!r}; skipped")
    return rows
