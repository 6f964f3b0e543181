"""Where a training run's wall time goes, phase by phase, measured on the host without a device sync.

    clock = goodput.Clock(started)        # charges to "startup" from the command's start
    with clock("compile"):
        ...                               # this block's seconds go to "compile"
    clock.switch_to("steps")              # from here, time in no block goes to "steps"

Every second since `started` is charged to exactly one phase: a block's to its phase (a block inside another is
charged to the inner one alone), the rest to the current base phase. So the phases add up to the wall time:

    startup     the command's start to the loop, less restore and compile: imports, mesh, data pipelines, lock
    restore     restoring the state from a checkpoint (or initializing a fresh one)
    compile     compiling the train step (loaded from the persistent compilation cache when it can be)
    data        blocked waiting for the next batch
    steps       the rest of the loop: dispatching steps, and waiting for them at log time (the device's time shows
                where the host waits for it), logging
    eval        inline evaluation
    checkpoint  blocked in saving: the save's synchronous part, and waiting for an async save to commit

The steps' time is device time only as far as the host waits for it; JAX dispatches asynchronously, and the loop
fetches metrics only at log time, so "steps" and "data" share the device's time between them as the waits fall.
"""

from __future__ import annotations

import contextlib
import time

PHASES = ("startup", "restore", "compile", "data", "steps", "eval", "checkpoint")


class Clock:
    def __init__(self, started: float | None = None, now=time.monotonic):
        """`started`: now() when the command started (default: now)."""
        self.now = now
        self.started = now() if started is None else started
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.phases = ["startup"]  # the base phase, then the blocks being timed, innermost last
        self.since = self.started

    def _charge(self) -> None:
        now = self.now()
        self.seconds[self.phases[-1]] += now - self.since
        self.since = now

    @contextlib.contextmanager
    def __call__(self, phase: str):
        """Charge the block's time to `phase`."""
        self._charge()
        self.phases.append(phase)
        try:
            yield
        finally:
            self._charge()
            self.phases.pop()

    def switch_to(self, phase: str) -> None:
        """Charge the time outside any block to `phase` from now on."""
        self._charge()
        self.phases[0] = phase

    def totals(self) -> dict:
        """{"wall": seconds since the start, phase: seconds, ...}; the phases add up to the wall time."""
        self._charge()
        return {"wall": self.since - self.started, **self.seconds}


def line(totals: dict, cache: str = "") -> str:
    """The `goodput:` line: the share of the wall time spent in steps, then each phase."""
    wall = totals["wall"]
    share = totals["steps"] / wall if wall > 0 else 0.0
    phases = ", ".join(f"{phase} {totals[phase]:.1f}s" for phase in PHASES)
    return f"goodput: {share:.0%} of {wall:.1f}s in steps; {phases}" + (f" ({cache})" if cache else "")


def row(totals: dict) -> dict:
    """The metrics.jsonl row: `goodput/wall`, `goodput/startup`, ... in seconds."""
    return {f"goodput/{name}": seconds for name, seconds in totals.items()}
