"""Multi-host for real: local processes with simulated CPU devices form one 8-device job over gloo.

Each process reads only its slice of every batch; the global batch, and so the training, is the same as in
one process with 8 devices. Checkpoints move between process counts both ways; the eval job runs beside a
multi-process run; a process that dies or never starts stops the others with an error instead of a hang.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import REPO, TINY, xla_flags

from bigjax.ops import metrics
from bigjax.run import checkpoint

TRAIN = [sys.executable, "-m", "bigjax.cli", "train"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_processes(command, num_processes, log_dir, port=None, only=None, **extra_env):
    """Start the processes of one job (or `only` some of them), each logging to log_dir/process-i.{out,err}."""
    port = port or free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    processes = {}
    for index in range(num_processes) if only is None else only:
        env = dict(os.environ)
        env.update(
            XLA_FLAGS=xla_flags(8 // num_processes),
            JAX_PLATFORMS="cpu",
            JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
            JAX_NUM_PROCESSES=str(num_processes),
            JAX_PROCESS_ID=str(index),
            BIGJAX_INIT_TIMEOUT="60",
            PYTHONUNBUFFERED="1",
        )
        env.update(extra_env)
        processes[index] = subprocess.Popen(
            [*map(str, command)],
            cwd=REPO,
            env=env,
            stdout=open(log_dir / f"process-{index}.out", "w"),
            stderr=open(log_dir / f"process-{index}.err", "w"),
        )
    return processes


def wait_for(processes, timeout=300) -> dict:
    """Wait for every process; kill the rest if one overruns. Returns {index: returncode}."""
    deadline = time.monotonic() + timeout
    try:
        return {i: p.wait(timeout=max(deadline - time.monotonic(), 1)) for i, p in processes.items()}
    finally:
        for p in processes.values():
            p.kill()


def log(log_dir, index, stream="err") -> str:
    return (log_dir / f"process-{index}.{stream}").read_text()


def assert_succeeded(returncodes, log_dir):
    for index, code in returncodes.items():
        assert code == 0, f"process {index} failed ({code}):\n{log(log_dir, index)[-3000:]}"


def losses(workdir):
    return {row["step"]: row["loss"] for row in metrics.read_jsonl(workdir / "metrics.jsonl") if "loss" in row}


@pytest.fixture(scope="module")
def reference_losses(tmp_path_factory):
    """The tiny run's losses in one process with 8 devices (this one): what every multi-process layout must match."""
    from bigjax import config as config_lib
    from bigjax.run import train

    workdir = tmp_path_factory.mktemp("one")
    train.train(config_lib.load(TINY, ["config.log_every=1", "config.checkpoint_every=0"]), workdir)
    return losses(workdir)


def assert_same_losses(workdir, reference, steps=range(1, 9)):
    np.testing.assert_allclose([losses(workdir)[s] for s in steps], [reference[s] for s in steps], rtol=1e-5)


def test_two_processes_train_like_one_and_resume_in_one(cli_in_process, tmp_path, reference_losses):
    run, logs = tmp_path / "run", tmp_path / "logs"
    args = ["--config", TINY, "--workdir", run, "--config.log_every=1", "--stop-at-step", "4"]
    assert_succeeded(wait_for(start_processes(TRAIN + args, 2, logs)), logs)
    assert "mesh data=8" in log(logs, 0, "out") and "loss=" in log(logs, 0, "out")
    assert "mesh" not in log(logs, 1, "out") and "loss=" not in log(logs, 1, "out")  # only process 0 logs
    assert sorted(losses(run)) == [1, 2, 3, 4]

    cli_in_process("train", "--config", TINY, "--workdir", run, "--config.log_every=1")  # resumed by one process
    assert_same_losses(run, reference_losses)


