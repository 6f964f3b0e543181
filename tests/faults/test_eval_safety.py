"""The eval job reads only committed checkpoints, and outlives the trainer being stopped, killed mid-write,
finding a corrupt checkpoint and restarting, while it follows the run."""

import shutil
import signal
import subprocess
import sys
import time

from conftest import REPO, TINY
from harness import Kill, committed_steps, environment, run_attempt, train_command, truncate_the_array_files

from bigjax import checkpoint, evaluate, metrics, train


def test_eval_reads_only_committed_checkpoints(tmp_path, tiny_config):
    workdir = tmp_path / "run"
    train.train(tiny_config(), workdir)  # checkpoints 4 and 8
    checkpoints = workdir / "checkpoints"
    shutil.copytree(checkpoints / "8", checkpoints / ("12" + checkpoint.TMP_SUFFIX))  # a save still being written
    shutil.copytree(checkpoints / "8", checkpoints / "16")
    (checkpoints / "16" / checkpoint.COMMIT_MARKER).unlink()  # a step directory never committed

    assert checkpoint.committed_steps(workdir) == [4, 8]
    assert evaluate.run_eval_job(tiny_config(), workdir, once=True)["step"] == 8


def test_eval_job_survives_the_trainer_stopping_dying_and_restarting_under_it(tmp_path):
    workdir = tmp_path / "run"
    env = environment(tmp_path / "compile-cache")
    command = train_command(workdir, 12, "--config.keep_checkpoints=100")  # a checkpoint every 3 steps
    stopped = run_attempt(workdir, [*command, "--stop-at-step", "6"], None, env)
    assert stopped.returncode == 0 and committed_steps(workdir) == [3, 6]
    truncate_the_array_files(workdir / "checkpoints" / "6")

    eval_log = tmp_path / "eval.out"
    with open(eval_log, "w") as out:
        evaluator = subprocess.Popen(
            [sys.executable, "-m", "bigjax.cli", "eval", "--config", f"{TINY}:steps=12", "--workdir", str(workdir)]
            + ["--poll", "0.1", "--timeout", "300"],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.PIPE,
            text=True,
        )
    try:
        wait_for(lambda: "checkpoint 6 at" in eval_log.read_text(), evaluator)  # it found 6 unreadable: skipped
        # The trainer restarts: sets 6 aside, resumes from 3, and is killed while writing a checkpoint (6).
        killed = run_attempt(workdir, command, Kill(signal.SIGKILL, "write"), env)
        assert killed.sent and killed.interrupted_write is not None and killed.resumed_from == 3
        # Again: it sets the half-written checkpoint aside, resumes, and saves the rest up to 12.
        finished = run_attempt(workdir, command, None, env)
        assert finished.returncode == 0, finished.stderr[-3000:]
        assert finished.resumed_from == max(killed.committed_after)
        _, err = evaluator.communicate(timeout=300)
    finally:
        evaluator.kill()
    out = eval_log.read_text()
    assert evaluator.returncode == 0, err[-3000:]
    assert "cannot be read" in out and "validation at step 12" in out
    # Every committed checkpoint evaluated exactly once: 6 only once the trainer had written it again.
    evaluated = [row["step"] for row in metrics.read_jsonl(workdir / "eval" / "metrics.jsonl")]
    assert evaluated == committed_steps(workdir) == [3, 6, 9, 12]


def wait_for(condition, process, timeout=300):
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, process.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)
