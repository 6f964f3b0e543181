"""One trainer per workdir: a lease in WORKDIR/lock.json, and every write into the workdir fenced by it.

Two trainers writing one workdir destroy each other's checkpoints, so `bigjax train` takes this lock before it
touches anything in the workdir, and a second trainer is refused at once with one line naming the holder.

The lock is a JSON record of who holds it (host, process id and that process's start time, the machine's boot
and process-namespace ids), the command, when it was taken, a random token, and a heartbeat that the holder
rewrites every `lease / 8` seconds. A holder counts as alive:

* on the same machine (same host name, boot id and pid namespace): while its process runs, the same process
  (pid and start time). A trainer killed with SIGKILL or by the OOM killer is seen as gone at once;
* seen from anywhere else (another host sharing the disk, a bucket): while its heartbeat is younger than its
  lease, BIGJAX_LOCK_LEASE seconds (default 120). The lock of a lost host is taken over once that has passed. A
  heartbeat ahead of this machine's clock (clocks differ between hosts) tells nothing of when it was written: the
  record is watched instead, for one lease of this machine's clock, and taken over if it never changed.

A lock whose holder is gone is taken over, and the takeover said. So is a record bigjax did not write (not JSON,
a field missing or of the wrong type: bigjax writes it whole): it holds no lock, since no live trainer's
heartbeat wrote it, and a trainer whose record it replaced stops at its next write (below). Every change of the
record is a compare-and-swap, so two trainers that find the same stale lock cannot both take it: on a disk,
under `flock` of the record file (deleted only while locked; a waiter that finds its file deleted starts again);
in a bucket, with Cloud Storage's generation preconditions.

Fencing. A holder paused past its lease (a VM pause, SIGSTOP, swapped out) is taken over while it stands still,
and would go on writing when it continues. So every write into the workdir (a checkpoint's commit, a keep-N
deletion, a metrics row, TensorBoard events, config.json, a move to the quarantine) is made inside `fenced()`:
the record is compared with this holder's token, and the write is committed (a rename, an append, an unlink)
while the record is still held, so that a takeover cannot come between the comparison and the write. On a disk
the `flock` of the record is held for that, as for any change of it. In a bucket nothing can be held: the
record is read (one request) right before the commit, and a takeover in the moment between the two is not
excluded; a holder whose heartbeat is older than half its lease (which others wait for whole) writes nothing.
A holder that finds the record no longer its own has lost the workdir: it raises LockError, whatever it was
doing, and writes nothing more. What it prepares before a commit (an async save, a config file) it prepares in
its own WORKDIR/staging/TOKEN/, which the next holder sets aside, and which only a commit leaves.

In a job of several processes, process 0 holds the lock for the job and makes the commits (`held`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import json
import os
import shlex
import socket
import sys
import threading
import time
import uuid

from etils import epath

from bigjax import paths
from bigjax.errors import UserError

LOCK_FILE = "lock.json"
STAGING_DIR = "staging"  # WORKDIR/staging/TOKEN: where a holder prepares what it commits
DEFAULT_LEASE_SECONDS = 120.0
CLOCK_TOLERANCE_SECONDS = 1.0  # a heartbeat further ahead of this machine's clock than this: the clocks differ
# How long a trainer that asks for the lock waits for the record's `flock`. Its holder holds it only for a change of
# the record or one fenced write, so a longer hold means a holder paused in the middle of one (SIGSTOP, a VM pause):
# alive (the kernel frees a flock at exit), and not to be waited for without end.
FLOCK_WAIT_SECONDS = 10.0


class LockError(UserError):
    """The workdir is held by another trainer, or this one lost it: a message for the user."""


def lease_seconds(env=os.environ) -> float:
    value = env.get("BIGJAX_LOCK_LEASE", str(DEFAULT_LEASE_SECONDS))
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise LockError(f"BIGJAX_LOCK_LEASE={value!r}: give the lock's lease in seconds, e.g. 120")
    return seconds


# --------------------------------------------------------------------------------------------------
# Who holds it, and whether that holder is alive


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def machine_id() -> str | None:
    """This kernel's boot and this process's pid namespace: equal only where process ids mean the same process
    (None off Linux, where only the heartbeat tells)."""
    boot = _read("/proc/sys/kernel/random/boot_id")
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        return None
    return f"{boot}/{namespace}" if boot else None


def process_start(pid: int) -> int | None:
    """When process `pid` started, in clock ticks since boot (field 22 of /proc/PID/stat); None if it is gone."""
    stat = _read(f"/proc/{pid}/stat")
    if stat is None:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # after the command name, which may hold spaces


def new_record(lease: float) -> dict:
    now = time.time()
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "pid_start": process_start(os.getpid()),
        "machine": machine_id(),
        "command": shlex.join([os.path.basename(sys.argv[0]), *sys.argv[1:]]),
        "since": now,
        "heartbeat": now,
        "lease_seconds": lease,
        "token": uuid.uuid4().hex,
    }


_NUMBER = (int, float)
# The fields of a record and their types: what `holder_is_alive` and `describe_holder` read. The lease, which older
# records lack, is then the default one; the machine's ids are null off Linux.
_FIELDS = {"token": str, "host": str, "pid": int, "since": _NUMBER, "heartbeat": _NUMBER}
_FIELDS_IF_PRESENT = {"lease_seconds": _NUMBER, "machine": (str, type(None)), "pid_start": (int, type(None))}


def damage(record: dict) -> str:
    """What makes `record` unlike any record bigjax writes ("" if nothing)."""
    if not record:
        return "not a JSON object"
    missing = [name for name in _FIELDS if name not in record]
    mistyped = [
        f"{name} {record[name]!r}"
        for name, kind in {**_FIELDS, **_FIELDS_IF_PRESENT}.items()
        if name in record and (not isinstance(record[name], kind) or isinstance(record[name], bool))
    ]
    return "; ".join(
        ([f"no {', '.join(missing)}"] if missing else []) + ([f"wrong {', '.join(mistyped)}"] if mistyped else [])
    )


def lease_of(record: dict) -> float:
    return record.get("lease_seconds", DEFAULT_LEASE_SECONDS)


def on_this_machine(record: dict) -> bool:
    """Whether `record`'s process ids are this machine's (see `machine_id`)."""
    return (
        bool(record.get("machine")) and record.get("machine") == machine_id() and record["host"] == socket.gethostname()
    )


def holder_is_alive(record: dict, now: float | None = None) -> bool:
    """Whether the process that wrote `record` still holds the lock (see the module docstring)."""
    if on_this_machine(record):
        return process_start(record["pid"]) == record.get("pid_start")
    return (time.time() if now is None else now) - record["heartbeat"] < lease_of(record)


def describe_holder(record: dict) -> str:
    started = datetime.datetime.fromtimestamp(record["since"], datetime.UTC)
    age = time.time() - record["heartbeat"]
    heartbeat = f"{age:.0f} s ago" if age > -CLOCK_TOLERANCE_SECONDS else f"{-age:.0f} s ahead of this machine's clock"
    return (
        f"pid {record['pid']} on host {record['host']}, started {started:%Y-%m-%d %H:%M:%S} UTC "
        f"(`{record.get('command', '?')}`), last heartbeat {heartbeat}"
    )


def watch_for_a_lease(store, record: dict, say) -> dict | None:
    """The record once it has changed from `record`, watched for one lease of this machine's (monotonic) clock;
    `record` itself if it never changed: its holder is gone. For a remote holder whose heartbeat is ahead of this
    machine's clock, which then says nothing about when that heartbeat was written."""
    lease = lease_of(record)
    say(
        f"the lock's holder, {describe_holder(record)}, runs on a clock ahead of this one: watching its heartbeat "
        f"for {lease:g} s to see whether it is alive"
    )
    deadline = time.monotonic() + lease
    while time.monotonic() < deadline:
        time.sleep(min(lease / 16, max(deadline - time.monotonic(), 0)))
        with store.change() as (current, _):
            if current != record:
                return current
    return record


