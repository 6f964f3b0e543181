"""A trainer that lost its lock writes nothing into the workdir (fencing).

Trainer A, on "another host" (its lock record names another machine; its lease is 2 s), is stopped with SIGSTOP at
one of its write points (tests/faults/stall.py), as a paused VM would be. Once its lease has run out, B (this test
process) takes the workdir over. A then continues: whatever it was about to write must not land. It exits with the
lost-lock line, every file of the workdir is as B found it (but A's own staging directory and library log file, named by
its pid, which no program reads), and lock.json still names B. Then B trains to the end, and its run is the undisturbed
one's.
"""

import json
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, TINY
from harness import (
    all_threads_stopped,
    committed_steps,
    environment,
    final_state,
    last_row_per_step,
    same_arrays,
    snapshot,
    uncommitted_steps,
)

from bigjax.run import lock, train

STEPS = 8
OVERRIDES = ["config.log_every=1", "config.checkpoint_every=2", "config.keep_checkpoints=1"]
LEASE = 2.0  # A's, in seconds: another host may take over once A has been stopped this long

# Where A stops: module:function:N:before|after (the N-th call). Each is the last moment before that write.
WRITE_POINTS = {
    "config.json": "bigjax.run.checkpoint:write_config:1:before",
    "quarantine move": "bigjax.run.checkpoint:set_aside:1:before",  # of the killed save planted before A starts
    "save after its lock check": "bigjax.run.lock:JobLock.check:2:after",  # the check before step 4's save
    "checkpoint commit": "orbax.checkpoint._src.path.atomicity:on_commit_callback:2:before",  # step 4's async save
    "keep-N deletion": "bigjax.run.checkpoint:delete_old_checkpoints:3:before",  # of step 2, at step 6's save
    "metrics row": "bigjax.ops.metrics:JsonLines.write:3:before",
    "events file": "bigjax.ops.metrics:TensorBoard.write:3:before",  # step 3's, once its metrics row is written
}


@pytest.fixture(scope="module")
def config():
    from bigjax import config as config_lib

    return config_lib.load(f"{TINY}:steps={STEPS}", OVERRIDES)


@pytest.fixture(scope="module")
def undisturbed(config, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("undisturbed")
    train.train(config, workdir)
    return workdir, final_state(workdir, STEPS)


def start_stalled(workdir, stall: str) -> subprocess.Popen:
    """Trainer A, stopped where `stall` says: returned once all its threads have stopped there."""
    stall_py = str(REPO / "tests" / "faults" / "stall.py")
    command = [sys.executable, stall_py, "train", "--config", f"{TINY}:steps={STEPS}", "--workdir", str(workdir)]
    command += [f"--{override}" for override in OVERRIDES]
    env = dict(environment(), BIGJAX_STALL=stall, BIGJAX_STALL_REMOTE="1", BIGJAX_LOCK_LEASE=str(LEASE))
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not all_threads_stopped(process.pid):
        assert process.poll() is None, f"it exited before its stall at {stall}:\n{process.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, f"it did not reach {stall} in 300 s"
        time.sleep(0.02)
    return process


def wait_until_its_lease_ran_out(workdir) -> dict:
    """A's record, once its heartbeat (stopped with it) is older than its lease: from another host, A is gone."""
    record = json.loads((workdir / lock.LOCK_FILE).read_text())
    while time.time() - record["heartbeat"] <= record["lease_seconds"]:
        time.sleep(0.1)
    return record


@pytest.mark.parametrize("write_point", list(WRITE_POINTS))
def test_a_trainer_that_lost_its_lock_writes_nothing_more(write_point, config, undisturbed, tmp_path):
    workdir = tmp_path / "run"
    if write_point == "quarantine move":  # a save killed mid-write, for A to set aside when it starts
        (workdir / "checkpoints" / "2.orbax-checkpoint-tmp" / "params").mkdir(parents=True)
    a = start_stalled(workdir, WRITE_POINTS[write_point])
    try:
        a_record = wait_until_its_lease_ran_out(workdir)
        said = []
        b = lock.acquire(workdir, say=said.append)  # B, on this host, takes the workdir over
    except BaseException:
        a.kill()
        raise
    assert said and f"its holder is gone (pid {a.pid} on host" in said[0]

    def a_own(relative):  # its staging directory (where an unfinished save is abandoned), its library log file
        own_log = relative == "logs" or relative.endswith(f"-{a.pid}.log")  # (named by its pid, read by no program)
        return relative.startswith(f"staging/{a_record['token']}") or own_log

    try:
        before = snapshot(workdir, leave_out=a_own)
        a.send_signal(signal.SIGCONT)
        _, a_err = a.communicate(timeout=300)
        after = snapshot(workdir, leave_out=a_own)
        assert json.loads((workdir / lock.LOCK_FILE).read_text())["token"] == b._record["token"]  # B's, in place
    finally:
        b.release()

    assert a.returncode == 2, a_err[-3000:]
    assert "Traceback" not in a_err, a_err[-3000:]
    errors = [line for line in a_err.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and errors[0].startswith(f"error: this trainer lost its lock on {workdir}"), a_err
    assert a_err.rstrip().splitlines()[-1] == errors[0] or a_err.rstrip().splitlines()[-1].startswith("details: ")
    assert after == before, f"A wrote into the workdir it lost: {sorted(set(after.items()) ^ set(before.items()))}"

    # B trains to the end: its run is the undisturbed one's.
    assert train.train(config, workdir).status == "finished"
    reference, reference_state = undisturbed
    assert committed_steps(workdir) == committed_steps(reference) and not uncommitted_steps(workdir)
    assert not [p for p in (workdir / "checkpoints").iterdir() if p.name.endswith(".orbax-checkpoint-tmp")]
    assert (workdir / "config.json").read_bytes() == (reference / "config.json").read_bytes()
    losses = {step: row["loss"] for step, row in last_row_per_step(workdir).items()}
    assert losses == {step: row["loss"] for step, row in last_row_per_step(reference).items()}
    assert same_arrays(final_state(workdir, STEPS), reference_state)
