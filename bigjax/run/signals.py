"""SIGTERM (a preemption, a scheduler's time limit, `kill`) and Ctrl-C ask a trainer to stop cleanly: finish the
step, save a checkpoint there, exit 0. A second Ctrl-C stops at once, saving nothing more (what is committed stays),
also after a SIGTERM: the first Ctrl-C after one still lets the step finish and save.

`bigjax train` calls `catch()` first thing, before JAX is imported, so that a signal during start-up or compile
is noted too: the trainer then stops at its next safe point and says that there was nothing new to save. This
module imports nothing heavy for that reason.
"""

from __future__ import annotations

import signal
import sys

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """Which stop signal arrived, if any, while it is installed."""

    def __init__(self):
        self.signum: int | None = None  # the first stop signal: the one the run says it stopped by
        self.interrupts = 0  # Ctrl-Cs so far: the second stops at once, whatever came before the first
        self.previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def install(self, signums=SIGNALS) -> StopRequest:
        for signum in signums:
            if signum not in self.previous:
                self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        if signum == signal.SIGINT:
            self.interrupts += 1
            if self.interrupts > 1:
                raise KeyboardInterrupt  # the second Ctrl-C: stop now
        if self.signum is None or signum == signal.SIGINT:
            again = " (Ctrl-C again to stop at once, without saving)" if signum == signal.SIGINT else ""
            name = signal.Signals(signum).name
            print(f"{name}: stopping at the next step, with a checkpoint{again}", file=sys.stderr)
        self.signum = self.signum or signum

    def uninstall(self, signums=SIGNALS) -> None:
        for signum in signums:
            if signum in self.previous:
                signal.signal(signum, self.previous.pop(signum))


_current: StopRequest | None = None


def catch() -> StopRequest:
    """The process's stop request, installed on first use (the main thread only, where Python runs handlers)."""
    global _current
    if _current is None:
        _current = StopRequest().install()
    return _current


def release(signums=SIGNALS) -> None:
    """Give these signals back to their previous handlers (after a run, or in tests)."""
    global _current
    if _current is not None:
        _current.uninstall(signums)
        if not _current.previous:
            _current = None
