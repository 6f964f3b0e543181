"""One trainer per workdir: a lease in WORKDIR/lock.json.

Two trainers writing one workdir destroy each other's checkpoints, so `bigjax train` takes this lock before it
touches anything in the workdir, and a second trainer is refused at once with one line naming the holder.

The lock is a JSON record of who holds it (host, process id and that process's start time, the machine's boot
and process-namespace ids), the command, when it was taken, and a heartbeat that the holder rewrites every
`lease / 8` seconds. A holder counts as alive:

* on the same machine (same host name, boot id and pid namespace): while its process runs, the same process
  (pid and start time). A trainer killed with SIGKILL or by the OOM killer is seen as gone at once;
* seen from anywhere else (another host sharing the disk, a bucket): while its heartbeat is younger than its
  lease, BIGJAX_LOCK_LEASE seconds (default 120). The lock of a lost host is taken over once that has passed.

A lock whose holder is gone is taken over, and the takeover said. Every change of the record is a
compare-and-swap, so two trainers that find the same stale lock cannot both take it: on a disk, under `flock` of
the record file (deleted only while locked; a waiter that finds its file deleted starts again); in a bucket,
with Cloud Storage's generation preconditions. A holder that finds the record no longer its own (it stalled
longer than its lease and was taken over) has lost the workdir: `check()` raises, and it saves nothing more.

In a job of several processes, process 0 holds the lock for the job (`acquire_for_job`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
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
DEFAULT_LEASE_SECONDS = 120.0


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


def holder_is_alive(record: dict, now: float | None = None) -> bool:
    """Whether the process that wrote `record` still holds the lock (see the module docstring)."""
    if record.get("machine") and record.get("machine") == machine_id() and record.get("host") == socket.gethostname():
        return process_start(record["pid"]) == record.get("pid_start")
    age = (time.time() if now is None else now) - record.get("heartbeat", 0.0)
    return age < record.get("lease_seconds", DEFAULT_LEASE_SECONDS)


def describe_holder(record: dict) -> str:
    started = datetime.datetime.fromtimestamp(record.get("since", 0), datetime.UTC)
    age = time.time() - record.get("heartbeat", 0.0)
    return (
        f"pid {record.get('pid')} on host {record.get('host')}, started {started:%Y-%m-%d %H:%M:%S} UTC "
        f"(`{record.get('command', '?')}`), last heartbeat {age:.0f} s ago"
    )


# --------------------------------------------------------------------------------------------------
# The record, changed only by compare-and-swap


class Conflict(Exception):
    """The record changed between reading it and writing it: read again."""


class _FileRecord:
    """The record in a file on a disk. Each change is made under an exclusive `flock` of the file; the file is
    deleted (on release) only while locked, so a process that locked a file since deleted starts again."""

    def __init__(self, path: epath.Path):
        self.path = os.fspath(path)

    @contextlib.contextmanager
    def change(self):
        """Yields (record or None, write), write(record or None) replacing or deleting it, under the lock."""
        import fcntl  # POSIX; imported here so that importing bigjax works anywhere

        while True:
            with os.fdopen(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644), "r+") as f:
                fcntl.flock(f, fcntl.LOCK_EX)
                try:
                    same_file = os.fstat(f.fileno()).st_ino == os.stat(self.path).st_ino
                except FileNotFoundError:
                    same_file = False
                if not same_file:
                    continue  # deleted (released) while this process waited for it: open the new one
                f.seek(0)
                yield _parse(f.read()), lambda record: self._write(f, record)
                return

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
    def change(self):
        from google.api_core import exceptions

        blob = self.bucket.get_blob(self.blob_name)
        generation = blob.generation if blob is not None else 0  # 0: "only if it does not exist"
        try:
            text = blob.download_as_text(if_generation_match=generation) if blob is not None else ""
        except (exceptions.PreconditionFailed, exceptions.NotFound) as error:
            raise Conflict() from error

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
    """The record in `text`; None for no record. Unreadable text holds no lock: it was not written by bigjax,
    which writes only under the compare-and-swap."""
    try:
        record = json.loads(text) if text.strip() else None
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) and "token" in record else None


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
    """This process's hold on a workdir: taken by `acquire`, renewed by a heartbeat thread, given up by `release`."""

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

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.lease / 8):
            with contextlib.suppress(Exception):  # a failed renewal is retried; `check` looks at the result
                self.renew()

    def renew(self) -> None:
        """Rewrite the heartbeat, if the record is still this process's; otherwise note that the lock is lost."""
        if self._lost:
            return
        renewed = dict(self._record, heartbeat=time.time())
        try:
            with self._store.change() as (current, write):
                if current is None or current.get("token") != self._record["token"]:
                    self._lost = f"now held by {describe_holder(current)}" if current else "its lock file was deleted"
                    return
                write(renewed)
        except Conflict:
            return  # changed under us: the next renewal reads it again
        self._record, self._renewed = renewed, time.monotonic()

    def check(self) -> None:
        """Raise LockError if this process no longer holds the workdir. A heartbeat older than half the lease (a
        stalled thread, a paused process, a bucket that did not answer) is renewed here first."""
        if not self._lost and time.monotonic() - self._renewed > self.lease / 2:
            self.renew()
        if self._lost or time.monotonic() - self._renewed > self.lease / 2:
            why = self._lost or f"its heartbeat could not be written for {time.monotonic() - self._renewed:.0f} s"
            raise LockError(
                f"this trainer lost its lock on {self.workdir} ({why}); it stops without saving so that it cannot "
                "write over another trainer's checkpoints"
            )

    def release(self) -> None:
        self._stop.set()
        self._thread.join()
        if self._lost:
            return
        with contextlib.suppress(Conflict, OSError), self._store.change() as (current, write):
            if current is not None and current.get("token") == self._record["token"]:
                write(None)