def test_four_processes_through_the_launcher_train_like_one(tmp_path, reference_losses):
    run, logs = tmp_path / "run", tmp_path / "logs"
    result = subprocess.run(
        ["launch/multiprocess.sh", "4", "--logdir", logs, "--", *TRAIN, "--config", TINY, "--workdir", run]
        + ["--config.log_every=1", "--config.checkpoint_every=0"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "XLA_FLAGS": xla_flags(None)},  # the launcher adds the device count
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "4 processes x 2 CPU devices" in result.stderr
    assert "mesh data=8" in result.stdout  # process 0's log, shown live
    assert sorted(p.name for p in logs.iterdir()) == [f"process-{i}.log" for i in range(4)]
    assert_same_losses(run, reference_losses)


def test_one_process_checkpoint_resumes_in_two_beside_the_eval_job(cli_in_process, tmp_path, reference_losses):
    run, logs = tmp_path / "run", tmp_path / "logs"
    cli_in_process("train", "--config", TINY, "--workdir", run, "--config.log_every=1", "--stop-at-step", "4")

    trainers = start_processes(TRAIN + ["--config", TINY, "--workdir", run, "--config.log_every=1"], 2, logs)
    # The eval job is a process of its own, outside the training job, with its own mesh of 2 devices.
    eval_env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    eval_job = subprocess.Popen(
        [sys.executable, "-m", "bigjax.cli", "eval", "--config", TINY, "--workdir", run, "--poll", "0.5"],
        cwd=REPO,
        env={**eval_env, "XLA_FLAGS": xla_flags(2)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert_succeeded(wait_for(trainers), logs)
    out, err = eval_job.communicate(timeout=300)
    assert eval_job.returncode == 0, err[-3000:]
    assert "mesh data=2" in out
    assert sorted(losses(run)) == list(range(1, 9))
    assert_same_losses(run, reference_losses)
    assert sorted(row["step"] for row in metrics.read_jsonl(run / "eval" / "metrics.jsonl")) == [4, 8]


def test_errors_name_the_process_they_happened_in(tmp_path):
    logs = tmp_path / "logs"
    command = TRAIN + ["--config", TINY, "--workdir", tmp_path / "run", "--config.optim.lr=fast"]
    returncodes = wait_for(start_processes(command, 2, logs), timeout=120)
    assert returncodes == {0: 2, 1: 2}
    for index in (0, 1):
        assert f"error (process {index} of 2): config.optim.lr='fast' is not a valid float" in log(logs, index)


def test_a_killed_process_makes_the_others_exit_within_the_heartbeat_timeout_and_both_resume(cli_in_process, tmp_path):
    run = tmp_path / "run"
    endless = ["--config", TINY + ":steps=100000", "--workdir", run, "--config.log_every=1"]
    endless += ["--config.checkpoint_every=0"]  # no save in flight when the peer dies: the heartbeat notices
    # Step 4's checkpoint, from one process (a checkpoint moves between process counts: see above).
    cli_in_process("train", *endless, "--stop-at-step", "4")

    logs = tmp_path / "logs"
    processes = start_processes(TRAIN + endless, 2, logs, BIGJAX_HEARTBEAT_TIMEOUT="5")  # resumes from step 4
    try:
        deadline = time.monotonic() + 240
        while "step 6:" not in log(logs, 0, "out"):  # training is under way again
            assert time.monotonic() < deadline and processes[0].poll() is None, log(logs, 0)[-3000:]
            time.sleep(0.5)
        processes[1].send_signal(signal.SIGKILL)
        # Bounded: heartbeat timeout (5 s) plus detection and exit, with room for a loaded machine.
        returncode = processes[0].wait(timeout=90)
    finally:
        for p in processes.values():
            p.kill()
    assert returncode != 0
    survivor = log(logs, 0)
    # What notices first: the coordination service's missed heartbeats (most runs), or gloo, which aborted the
    # survivor in a collective right after the kill in 3 of about 30 runs of the suite ("Received data size doesn't
    # match expected size": why it reads a message of another size there is not understood yet). Either way the
    # survivor exits, non-zero, instead of waiting for a peer that is gone.
    noticed = ("The following tasks are unhealthy (stopped sending heartbeats):\n1\n", "gloo::EnforceNotMet")
    assert any(reason in survivor for reason in noticed), survivor[-3000:]

    # Restarting both with the same command resumes from the last committed checkpoint (step 4) and continues
    # exactly as a run that was never interrupted (here: one process with the same 8 devices).
    again = tmp_path / "logs-again"
    assert_succeeded(wait_for(start_processes(TRAIN + endless + ["--stop-at-step", "8"], 2, again)), again)
    assert "resumed from step 4" in log(again, 0, "out")
    uninterrupted = [*endless[:2], "--workdir", tmp_path / "uninterrupted", *endless[4:], "--stop-at-step", "8"]
    cli_in_process("train", *uninterrupted)
    assert_same_losses(run, losses(tmp_path / "uninterrupted"))


def test_a_signal_to_one_process_stops_every_process_at_the_same_step_with_a_checkpoint(tmp_path):
    """A scheduler may signal one host only: the others must stop and save at the same step, not hang in a save."""
    run, logs = tmp_path / "run", tmp_path / "logs"
    endless = ["--config", TINY + ":steps=100000", "--workdir", run, "--config.log_every=1"]
    processes = start_processes(TRAIN + endless + ["--config.checkpoint_every=0"], 2, logs)
    try:
        deadline = time.monotonic() + 240
        while "step 2:" not in log(logs, 0, "out"):
            assert time.monotonic() < deadline and processes[0].poll() is None, log(logs, 0)[-3000:]
            time.sleep(0.5)
        processes[1].send_signal(signal.SIGTERM)  # process 0 is never signalled
    finally:
        returncodes = wait_for(processes, timeout=120)
    assert_succeeded(returncodes, logs)
    stopped = re.search(r"stopped by SIGTERM at step (\d+) with a checkpoint", log(logs, 0, "out"))
    assert stopped, log(logs, 0, "out")[-3000:]
    assert checkpoint.committed_steps(run) == [int(stopped[1])]
    assert max(losses(run)) == int(stopped[1])


def test_a_process_that_never_starts_fails_the_others_with_an_error_naming_it(tmp_path):
    command = TRAIN + ["--config", TINY, "--workdir", tmp_path / "run"]
    # Process 0 of 2 alone, and (in another job) process 1 of 2 without its coordinator.
    without_1 = start_processes(command, 2, tmp_path / "a", only=[0], BIGJAX_INIT_TIMEOUT="3")
    without_0 = start_processes(command, 2, tmp_path / "b", only=[1], BIGJAX_INIT_TIMEOUT="3")
    assert wait_for({**without_1, 1: without_0[1]}, timeout=120) == {0: 1, 1: 1}
    assert "error (process 0 of 2): the job did not form within BIGJAX_INIT_TIMEOUT=3s: process 1 did not join" in log(
        tmp_path / "a", 0
    )
    assert "error (process 1 of 2): the job did not form within BIGJAX_INIT_TIMEOUT=3s: process 0 (the coordinator" in (
        log(tmp_path / "b", 1)
    )


def test_a_job_takes_its_workdir_lock_once_and_is_refused_as_one(tmp_path):
    """Process 0 holds the lock for the job (the tests above run two processes on one workdir); a workdir held by
    a live trainer elsewhere stops every process of a new job, before any of them touches it."""
    run, logs = tmp_path / "run", tmp_path / "logs"
    run.mkdir()
    now = time.time()
    held = dict(host="other-host", pid=4242, machine="another-boot/pid:[1]", since=now, heartbeat=now, token="x")
    (run / "lock.json").write_text(json.dumps(held))
    returncodes = wait_for(start_processes(TRAIN + ["--config", TINY, "--workdir", run], 2, logs), timeout=120)
    assert returncodes == {0: 2, 1: 2}
    assert f"error (process 0 of 2): {run} is in use by another trainer: pid 4242 on host other-host" in log(logs, 0)
    assert f"error (process 1 of 2): {run} is in use by another trainer (process 0 says by whom)" in log(logs, 1)
    assert sorted(p.name for p in run.iterdir()) == ["lock.json"]
