"""Run(workdir): the read side of a workdir. Its one step picker reads committed checkpoints only."""

import pytest

from bigjax.run import checkpoint
from bigjax.run.workdir import Run


def saved_steps(workdir, committed=(), uncommitted=()):
    for step in (*committed, *uncommitted):
        (workdir / "checkpoints" / str(step)).mkdir(parents=True)
    for step in committed:
        (workdir / "checkpoints" / str(step) / checkpoint.COMMIT_MARKER).write_text("")
    return Run(workdir)


def test_the_step_picker_takes_the_newest_committed_step_or_the_one_named(tmp_path):
    run = saved_steps(tmp_path, committed=(4, 8), uncommitted=(12,))
    assert run.committed_steps() == [4, 8]
    assert run.committed_step() == 8
    assert run.committed_step(4) == 4
    with pytest.raises(checkpoint.CheckpointError, match=r"checkpoint 12 is not a committed .*committed: 4, 8"):
        run.committed_step(12)


def test_the_step_picker_refuses_a_run_without_a_committed_checkpoint(tmp_path):
    run = saved_steps(tmp_path, uncommitted=(4,))
    with pytest.raises(checkpoint.CheckpointError, match=r"no committed checkpoint in .*checkpoints; train first"):
        run.committed_step()


def test_a_run_names_its_files_and_is_normalised_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = Run("relative")
    assert run.path == tmp_path / "relative" and Run(run).path == run.path
    assert run.config_file == tmp_path / "relative" / "config.json"
    assert run.checkpoints == tmp_path / "relative" / "checkpoints"
    assert run.step_dir(8) == tmp_path / "relative" / "checkpoints" / "8"
    assert run.metrics_file == tmp_path / "relative" / "metrics.jsonl"
    assert run.eval_metrics_file == tmp_path / "relative" / "eval" / "metrics.jsonl"
    assert run.lock_file == tmp_path / "relative" / "lock.json"
