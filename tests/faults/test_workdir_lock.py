"""One trainer per workdir: a second one is refused at once and touches nothing; a lock whose holder is gone is
taken over (at once on the same machine, after its lease elsewhere); a holder taken over stops saving.

The live trainer is frozen with SIGSTOP while the second one starts, so "alive while the other starts" is a fact,
not a race; the races between two trainers are forced with a paused thread holding the lock's record.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from conftest import REPO, TINY
from harness import all_threads_stopped, committed_steps, environment, rows_since, snapshot

from bigjax.run import lock


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return environment(tmp_path_factory.mktemp("compile-cache"))


def train_args(workdir, steps=100000):
    return ["train", "--config", f"{TINY}:steps={steps}", "--workdir", workdir, "--config.log_every=1"]


def start_trainer(workdir, env) -> subprocess.Popen:
    """A trainer of many steps, returned once it has committed a checkpoint (the workdir holds a real run)."""
    command = [sys.executable, "-m", "bigjax.cli", *map(str, train_args(workdir))]
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not committed_steps(workdir):
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the trainer committed no checkpoint in 300 s"
        time.sleep(0.05)
    return process


def freeze(process) -> None:
    """SIGSTOP, then wait until every thread of the process has stopped."""
    process.send_signal(signal.SIGSTOP)
    deadline = time.monotonic() + 60
    while not all_threads_stopped(process.pid):
        assert time.monotonic() < deadline, "the trainer did not stop"
        time.sleep(0.001)


def test_a_second_trainer_is_refused_at_once_and_touches_nothing_of_the_live_one(cli, cli_in_process, env, tmp_path):
    workdir = tmp_path / "run"
    first = start_trainer(workdir, env)
    freeze(first)  # alive, and unable to change anything while the second one starts
    try:
        before = snapshot(workdir)
        second = cli(*train_args(workdir), env=env, check=False)
        after = snapshot(workdir)
    finally:
        first.send_signal(signal.SIGCONT)

    assert second.returncode == 2, second.stderr[-3000:]
    assert second.stderr.startswith("error: "), second.stderr[-3000:]
    assert len(second.stderr.splitlines()) == 1, second.stderr  # one line, no traceback
    assert f"{workdir} is in use by another trainer: pid {first.pid} on host {socket.gethostname()}" in second.stderr
    assert f"kill {first.pid}" in second.stderr  # and how to tell whether it is alive, and stop it
    assert after == before  # not a file of the live run touched, none added

    # The first trainer never noticed: it saves where a signal stops it, and its run resumes from there.
    first.send_signal(signal.SIGTERM)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    stopped_at = rows_since(workdir / "metrics.jsonl")[-1]["step"]
    assert f"stopped by SIGTERM at step {stopped_at}" in out and committed_steps(workdir)[-1] == stopped_at
    assert not (workdir / lock.LOCK_FILE).exists()  # given up at exit
    resumed = cli_in_process(*train_args(workdir, steps=stopped_at + 1))  # the resume itself, in this process
    assert f"resumed from step {stopped_at}" in resumed.stdout


def test_a_holder_paused_in_the_middle_of_a_fenced_write_is_reported_in_use_not_waited_for(tmp_path, monkeypatch):
    """A holder that stops inside `fenced()` (SIGSTOP, a VM pause) keeps the record's flock: a trainer asking for the
    lock then is refused within lock.FLOCK_WAIT_SECONDS, naming the holder, instead of waiting for it without end."""
    holder = lock.acquire(tmp_path, say=lambda _: None)
    monkeypatch.setattr(lock, "FLOCK_WAIT_SECONDS", 0.2)
    try:
        with holder.fenced():  # the flock held, as by a holder paused in a write
            with pytest.raises(lock.LockError, match=f"is in use by another trainer: pid {os.getpid()}"):
                lock.acquire(tmp_path, say=lambda _: None)
        assert json.loads((tmp_path / lock.LOCK_FILE).read_text())["token"] == holder._record["token"]  # untouched
    finally:
        holder.release()


def test_the_lock_of_a_killed_trainer_is_taken_over_at_once(cli_in_process, env, tmp_path):
    """The killed holder is a process; the trainer taking over runs the command line in this one (another pid)."""
    workdir = tmp_path / "run"
    first = start_trainer(workdir, env)
    first.kill()
    first.wait()
    held = json.loads((workdir / lock.LOCK_FILE).read_text())
    assert held["pid"] == first.pid  # SIGKILL left the lock behind

    second = cli_in_process(*train_args(workdir, steps=committed_steps(workdir)[-1] + 1))

    assert f"took over the lock of {workdir}: its holder is gone (pid {first.pid} on host" in second.stdout
    assert "resumed from step" in second.stdout


# --------------------------------------------------------------------------------------------------
# Holders on other machines, lost locks and races: the lock itself, in this process


def foreign_record(heartbeat_age: float, lease: float = 120.0) -> dict:
    """A lock written by a trainer on another machine, whose heartbeat is `heartbeat_age` seconds old."""
    now = time.time()
    return {
        "host": "other-host",
        "pid": 4242,
        "pid_start": 1,
        "machine": "another-boot/pid:[1]",
        "command": "bigjax train ...",
        "since": now - 3600,
        "heartbeat": now - heartbeat_age,
        "lease_seconds": lease,
        "token": "theirs",
    }


def write_record(workdir, record) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / lock.LOCK_FILE).write_text(json.dumps(record))


def test_a_holder_on_another_machine_is_alive_while_its_heartbeat_is_within_its_lease(tmp_path):
    write_record(tmp_path, foreign_record(heartbeat_age=30))
    with pytest.raises(lock.LockError, match=r"in use by another trainer: pid 4242 on host other-host.*heartbeat 30 s"):
        lock.acquire(tmp_path)
    assert json.loads((tmp_path / lock.LOCK_FILE).read_text())["token"] == "theirs"  # untouched


def test_a_holder_on_another_machine_is_gone_once_its_lease_has_run_out(tmp_path):
    write_record(tmp_path, foreign_record(heartbeat_age=121))
    said = []
    held = lock.acquire(tmp_path, say=said.append)
    try:
        assert said and "its holder is gone (pid 4242 on host other-host" in said[0]
        assert json.loads((tmp_path / lock.LOCK_FILE).read_text())["pid"] == os.getpid()
    finally:
        held.release()
    assert not (tmp_path / lock.LOCK_FILE).exists()


def test_a_reused_process_id_on_this_machine_does_not_keep_a_dead_holders_lock(tmp_path):
    record = lock.new_record(120.0)
    record.update(pid_start=record["pid_start"] - 1, token="an earlier process with this pid")
    write_record(tmp_path, record)
    lock.acquire(tmp_path, say=lambda _: None).release()


@pytest.mark.parametrize("noticed", [True, False], ids=["noticed", "never noticed"])
def test_a_holder_taken_over_stops_and_leaves_the_new_holders_lock_in_place(tmp_path, noticed):
    held = lock.acquire(tmp_path)
    held.check()
    held._stop.set()  # its heartbeat thread stood still with it (the heartbeat would notice the takeover)
    held._thread.join()
    write_record(tmp_path, foreign_record(heartbeat_age=0))  # taken over while this holder stood still
    if noticed:
        with pytest.raises(lock.LockError, match=r"lost its lock .*\(now held by pid 4242 on host other-host"):
            held.check()
    held.release()  # it exits
    assert json.loads((tmp_path / lock.LOCK_FILE).read_text())["token"] == "theirs"
    with pytest.raises(lock.LockError, match="in use by another trainer: pid 4242 on host other-host"):
        lock.acquire(tmp_path)  # a third trainer is still refused


def test_a_trainer_starting_as_the_holder_releases_gets_the_lock_in_its_own_name(tmp_path, monkeypatch):
    """The starter opens lock.json, and waits for its flock while the leaver deletes the file: it must look again
    (at a new file), not read the deleted one, which names the leaver."""
    import fcntl

    leaver = lock.acquire(tmp_path, say=lambda _: None)
    deleting, starter_waits = threading.Event(), threading.Event()
    flock, write = fcntl.flock, lock._FileRecord._write

    def flock_seen(f, operation):
        if threading.current_thread().name == "starter":
            starter_waits.set()  # it has the record file open, and asks for its lock
        return flock(f, operation)

    def delete_once_the_starter_waits(self, f, record):
        if record is None:  # the leaver, releasing
            deleting.set()
            assert starter_waits.wait(60)
        return write(self, f, record)

    monkeypatch.setattr(fcntl, "flock", flock_seen)
    monkeypatch.setattr(lock._FileRecord, "_write", delete_once_the_starter_waits)
    results = {}

    def start():
        try:
            results["starter"] = lock.acquire(tmp_path, say=lambda _: None)
        except lock.LockError as error:
            results["starter"] = error

    leaving = threading.Thread(target=leaver.release)
    leaving.start()
    assert deleting.wait(60)  # the leaver holds the record, about to delete it
    starter = threading.Thread(target=start, name="starter")
    starter.start()
    leaving.join(60)
    starter.join(60)

    assert isinstance(results["starter"], lock.WorkdirLock), results["starter"]
    assert json.loads((tmp_path / lock.LOCK_FILE).read_text())["token"] == results["starter"].token
    results["starter"].release()


@pytest.mark.parametrize(
    "damaged",
    [
        lambda: {key: value for key, value in lock.new_record(120.0).items() if key != "pid"},
        lambda: dict(foreign_record(heartbeat_age=0), heartbeat="a minute ago"),
        lambda: "[1, 2]",
        lambda: "{ not json",
    ],
    ids=["no pid", "text heartbeat", "not an object", "not JSON"],
)
def test_a_damaged_lock_record_holds_no_lock_and_is_taken_over_with_a_word(tmp_path, damaged):
    """bigjax writes lock.json whole, under its compare-and-swap: a damaged record was not written by a live trainer's
    heartbeat. Taking it over costs nothing even if a trainer still runs there: that one stops at its next write."""
    record = damaged()
    (tmp_path / lock.LOCK_FILE).write_text(record if isinstance(record, str) else json.dumps(record))
    said = []
    held = lock.acquire(tmp_path, say=said.append)
    try:
        assert len(said) == 1 and said[0].startswith(f"took over the lock of {tmp_path}: its lock.json was not written")
        assert json.loads((tmp_path / lock.LOCK_FILE).read_text())["token"] == held.token
    finally:
        held.release()


def test_a_heartbeat_ahead_of_this_machines_clock_holds_the_lock_no_longer_than_its_lease(tmp_path):
    """Its holder's clock is an hour ahead (clock skew between hosts): its heartbeat says nothing about when it was
    written, so the record is watched for one lease of this machine's clock, and taken over if it never changes."""
    write_record(tmp_path, foreign_record(heartbeat_age=-3600, lease=0.5))
    said = []
    held = lock.acquire(tmp_path, say=said.append)
    try:
        assert "3600 s ahead of this machine's clock" in said[0] and "watching its heartbeat for 0.5 s" in said[0]
        assert said[-1].startswith(f"took over the lock of {tmp_path}: its holder is gone (pid 4242 on host other-host")
        assert json.loads((tmp_path / lock.LOCK_FILE).read_text())["token"] == held.token
    finally:
        held.release()


