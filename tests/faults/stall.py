"""`bigjax` (the arguments after this script's), stopped with SIGSTOP at one point of its code, as a paused VM or a
swapped-out process stops: for tests/faults/test_fencing.py to act while it stands there.

    BIGJAX_STALL=module:Qualified.name:N:before|after   stop just before (or after) the N-th call of that function
    BIGJAX_STALL_REMOTE=1                               the workdir lock's record names another machine, so that
                                                        another trainer judges this one by its heartbeat alone, as a
                                                        trainer on another host does

The process never stops while one of its threads holds the `flock` of the lock's record (the heartbeat, a fenced
write): stopped holding it, it would stop every other trainer of the workdir too, which is not the case tested.
"""

import contextlib
import functools
import importlib
import inspect
import itertools
import os
import pathlib
import signal
import sys
import threading

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # this checkout's bigjax, not an installed one

from bigjax.run import lock  # noqa: E402  (imports no JAX)

RECORD_FREE = threading.Lock()  # held by a thread while it holds the record's flock, and while the process stops


def stop_here() -> None:
    """Stop the process, this thread first: SIGSTOP sent to the process may be taken by another thread while this one
    runs on into the code after the stall point for a while; sent to this thread, it stops it before it returns."""
    if not RECORD_FREE.acquire(timeout=60):
        raise AssertionError("BIGJAX_STALL: the stall point is inside a change of the lock's record")
    try:
        signal.pthread_kill(threading.get_ident(), signal.SIGSTOP)
    finally:
        RECORD_FREE.release()


def gate_record_changes() -> None:
    change = lock._FileRecord.change

    @contextlib.contextmanager
    def gated(self, *args, **kwargs):
        with RECORD_FREE, change(self, *args, **kwargs) as opened:
            yield opened

    lock._FileRecord.change = gated


def stall(spec: str) -> None:
    """Wrap the function that `spec` names so that the process stops at its N-th call."""
    module, name, nth, when = spec.split(":")
    *outer, attribute = name.split(".")
    owner = importlib.import_module(module)
    for part in outer:
        owner = getattr(owner, part)
    original, calls, nth = getattr(owner, attribute), itertools.count(1), int(nth)

    def stop_if_due(call: int, moment: str) -> None:
        if call == nth and when == moment:
            stop_here()

    if inspect.iscoroutinefunction(original):

        @functools.wraps(original)
        async def wrapper(*args, **kwargs):
            call = next(calls)
            stop_if_due(call, "before")
            result = await original(*args, **kwargs)
            stop_if_due(call, "after")
            return result
    else:

        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            call = next(calls)
            stop_if_due(call, "before")
            result = original(*args, **kwargs)
            stop_if_due(call, "after")
            return result

    setattr(owner, attribute, wrapper)


if __name__ == "__main__":
    gate_record_changes()
    if os.environ.get("BIGJAX_STALL_REMOTE"):
        lock.machine_id = lambda: "another-machine/pid:[1]"
    if os.environ.get("BIGJAX_STALL"):
        stall(os.environ["BIGJAX_STALL"])
    from bigjax import cli

    sys.exit(cli.main(sys.argv[1:]))