def clock_ahead(record: dict) -> bool:
    return not on_this_machine(record) and record["heartbeat"] > time.time() + CLOCK_TOLERANCE_SECONDS


# --------------------------------------------------------------------------------------------------
# The record, changed only by compare-and-swap


class Conflict(Exception):
    """The record changed between reading it and writing it: read again."""


class Held(Exception):
    """The record's `flock` stayed held longer than the wait: its holder is alive and paused mid-write. `record`:
    the record as read without the lock (its holder does not change it in a fenced write)."""

    def __init__(self, record: dict | None):
        super().__init__(record)
        self.record = record


class _FileRecord:
    """The record in a file on a disk. Each change is made under an exclusive `flock` of the file; the file is
    deleted (on release) only while locked, so a process that locked a file since deleted starts again."""

    def __init__(self, path: epath.Path):
        self.path = os.fspath(path)

    @contextlib.contextmanager
    def change(self, create: bool = False, wait: float | None = None):
        """Yields (record or None, write), write(record or None) replacing or deleting it, under the lock. Without
        `create` a missing file is not created (no record: write is None), so that only `acquire` makes one. With
        `wait`, raises Held if the lock is not had within `wait` seconds."""
        while True:
            try:
                f = os.fdopen(os.open(self.path, os.O_RDWR | (os.O_CREAT if create else 0), 0o644), "r+")
            except FileNotFoundError:
                if create:
                    raise
                yield None, None
                return
            with f:
                self._flock(f, wait)
                try:
                    same_file = os.fstat(f.fileno()).st_ino == os.stat(self.path).st_ino
                except FileNotFoundError:
                    same_file = False
                if not same_file:
                    continue  # deleted (released) while this process waited for it: open the new one
                f.seek(0)
                yield _parse(f.read()), functools.partial(self._write, f)
                return

    def _flock(self, f, wait: float | None) -> None:
        import fcntl  # POSIX; imported here so that importing bigjax works anywhere

        if wait is None:
            fcntl.flock(f, fcntl.LOCK_EX)
            return
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    f.seek(0)
                    raise Held(_parse(f.read())) from None
                time.sleep(0.05)

    def _write(self, f, record: dict | None) -> None:
        if record is None:
            os.unlink(self.path)
            return
        f.seek(0)
        f.truncate()
        f.write(json.dumps(record, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())


class _BucketRecord:
    """The record as an object in Cloud Storage: each write is conditional on the generation read."""

    def __init__(self, path: epath.Path):
        from google.cloud import storage  # the [gcs] extra

        bucket, _, name = os.fspath(path).removeprefix("gs://").partition("/")
        self.blob_name = name
        self.bucket = storage.Client().bucket(bucket)

    @contextlib.contextmanager
    def change(self, create: bool = False):
        from google.api_core import exceptions

        for _ in range(3):  # the object may change between its generation and its bytes: read both again
            blob = self.bucket.get_blob(self.blob_name)
            generation = blob.generation if blob is not None else 0  # 0: "only if it does not exist"
            try:
                text = blob.download_as_text(if_generation_match=generation) if blob is not None else ""
                break
            except (exceptions.PreconditionFailed, exceptions.NotFound) as error:
                changed = error
        else:
            raise Conflict() from changed

        def write(record):
            target = self.bucket.blob(self.blob_name)
            try:
                if record is None:
                    target.delete(if_generation_match=generation)
                else:
                    target.upload_from_string(json.dumps(record, indent=1) + "\n", if_generation_match=generation)
            except (exceptions.PreconditionFailed, exceptions.NotFound) as error:
                raise Conflict() from error

        yield _parse(text), write


def _parse(text: str) -> dict | None:
    """The record in `text`: None for none, {} for text that is not a JSON object (see `damage`)."""
    if not text.strip():
        return None
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return record if isinstance(record, dict) else {}


def _record_store(workdir: epath.Path):
    path = workdir / LOCK_FILE
    if not paths.is_url(workdir):
        return _FileRecord(path)
    if not os.fspath(workdir).startswith("gs://"):
        raise LockError(f"cannot lock {workdir}: bigjax locks workdirs on a disk or in gs:// buckets only")
    return _BucketRecord(path)


# --------------------------------------------------------------------------------------------------
# The lock


class WorkdirLock:
    """This process's hold on a workdir: taken by `acquire`, renewed by a heartbeat thread, checked at every write
    (`fenced`), given up by `release`."""

    def __init__(self, workdir: epath.Path, store, record: dict):
        self.workdir = workdir
        self._store = store
        self._record = record
        self._lost: str | None = None
        self._renewed = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._heartbeat, name="bigjax-workdir-lock", daemon=True)
        self._thread.start()

    @property
    def lease(self) -> float:
        return self._record["lease_seconds"]

    @property
    def token(self) -> str:
        return self._record["token"]

    @property
    def staging(self) -> epath.Path:
        """This holder's own directory in the workdir, where it prepares what it commits (see `JobLock`)."""
        return self.workdir / STAGING_DIR / self.token

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.lease / 8):
            with contextlib.suppress(Exception):  # a failed renewal is retried; `fenced` looks at the result
                self.renew()

    def renew(self) -> None:
        """Rewrite the heartbeat, if the record is still this process's; otherwise note that the lock is lost."""
        if self._lost:
            return
        renewed = dict(self._record, heartbeat=time.time())
        try:
            with self._store.change() as (current, write):
                if not self._is_mine(current):
                    return
                write(renewed)
        except Conflict:
            return  # changed under us: the next renewal reads it again
        self._record, self._renewed = renewed, time.monotonic()

    def _is_mine(self, current: dict | None) -> bool:
        """Whether the record read is still this holder's; if not, the lock is lost, and why is noted."""
        if current is not None and current.get("token") == self.token:
            return True
        if current is None or damage(current):
            self._lost = "its lock.json was deleted or damaged"
        else:
            self._lost = f"now held by {describe_holder(current)}"
        return False

    @contextlib.contextmanager
    def fenced(self):
        """Make a write into the workdir inside this context: it is entered only while this process holds the lock,
        and (on a disk) no other trainer can take it over until the write is done. Raises LockError otherwise.

        A heartbeat older than half the lease (a paused process, a stalled thread, a bucket that did not answer)
        is renewed first, if the record is still this holder's."""
        if not self._lost and time.monotonic() - self._renewed > self.lease / 2:
            with contextlib.suppress(Conflict, OSError):
                self.renew()
        with self._store.change() as (current, _):
            if self._lost or not self._is_mine(current):
                raise self._lost_error(self._lost)
            silent = time.monotonic() - self._renewed
            if silent > self.lease / 2:  # others may soon take this holder for gone
                raise self._lost_error(f"its heartbeat could not be written for {silent:.0f} s")
            yield

    def check(self) -> None:
        """Raise LockError if this process no longer holds the workdir."""
        with self.fenced():
            pass

    def raise_if_taken_over(self) -> None:
        """Raise LockError if another trainer has taken the workdir over (the record is looked at now)."""
        with contextlib.suppress(Conflict, OSError):
            self.renew()
        if self._lost:
            raise self._lost_error(self._lost)

    def _lost_error(self, why: str) -> LockError:
        return LockError(
            f"this trainer lost its lock on {self.workdir} ({why}); it stops, and writes nothing more there, so that "
            "it cannot write over another trainer's run"
        )

    def release(self) -> None:
        self._stop.set()
        self._thread.join()
        if self._lost:
            return
        if not paths.is_url(self.workdir):  # its staging directory, if it is empty (else the next holder sets it aside)
            with contextlib.suppress(Conflict, OSError, LockError), self.fenced():
                os.rmdir(self.staging)
                os.rmdir(self.staging.parent)
        with contextlib.suppress(Conflict, OSError), self._store.change() as (current, write):
            if current is not None and current.get("token") == self.token:
                write(None)


