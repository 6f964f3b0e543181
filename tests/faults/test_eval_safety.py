"""The eval job reads only committed checkpoints, and outlives the trainer being stopped, killed mid-write,
finding a corrupt checkpoint and restarting, while it follows the run. It never waits for what cannot come (--once
with nothing readable, a total_steps lowered below the newest checkpoint), and reads a workdir with the model that
wrote it (a quantized one under the float experiment)."""

import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, TINY
from harness import (
    Kill,
    committed_steps,
    environment,
    number_after,
    run_attempt,
    train_command,
    truncate_the_array_files,
)

from bigjax import config as config_lib
from bigjax.compress import quantize
from bigjax.ops import metrics
from bigjax.run import checkpoint, evaluate, train


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny run trained to step 8 (checkpoints 4 and 8): each test here evaluates a copy."""
    workdir = tmp_path_factory.mktemp("trained") / "run"
    train.train(config_lib.load(TINY), workdir)
    return workdir


def test_eval_reads_only_committed_checkpoints(trained, tmp_path, tiny_config):
    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir)  # checkpoints 4 and 8
    checkpoints = workdir / "checkpoints"
    shutil.copytree(checkpoints / "8", checkpoints / ("12" + checkpoint.TMP_SUFFIX))  # a save still being written
    shutil.copytree(checkpoints / "8", checkpoints / "16")
    (checkpoints / "16" / checkpoint.COMMIT_MARKER).unlink()  # a step directory never committed

    assert checkpoint.committed_steps(workdir) == [4, 8]
    assert evaluate.run_eval_job(tiny_config(), workdir, once=True)["step"] == 8


def test_eval_job_survives_the_trainer_stopping_dying_and_restarting_under_it(cli_in_process, tmp_path):
    """The eval job and the trainer killed mid-write are processes; the trainer's restart runs the same command line
    in this one, beside the eval job."""
    workdir = tmp_path / "run"
    env = environment(tmp_path / "compile-cache")
    command = train_command(workdir, 12, "--config.keep_checkpoints=100")  # a checkpoint every 3 steps
    # Stopped at 6 before the eval job starts: trained in this process, with the config each attempt below runs.
    overrides = [arg.removeprefix("--") for arg in command[command.index("--workdir") + 2 :]]
    stopped = train.train(config_lib.load(command[command.index("--config") + 1], overrides), workdir, stop_at_step=6)
    assert stopped.step == 6 and committed_steps(workdir) == [3, 6]
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
        finished = cli_in_process(*command[command.index("train") :])
        assert number_after("resumed from step ", finished.stdout) == max(killed.committed_after), finished.stdout
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


# --------------------------------------------------------------------------------------------------
# The eval job never waits for a step that cannot come


@pytest.fixture
def never_waiting(monkeypatch):
    """The eval job with its clock's sleep refused: a job that would wait for a checkpoint fails the test at once."""

    class Clock:
        monotonic = staticmethod(time.monotonic)

        @staticmethod
        def sleep(seconds):
            raise AssertionError(f"the eval job waited ({seconds} s) for a checkpoint that will not come")

    monkeypatch.setattr(evaluate, "time", Clock)


def test_once_without_a_committed_checkpoint_says_there_is_nothing_to_evaluate(tmp_path, tiny_config, never_waiting):
    (tmp_path / "run" / "checkpoints" / ("4" + checkpoint.TMP_SUFFIX)).mkdir(parents=True)  # a save not committed
    with pytest.raises(evaluate.EvalError, match="nothing to evaluate: no committed checkpoint in .*--once"):
        evaluate.run_eval_job(tiny_config(), tmp_path / "run", once=True)
    assert not (tmp_path / "run" / "eval").exists()


def test_once_with_no_readable_checkpoint_is_one_error(trained, tmp_path, tiny_config, never_waiting):
    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir)
    for step in (4, 8):
        truncate_the_array_files(workdir / "checkpoints" / str(step))
    with pytest.raises(evaluate.EvalError, match="no committed checkpoint of .* could be read: checkpoint 8 at .*"):
        evaluate.run_eval_job(tiny_config(), workdir, once=True)


def test_a_quantized_workdir_is_evaluated_with_its_own_model_under_the_float_experiment(
    trained, tmp_path, tiny_config, never_waiting, capsys
):
    """`bigjax eval --config EXP --workdir Q --once` on what `bigjax quantize` wrote: Q's int8 checkpoint is read only
    by Q's own model (config.json), which wins over the experiment file's; the rest (data, batches) is EXP's."""
    quantized_run = tmp_path / "int8"
    quantize.quantize(trained, quantized_run)
    with_experiment = evaluate.run_eval_job(tiny_config(), quantized_run, once=True)
    said = capsys.readouterr().out
    assert "quant.bits: 0 -> 8" in said and f"the model of {quantized_run}/config.json" in said
    with_its_own = evaluate.run_eval_job(config_lib.load_saved(quantized_run), quantized_run, once=True)
    assert with_experiment == with_its_own and with_experiment["step"] == 8


def test_the_job_ends_when_total_steps_was_lowered_below_the_newest_checkpoint(
    trained, tmp_path, tiny_config, never_waiting
):
    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir)
    assert evaluate.run_eval_job(tiny_config("steps=6"), workdir)["step"] == 8  # step 6 will never be saved
    assert [row["step"] for row in metrics.read_jsonl(workdir / "eval" / "metrics.jsonl")] == [4, 8]