def test_a_holder_whose_clock_is_ahead_keeps_its_lock_while_it_renews_its_heartbeat(tmp_path):
    record = foreign_record(heartbeat_age=-3600, lease=30.0)
    write_record(tmp_path, record)
    store, stop = lock._FileRecord(tmp_path / lock.LOCK_FILE), threading.Event()

    def renew():  # the holder on the other host, as its heartbeat thread does (under the record's flock)
        while not stop.wait(0.05):
            record["heartbeat"] += 0.05
            with store.change() as (_, write):
                write(record)

    renewing = threading.Thread(target=renew)
    renewing.start()
    try:
        with pytest.raises(lock.LockError, match=r"in use by another trainer: pid 4242 .* ahead of this machine's"):
            lock.acquire(tmp_path, say=lambda _: None)
    finally:
        stop.set()
        renewing.join()
    assert json.loads((tmp_path / lock.LOCK_FILE).read_text())["token"] == "theirs"


def test_a_heartbeat_that_stalled_is_renewed_before_the_next_save_if_nobody_took_over(tmp_path):
    held = lock.acquire(tmp_path, lease=120.0)
    try:
        held._stop.set()  # no more heartbeats from the thread: as if it had stalled
        held._thread.join()
        held._renewed -= 100  # last renewed 100 s ago, more than half the lease
        before = json.loads((tmp_path / lock.LOCK_FILE).read_text())["heartbeat"]
        held.check()  # renews, since the record is still this holder's
        assert json.loads((tmp_path / lock.LOCK_FILE).read_text())["heartbeat"] > before
    finally:
        held.release()