def acquire(workdir, lease: float | None = None, say=print) -> WorkdirLock:
    """Take the lock of `workdir` (as the command normalised it: paths.workdir), or raise LockError naming the live
    trainer that holds it."""
    workdir = epath.Path(workdir)
    if not paths.is_url(workdir):
        try:
            workdir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            why = error.strerror or error
            raise LockError(f"cannot create {workdir}: {why}; pass a --workdir that can be written") from error
    store = _record_store(workdir)
    record = new_record(lease_seconds() if lease is None else lease)
    gone = None  # a record that did not change for a lease although its heartbeat is ahead of this machine's clock
    for _ in range(4):  # a conflict means another trainer changed the record meanwhile: look again
        try:
            with _change_waiting(store) as (current, write):
                free = current is None or damage(current) or current == gone or not holder_is_alive(current)
                if free:
                    write(record)
                elif not clock_ahead(current):
                    raise in_use(workdir, current)
        except Conflict:
            continue
        except Held as held:
            if held.record and not damage(held.record):
                raise in_use(workdir, held.record) from None
            raise LockError(
                f"{workdir / LOCK_FILE} stays locked by another process (a trainer paused in the middle of a write?); "
                "run one trainer per workdir, and continue or stop the other one first"
            ) from None
        except OSError as error:
            raise LockError(
                f"cannot lock {workdir / LOCK_FILE}: {error.strerror or error}; a trainer needs a workdir it can write"
            ) from error
        if not free:  # its heartbeat is ahead of this machine's clock: watch it, without holding the record
            seen = watch_for_a_lease(store, current, say)
            if seen == current:
                gone = current
            elif seen is not None and seen.get("token") == current["token"]:
                raise in_use(workdir, seen)  # it renewed its heartbeat: alive
            continue
        if current is not None and damage(current):
            say(f"took over the lock of {workdir}: its {LOCK_FILE} was not written by bigjax ({damage(current)})")
        elif current is not None:
            say(f"took over the lock of {workdir}: its holder is gone ({describe_holder(current)})")
        return with_staging(WorkdirLock(workdir, store, record))
    raise LockError(f"{workdir} is being locked by other trainers at the same moment; run one trainer per workdir")