def acquire(workdir, lease: float | None = None, say=print) -> WorkdirLock:
    """Take the workdir's lock, or raise LockError naming the live trainer that holds it."""
    workdir = paths.workdir(workdir)
    if not paths.is_url(workdir):
        try:
            workdir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            why = error.strerror or error
            raise LockError(f"cannot create {workdir}: {why}; pass a --workdir that can be written") from error
    store = _record_store(workdir)
    record = new_record(lease_seconds() if lease is None else lease)
    for _ in range(3):  # a conflict means another trainer changed the record meanwhile: look again
        try:
            with store.change() as (current, write):
                if current is not None and holder_is_alive(current):
                    raise LockError(
                        f"{workdir} is in use by another trainer: {describe_holder(current)}. Wait for it to end, "
                        f"or stop it (on {current.get('host')}: `kill {current.get('pid')}` saves and exits). If it "
                        f"is gone, this lock is taken over at once on {current.get('host')}, and from other hosts "
                        f"{current.get('lease_seconds', DEFAULT_LEASE_SECONDS):.0f} s after its last heartbeat"
                    )
                write(record)
        except Conflict:
            continue
        except OSError as error:
            raise LockError(
                f"cannot lock {workdir / LOCK_FILE}: {error.strerror or error}; a trainer needs a workdir it can write"
            ) from error
        if current is not None:
            say(f"took over the lock of {workdir}: its holder is gone ({describe_holder(current)})")
        return WorkdirLock(workdir, store, record)
    raise LockError(f"{workdir} is being locked by other trainers at the same moment; run one trainer per workdir")


@contextlib.contextmanager
def held(workdir, say=print):
    """The workdir's lock for the job, as a context: process 0 holds it; every process raises if it is refused."""
    import jax
    from jax.experimental import multihost_utils

    lock, refusal = None, None
    if jax.process_index() == 0:
        try:
            lock = acquire(workdir, say=say)
        except LockError as error:
            refusal = error
    if jax.process_count() > 1:
        import numpy as np

        if not multihost_utils.broadcast_one_to_all(np.array(refusal is None)):
            refusal = refusal or LockError(f"{workdir} is in use by another trainer (process 0 says by whom)")
    if refusal is not None:
        raise refusal
    try:
        yield JobLock(lock)
    finally:
        if lock is not None:
            lock.release()


@dataclasses.dataclass
class JobLock:
    """The job's hold on its workdir; `check()` raises on every process if process 0 lost it."""

    lock: WorkdirLock | None  # None on processes other than 0

    def check(self) -> None:
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