def test_two_trainers_that_find_the_same_stale_lock_cannot_both_take_it(tmp_path, monkeypatch):
    write_record(tmp_path, foreign_record(heartbeat_age=1000))
    first_is_deciding, second_may_look = threading.Event(), threading.Event()
    alive = lock.holder_is_alive

    def pausing_holder_is_alive(record, now=None):
        if threading.current_thread().name == "first":
            first_is_deciding.set()
            assert second_may_look.wait(60)
        return alive(record, now)

    monkeypatch.setattr(lock, "holder_is_alive", pausing_holder_is_alive)
    results = {}

    def take(name):
        try:
            results[name] = lock.acquire(tmp_path, say=lambda _: None)
        except lock.LockError as error:
            results[name] = error

    first = threading.Thread(target=take, args=("first",), name="first")
    first.start()
    assert first_is_deciding.wait(60)  # the first has read the stale record, under its lock, and decides
    second = threading.Thread(target=take, args=("second",), name="second")
    second.start()
    second.join(timeout=1)
    assert second.is_alive()  # the second waits for the record: it cannot read it while the first decides
    second_may_look.set()
    first.join(60)
    second.join(60)

    assert isinstance(results["first"], lock.WorkdirLock)
    assert isinstance(results["second"], lock.LockError) and "in use by another trainer" in str(results["second"])
    results["first"].release()