def _change_waiting(store):
    """The record's change for a trainer asking for the lock: on a disk, waiting FLOCK_WAIT_SECONDS at most."""
    if isinstance(store, _FileRecord):
        return store.change(create=True, wait=FLOCK_WAIT_SECONDS)
    return store.change(create=True)


def with_staging(held: WorkdirLock) -> WorkdirLock:
    """`held`, its staging directory made (on a disk: in a bucket, directories are only names)."""
    if not paths.is_url(held.workdir):
        with held.fenced():
            held.staging.mkdir(parents=True, exist_ok=True)
    return held


def in_use(workdir, holder: dict) -> LockError:
    return LockError(
        f"{workdir} is in use by another trainer: {describe_holder(holder)}. Wait for it to end, or stop it (on "
        f"{holder['host']}: `kill {holder['pid']}` saves and exits). If it is gone, this lock is taken over at once "
        f"on {holder['host']}, and from other hosts {lease_of(holder):.0f} s after its last heartbeat"
    )


@contextlib.contextmanager
def held(workdir, say=print):
    """The workdir's lock for the job, as a context: process 0 holds it; every process raises if it is refused.

    A trainer that has lost it says so (LockError), whatever else failed once it had."""
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    lock, refusal = None, None
    if jax.process_index() == 0:
        try:
            lock = acquire(workdir, say=say)
        except LockError as error:
            refusal = error
    token = lock.token if lock is not None else ""
    if jax.process_count() > 1:  # every process writes its part of a save into the holder's staging directory
        sent = np.frombuffer(token.encode().ljust(TOKEN_BYTES, b"\0"), np.uint8)
        token = np.asarray(multihost_utils.broadcast_one_to_all(sent)).tobytes().rstrip(b"\0").decode()
        if not token:
            refusal = refusal or LockError(f"{workdir} is in use by another trainer (process 0 says by whom)")
    if refusal is not None:
        raise refusal
    try:
        yield JobLock(lock, epath.Path(workdir) / STAGING_DIR / token)  # for every process
    except Exception as error:
        if lock is not None and not isinstance(error, LockError):
            lock.raise_if_taken_over()  # then that is what the user must know (the error is its context)
        raise
    finally:
        if lock is not None:
            lock.release()


