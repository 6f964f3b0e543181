"""Kill at any moment: SIGTERM and SIGKILL at pseudo-random steps and mid-write, restart until done, compare.

A restarted run must end bitwise where an uninterrupted one ends (parameters, optimizer state, the loss of
every step), SIGTERM must save and exit 0, SIGKILL must lose only the steps since the newest committed
checkpoint, and a checkpoint killed mid-write must be set aside, never resumed from. BIGJAX_KILL_SEEDS=0,1,2
runs more seeds; `python tests/faults/harness.py --seeds N` runs many more cycles by hand.
"""

import os
import signal

import harness
import pytest

SEEDS = [int(seed) for seed in os.environ.get("BIGJAX_KILL_SEEDS", "0").split(",")]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return harness.environment(tmp_path_factory.mktemp("compile-cache"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run, trained in this process (the same 8 devices and XLA flags as the trainers the test
    kills): nothing in it is about processes, and a process of its own would cost its start-up."""
    from bigjax import config as config_lib
    from bigjax.run import train

    workdir = tmp_path_factory.mktemp("uninterrupted")
    command = harness.train_command(workdir)  # what each attempt runs, read back as its config and overrides
    overrides = [arg.removeprefix("--") for arg in command[command.index("--workdir") + 2 :]]
    train.train(config_lib.load(command[command.index("--config") + 1], overrides), workdir)
    return workdir


@pytest.mark.parametrize("seed", SEEDS)
def test_killed_and_restarted_run_matches_an_uninterrupted_one(seed, env, reference, tmp_path):
    attempts = harness.run_until_finished(tmp_path, harness.plan_kills(seed, count=4), env)
    report = "\n".join(map(str, attempts))

    problems = harness.verify(attempts, tmp_path, reference)
    assert not problems, "\n".join(problems) + "\n" + report
    # All four kinds of kill really happened, including both mid-write ones.
    kinds = {(a.kill.signal, a.kill.at) for a in attempts if a.sent}
    assert kinds == {(s, at) for s in (signal.SIGTERM, signal.SIGKILL) for at in ("step", "write")}, report
    assert all(a.interrupted_write is not None for a in attempts if a.sent and a.kill.at == "write"), report
    # The SIGKILL mid-write left a half-written checkpoint, which was set aside rather than resumed from.
    assert harness.set_aside(tmp_path, "uncommitted"), report
