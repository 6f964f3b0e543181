"""Multi-host for real: two local processes with 4 CPU devices each form one 8-device job.

Each process reads only its half of every batch; the global batch, and so the training, is the same as in
one process with 8 devices. A run checkpointed by two processes resumes in one.
"""

import os
import socket
import subprocess
import sys

import numpy as np
from conftest import REPO, TINY

from bigjax import metrics


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_in_processes(num_processes: int, *args, timeout=300):
    port = free_port()
    processes = []
    for index in range(num_processes):
        env = dict(os.environ)
        env.update(
            XLA_FLAGS=f"--xla_force_host_platform_device_count={8 // num_processes}",
            JAX_PLATFORMS="cpu",
            JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
            JAX_NUM_PROCESSES=str(num_processes),
            JAX_PROCESS_ID=str(index),
            BIGJAX_INIT_TIMEOUT="60",  # a dead peer fails the others instead of hanging them
        )
        processes.append(
            subprocess.Popen(
                [sys.executable, "-m", "bigjax.cli", "train", *map(str, args)],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    try:
        outputs = [p.communicate(timeout=timeout) for p in processes]
    finally:
        for p in processes:
            p.kill()
    for index, (p, (_, err)) in enumerate(zip(processes, outputs, strict=True)):
        assert p.returncode == 0, f"process {index} failed:\n{err[-3000:]}"
    return [out for out, _ in outputs]


def losses(workdir):
    return {row["step"]: row["loss"] for row in metrics.read_jsonl(workdir / "metrics.jsonl")}


def test_two_processes_train_like_one_and_resume_in_one(cli, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    cli("train", "--config", TINY, "--workdir", one, "--config.log_every=1")

    outputs = train_in_processes(2, "--config", TINY, "--workdir", two, "--config.log_every=1", "--stop-at-step", "4")
    assert "mesh data=8" in outputs[0] and "loss=" in outputs[0]
    assert "mesh" not in outputs[1] and "loss=" not in outputs[1]  # only process 0 logs
    assert sorted(losses(two)) == [1, 2, 3, 4]

    cli("train", "--config", TINY, "--workdir", two, "--config.log_every=1")  # resumed by one process
    steps = range(1, 9)
    np.testing.assert_allclose([losses(two)[s] for s in steps], [losses(one)[s] for s in steps], rtol=1e-5)