TOKEN_BYTES = 32  # uuid4().hex


@dataclasses.dataclass
class JobLock:
    """The job's hold on its workdir: process 0's lock, and the directory where the job prepares its writes."""

    lock: WorkdirLock | None  # None on processes other than 0
    staging: epath.Path  # WORKDIR/staging/TOKEN: this holder's own, set aside by the next one

    def fenced(self):
        """A context for one write into the workdir (see `WorkdirLock.fenced`). Only process 0 commits writes; on the
        others it checks nothing."""
        return self.lock.fenced() if self.lock is not None else contextlib.nullcontext()

    def write_text(self, path: epath.Path, text: str) -> None:
        """Write the workdir's file `path` whole, atomically (a kill mid-write leaves the old one) and only while the
        lock is held: written in the staging directory, renamed into place inside `fenced()`. In a bucket an object
        upload is atomic already (never seen half-written), so it is made inside `fenced()` directly."""
        if paths.is_url(path):
            with self.fenced():
                path.write_text(text)
            return
        partial = self.staging / path.name
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(text)
        with self.fenced():
            partial.replace(path)

    def check(self) -> None:
        """Raise LockError on every process if process 0 lost the lock (a collective: every process calls it)."""
        import jax

        error = None
        if self.lock is not None:
            try:
                self.lock.check()
            except LockError as lost:
                error = lost
        if jax.process_count() > 1:
            import numpy as np
            from jax.experimental import multihost_utils

            if not multihost_utils.broadcast_one_to_all(np.array(error is None)):
                error = error or LockError("process 0 lost the job's lock on its workdir; stopping without saving")
        if error is not None:
            raise error
