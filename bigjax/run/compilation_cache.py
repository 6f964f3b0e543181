"""JAX's persistent compilation cache for `bigjax train`, `eval` and `generate`: a run that starts again (after a
preemption, a crash, `--stop-at-step`) loads the programs it compiled before instead of compiling them anew, which
takes minutes for a large model on a GPU.

Where, by config.compilation_cache:

    ""       the default: JAX_COMPILATION_CACHE_DIR where the environment sets it (and no cache where it sets
             JAX_ENABLE_COMPILATION_CACHE=false); else, for train and eval, WORKDIR/compilation_cache: a job restarted
             on a new machine finds it beside its checkpoints, and the processes of a job share it as they share the
             workdir (a disk they all mount, or a bucket: JAX reads and writes gs:// through etils.epath). `generate`,
             which only reads a workdir (perhaps another user's), uses the user's cache, ~/.cache/bigjax/jax.
    "off"    no persistent cache.
    a path   that directory, local or in a bucket.

JAX does the caching. An entry is keyed by the program, the devices, the XLA flags and the jax version, so a changed
model or another jax compiles anew and never loads a stale entry. JAX writes entries from process 0 only, once each
(an existing key is never written again), and only programs that took at least
jax_persistent_cache_min_compile_time_secs (JAX's 1 s unless JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS says
otherwise) to compile: every process reads them. The entries hold no state of the run, only compiled code, so
they are outside what the workdir lock fences: a trainer that lost its lock and adds one harms nothing. Like any
JAX cache they are trusted code: keep the directory where only you can write.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os

import jax
from jax.experimental.compilation_cache import compilation_cache as jax_cache

from bigjax import paths

OFF = "off"
IN_WORKDIR = "compilation_cache"
USER_CACHE = "~/.cache/bigjax/jax"
HITS, WRITES = "/jax/compilation_cache/cache_hits", "/jax/compilation_cache/cache_misses"  # JAX's monitoring events


def directory(setting: str, workdir, reads_only: bool = False, env=os.environ) -> str | None:
    """Where the cache is for a run with config.compilation_cache=`setting` in `workdir` (None: no cache).
    `reads_only`: the command only reads the workdir (generate), so the default is the user's cache."""
    if setting.lower() == OFF:
        return None
    if setting:
        return os.fspath(paths.workdir(os.path.expanduser(setting)))
    if env.get("JAX_ENABLE_COMPILATION_CACHE", "").lower() in ("0", "false", "no", "off"):
        return None
    if env.get("JAX_COMPILATION_CACHE_DIR"):
        return env["JAX_COMPILATION_CACHE_DIR"]
    if reads_only:
        return os.path.expanduser(USER_CACHE)
    return os.path.join(os.fspath(workdir), IN_WORKDIR)  # the workdir as the command normalised it


@dataclasses.dataclass(frozen=True)
class Cache:
    """The cache a command uses: where (None: off), and JAX's counts of its events when the command began."""

    where: str | None
    events_before: dict

    def describe(self) -> str:
        """Where, and what the cache did for this command so far, for the console."""
        if self.where is None:
            return "compilation cache off"
        loaded, written = (EVENTS[event] - self.events_before[event] for event in (HITS, WRITES))
        return f"compilation cache {self.where}: {programs(loaded)} loaded, {written} written"


def use(config, workdir, reads_only: bool = False) -> Cache:
    """Point JAX's persistent cache at `directory(...)` for what this process compiles from now on.

    JAX reads its cache settings at the first compile of the process: a process that runs several commands (a
    notebook, the tests) has the cache reset when the directory changes, so each command gets its own."""
    where = directory(config.compilation_cache, workdir, reads_only)
    if (jax.config.jax_enable_compilation_cache, jax.config.jax_compilation_cache_dir) != (where is not None, where):
        jax.config.update("jax_enable_compilation_cache", where is not None)
        jax.config.update("jax_compilation_cache_dir", where)
        jax_cache.reset_cache()
    count_events()
    return Cache(where, {event: EVENTS[event] for event in (HITS, WRITES)})


def programs(count: int) -> str:
    return f"{count} program" + ("" if count == 1 else "s")


EVENTS = collections.Counter()  # JAX's cache events in this process: EVENTS[HITS], EVENTS[WRITES]


@functools.cache
def count_events() -> None:
    """Count JAX's cache hits and writes (once per process: JAX has no way to take a listener back)."""

    def count(event: str, **_) -> None:
        if event in (HITS, WRITES):
            EVENTS[event] += 1

    jax.monitoring.register_event_listener(count)
