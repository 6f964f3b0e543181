"""Library logs go to a file, not the console.

JAX, Orbax and TensorStore report a failed save or a damaged checkpoint with pages of tracebacks from their
threads, while bigjax reports the failure itself as one `error:` line. The pages are worth keeping for whoever
debugs it, so they go to WORKDIR/logs/COMMAND-TIME-HOST-PID.log: Python logging at WARNING and above (absl,
Orbax), warnings, exceptions raised in threads and exceptions Python could not raise (in `__del__`, in callbacks
of a closed event loop). The file is created only when something is written to it, so a run that logs nothing
leaves none; for a workdir in a bucket, or one that cannot be written, it goes to the local temporary directory.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import sys
import tempfile
import threading
import traceback

from bigjax import paths


class LazyFileHandler(logging.Handler):
    """A logging handler that creates its file (and folder) at its first record."""

    def __init__(self, candidates: list[str]):
        super().__init__(level=logging.WARNING)
        self.candidates = candidates
        self.path: str | None = None
        self._file = None
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(threadName)s] %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.write(self.format(record) + "\n")
        except Exception:  # a log that cannot be written (a full disk, at exit) is dropped, never printed
            pass

    def write(self, text: str) -> None:
        with self.lock:
            if self._file is None:
                self._file = self._open()
            self._file.write(text)
            self._file.flush()

    def _open(self):
        for path in self.candidates:
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                handle = open(path, "a")
            except OSError:
                continue
            self.path = path
            return handle
        return open(os.devnull, "w")

    def close(self) -> None:
        with self.lock:
            if self._file is not None:
                self._file.close()
        super().close()


_handler: LazyFileHandler | None = None


def log_file_candidates(workdir, command: str) -> list[str]:
    name = f"{command}-{datetime.datetime.now():%Y%m%d-%H%M%S}-{socket.gethostname()}-{os.getpid()}.log"
    fallback = os.path.join(tempfile.gettempdir(), "bigjax-logs", name)
    if not workdir or paths.is_url(workdir):  # none, or empty (refused by the command, whose error this logs)
        return [fallback]
    return [os.path.join(os.fspath(paths.workdir(workdir)), "logs", name), fallback]


def send_library_logs_to_file(workdir, command: str) -> None:
    """From now on, library logs, warnings and stray thread exceptions of this process go to the log file."""
    global _handler
    _handler = LazyFileHandler(log_file_candidates(workdir, command))
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.StreamHandler) and getattr(handler, "stream", None) in (sys.stderr, None):
            root.removeHandler(handler)
    root.addHandler(_handler)
    root.setLevel(min(root.level, logging.WARNING) if root.level else logging.WARNING)
    logging.captureWarnings(True)
    # absl adds its own stderr handler to its logger when first used; its records reach ours through the root.
    from absl import logging as absl_logging

    absl_logging.get_absl_logger().propagate = True
    absl_logging.get_absl_handler().setLevel(logging.CRITICAL + 1)
    sys.unraisablehook = _unraisable_to_file
    threading.excepthook = _thread_exception_to_file


def _unraisable_to_file(unraisable) -> None:
    lines = traceback.format_exception(unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback)
    _write_quietly(f"{unraisable.err_msg or 'Exception ignored in'}: {unraisable.object!r}\n{''.join(lines)}")


def _thread_exception_to_file(args) -> None:
    lines = traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback)
    _write_quietly(f"Exception in thread {args.thread.name if args.thread else '?'}:\n{''.join(lines)}")


def _write_quietly(text: str) -> None:
    try:
        _handler.write(text)
    except Exception:
        pass


def details() -> str | None:
    """Where this process's log file is, if anything was written to it."""
    return _handler.path if _handler is not None else None
