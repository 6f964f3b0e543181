"""Cost records of one Python process, for tests/costs.py: on PYTHONPATH only while BIGJAX_TEST_COSTS names a file.

Every Python process a test starts (a `bigjax` command, a `python -c` wrapper) imports this at start-up. It
appends a "start" line to the file at once (so a process killed with SIGKILL is still counted) and, at a normal
exit, an "exit" line with its own CPU seconds and the XLA compiles it did. Each line names the test that was
running (BIGJAX_TEST_COSTS_TEST, which the pytest plugin sets), so the summary can charge the test for it.
"""

import atexit
import importlib.abc
import importlib.util
import json
import os
import resource
import sys

MONITORING = "jax._src.monitoring"
BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"  # jax._src.dispatch.BACKEND_COMPILE_EVENT
CACHE_HIT = "/jax/compilation_cache/cache_hits"
CACHE_REQUEST = "/jax/compilation_cache/compile_requests_use_cache"


def cpu_seconds(who=resource.RUSAGE_SELF) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


class Compiles:
    """XLA compiles seen by jax.monitoring in this process. A compile served by the persistent cache is still a
    backend-compile event (its duration is then the cache read), so real compiles = events - cache hits."""

    def __init__(self):
        self.events = 0
        self.seconds = 0.0
        self.cache_hits = 0
        self.cache_requests = 0
        self.compiled = 0  # compiles not served by the persistent cache
        self.compiled_seconds = 0.0
        self.short = 0  # of which under the cache's minimum compile time: never written to it
        self.minimum = float(os.environ.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1"))
        self._hit = False  # a cache hit is reported just before its backend-compile event

    def on_duration(self, event, duration, **_):
        if event == BACKEND_COMPILE:
            self.events += 1
            self.seconds += duration
            if not self._hit:
                self.compiled += 1
                self.compiled_seconds += duration
                self.short += duration < self.minimum
            self._hit = False

    def on_event(self, event, **_):
        if event == CACHE_HIT:
            self.cache_hits += 1
            self._hit = True
        elif event == CACHE_REQUEST:
            self.cache_requests += 1

    def as_dict(self) -> dict:
        return {
            "compile_events": self.events,
            "compile_s": round(self.seconds, 3),
            "cache_hits": self.cache_hits,
            "cache_requests": self.cache_requests,
            "compiled": self.compiled,
            "compiled_s": round(self.compiled_seconds, 3),
            "short": self.short,
        }

    def attach(self, monitoring) -> None:
        monitoring.register_event_duration_secs_listener(self.on_duration)
        monitoring.register_event_listener(self.on_event)


class _AttachOnImport(importlib.abc.MetaPathFinder):
    """Registers the listeners the moment jax._src.monitoring is imported, without importing jax earlier."""

    def __init__(self, compiles: Compiles):
        self.compiles = compiles

    def find_spec(self, name, path, target=None):
        if name != MONITORING:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            self.compiles.attach(module)

        spec.loader.exec_module = exec_module
        return spec


def watch_compiles() -> Compiles:
    """A Compiles fed from now on, whether or not jax is already imported."""
    compiles = Compiles()
    if MONITORING in sys.modules:
        compiles.attach(sys.modules[MONITORING])
    else:
        sys.meta_path.insert(0, _AttachOnImport(compiles))
    return compiles


def append(path: str, record: dict) -> None:
    """One line, one write on an O_APPEND file: lines of concurrent processes never interleave."""
    line = (json.dumps(record) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def _record_this_process(path: str) -> None:
    argv = list(getattr(sys, "orig_argv", sys.argv))
    base = {"pid": os.getpid(), "test": os.environ.get("BIGJAX_TEST_COSTS_TEST", ""), "argv": argv[1:6]}
    base["bigjax"] = "bigjax.cli" in argv or any(a.endswith("/bigjax") for a in argv[:2])
    append(path, {"kind": "start", **base})
    compiles = watch_compiles()

    def at_exit():
        # A process whose command line did not say bigjax but that ran its CLI (a `python -c` that calls main()).
        late = not base["bigjax"] and "bigjax.cli" in sys.modules
        append(
            path, {"kind": "exit", **base, "bigjax_late": late, "cpu": round(cpu_seconds(), 3), **compiles.as_dict()}
        )

    atexit.register(at_exit)


# Only processes started during a test (the pytest plugin sets the test's name): not pytest's own workers.
if os.environ.get("BIGJAX_TEST_COSTS") and os.environ.get("BIGJAX_TEST_COSTS_TEST"):
    _record_this_process(os.environ["BIGJAX_TEST_COSTS"])
