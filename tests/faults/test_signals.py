"""SIGTERM and Ctrl-C at every stage of a run: during start-up and compile (nothing to save: say so, exit 0), in
the loop (finish the step, save, exit 0), and a second Ctrl-C (stop at once, exit 130, nothing committed lost).

Each signal is sent by the trainer to itself from a wrapped bigjax function, so it arrives at exactly the stage
under test, whatever the machine's speed.
"""

import shutil
import subprocess
import sys

import pytest
from conftest import REPO, TINY
from harness import committed_steps, environment, uncommitted_steps

# Runs `bigjax ARGS` after wrapping MODULE:NAME (NAME may be CLASS.METHOD) so that its call number CALL (from 1)
# first sends this process the signals SIGNALS (comma-separated names): the stage the test is about.
SIGNALLING_TRAINER = """
import importlib, os, signal, sys, threading, time
from bigjax.run import signals
where, call, names = sys.argv[1:4]
module_name, _, path = where.partition(":")
owner = importlib.import_module(module_name)
*parents, name = path.split(".")
for parent in parents:
    owner = getattr(owner, parent)
function = getattr(owner, name)
calls = []

def signalling(*args, **kwargs):
    calls.append(1)
    if len(calls) == int(call):
        for signal_name in names.split(","):
            os.kill(os.getpid(), getattr(signal, signal_name))
            # Sent from another thread, two signals before the main thread runs its handler would be one.
            while threading.current_thread() is not threading.main_thread() and not signals._current.signum:
                time.sleep(0.001)
    return function(*args, **kwargs)

setattr(owner, name, signalling)
from bigjax import cli
sys.exit(cli.main(sys.argv[4:]))
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return environment(tmp_path_factory.mktemp("compile-cache"))


def train_args(workdir, steps=8):
    return ["train", "--config", f"{TINY}:steps={steps}", "--workdir", workdir, "--config.log_every=1"]


@pytest.fixture(scope="module")
def stopped_at_step_4(tmp_path_factory):
    """`train_args` stopped at step 4 (checkpoint 4), trained once, in this process (the same 8 devices and XLA flags
    as the signalled trainers; what is tested is those, started on a copy of it each)."""
    from conftest import cli_main

    workdir = tmp_path_factory.mktemp("stopped") / "run"
    assert cli_main(*train_args(workdir), "--stop-at-step", "4") == 0
    return workdir


def run_signalled(where: str, call: int, signals: str, args, env) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", SIGNALLING_TRAINER, where, str(call), signals, *map(str, args)]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
def test_a_signal_while_the_config_is_read_stops_with_nothing_to_save_and_exit_zero(signal_name, env, tmp_path):
    result = run_signalled("bigjax.config:load", 1, signal_name, train_args(tmp_path / "run"), env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"stopped by {signal_name} during start-up, at step 0: nothing new to save" in result.stdout
    assert committed_steps(tmp_path / "run") == []


def test_sigterm_during_the_compile_of_a_resumed_run_keeps_its_checkpoint_and_exits_zero(
    env, tmp_path, stopped_at_step_4
):
    workdir = tmp_path / "run"
    shutil.copytree(stopped_at_step_4, workdir)
    result = run_signalled("bigjax.run.step:compile_train_step", 1, "SIGTERM", train_args(workdir), env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "stopped by SIGTERM during start-up, at step 4: nothing new to save" in result.stdout
    assert "\ngoodput: " in result.stdout  # where the time went, even with nothing trained
    assert committed_steps(workdir) == [4] and not uncommitted_steps(workdir)


def test_ctrl_c_finishes_the_step_saves_and_exits_zero_like_sigterm(env, tmp_path):
    workdir = tmp_path / "run"
    result = run_signalled("bigjax.run.train:log_metrics", 3, "SIGINT", train_args(workdir), env)  # at step 3
    assert result.returncode == 0, result.stderr[-3000:]
    assert "stopped by SIGINT at step 3 with a checkpoint" in result.stdout
    assert "\ngoodput: " in result.stdout
    assert "Ctrl-C again to stop at once" in result.stderr
    assert committed_steps(workdir) == [3]


# Orbax's background thread that writes a checkpoint's arrays and commits it.
ASYNC_SAVE = "orbax.checkpoint._src.checkpointers.async_checkpointer:_AsyncManager._thread_func"


@pytest.mark.parametrize("during", ["step", "save"])
def test_a_second_ctrl_c_stops_at_once_keeping_what_is_committed(during, env, tmp_path, stopped_at_step_4):
    workdir = tmp_path / "run"
    shutil.copytree(stopped_at_step_4, workdir)
    # At step 6 of the resumed run, or while the save of step 8 is being written.
    where = ASYNC_SAVE if during == "save" else "bigjax.run.train:log_metrics"
    result = run_signalled(where, 1 if during == "save" else 2, "SIGINT,SIGINT", train_args(workdir, 12), env)
    assert result.returncode == 130, result.stderr[-3000:]
    assert "interrupted: stopped at once; checkpoints already committed are kept" in result.stderr
    assert "Traceback" not in result.stderr
    assert committed_steps(workdir)[0] == 4  # a save cut short is never resumed from; a finished one may stay


def test_after_sigterm_one_ctrl_c_still_saves_and_a_second_stops_at_once(capsys):
    """In this process, with real signals: SIGTERM asks for a clean stop; a Ctrl-C after it asks the same (the step
    finishes and saves) and says that another one stops at once; the second Ctrl-C does (KeyboardInterrupt)."""
    import os
    import signal

    from bigjax.run import signals

    request = signals.StopRequest().install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert request.requested and request.name == "SIGTERM"
        os.kill(os.getpid(), signal.SIGINT)
        assert request.requested and request.name == "SIGTERM"  # still the clean stop: save, then exit 0
        assert "Ctrl-C again to stop at once" in capsys.readouterr().err
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        request.uninstall()
