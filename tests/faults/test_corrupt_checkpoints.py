"""Corrupt or partial checkpoints: detected at restore, reported by step and path, moved aside (never deleted),
and the previous good one restored; with none usable left, a clear error unless --fresh."""

import shutil

import pytest
from conftest import TINY
from harness import delete_the_array_files, final_state, same_arrays, set_aside, truncate_the_array_files

from bigjax.run import checkpoint, lock, train


def delete_the_array_metadata(step_dir):
    (step_dir / "params" / "_METADATA").unlink()
    return lambda moved: not (moved / "params" / "_METADATA").exists()


def delete_the_commit_marker(step_dir):
    (step_dir / checkpoint.COMMIT_MARKER).unlink()
    return lambda moved: not (moved / checkpoint.COMMIT_MARKER).exists() and (moved / "params").is_dir()


def make_it_uncommitted(step_dir):
    """What a kill during the async write leaves: Orbax's temporary directory, never renamed."""
    step_dir.rename(step_dir.with_name(step_dir.name + checkpoint.TMP_SUFFIX))
    return lambda moved: (moved / "params").is_dir()


@pytest.fixture(scope="module")
def config():
    from bigjax import config as config_lib

    return config_lib.load(TINY, ["config.log_every=1", "config.checkpoint_every=1", "config.keep_checkpoints=8"])


@pytest.fixture(scope="module")
def good_run(config, tmp_path_factory):
    """8 steps, a checkpoint after each."""
    workdir = tmp_path_factory.mktemp("good")
    train.train(config, workdir)
    assert checkpoint.committed_steps(workdir) == [1, 2, 3, 4, 5, 6, 7, 8]
    return workdir


DAMAGE = {  # step -> (what is done to it, how it is set aside)
    8: (make_it_uncommitted, "uncommitted"),
    7: (delete_the_commit_marker, "unmarked"),
    6: (truncate_the_array_files, "unreadable"),
    5: (delete_the_array_files, "unreadable"),
    4: (delete_the_array_metadata, "unreadable"),
}


def test_bad_newest_checkpoints_are_set_aside_and_the_newest_good_one_resumed(config, good_run, tmp_path, capsys):
    workdir = tmp_path / "run"
    shutil.copytree(good_run, workdir)
    still_damaged = {step: corrupt(workdir / "checkpoints" / str(step)) for step, (corrupt, _) in DAMAGE.items()}
    capsys.readouterr()

    summary = train.train(config, workdir)

    out = capsys.readouterr().out
    assert summary.status == "finished" and summary.step == 8
    for step in DAMAGE:
        assert f"checkpoint {step} at {workdir.absolute() / 'checkpoints' / str(step)}" in out  # by step and path
    assert "resumed from step 3" in out
    # Moved aside as they were, for the user to inspect, with the reason beside each: nothing deleted or repaired.
    assert set_aside(workdir, "uncommitted") == [8] and set_aside(workdir, "unmarked") == [7]
    assert set_aside(workdir, "unreadable") == [4, 5, 6]
    for moved in (p for p in (workdir / "quarantine").iterdir() if p.is_dir()):
        step = int(moved.name.split(".")[0])
        assert still_damaged[step](moved), moved
        assert moved.with_name(moved.name + ".txt").read_text().startswith(f"checkpoint {step} at ")
    # Steps 4-8 were saved again without colliding with the bad ones, and keep-N kept every good checkpoint.
    assert checkpoint.committed_steps(workdir) == [1, 2, 3, 4, 5, 6, 7, 8]
    # Redoing steps 4-8 from the newest good checkpoint ends exactly where the undamaged run ended.
    assert same_arrays(final_state(workdir, 8), final_state(good_run, 8))


def test_with_no_usable_checkpoint_left_the_run_stops_unless_told_to_start_fresh(config, good_run, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(good_run, workdir)
    for step in checkpoint.committed_steps(workdir):
        delete_the_array_files(workdir / "checkpoints" / str(step))

    with pytest.raises(train.TrainingError, match=r"no usable checkpoint is left .* --fresh"):
        train.train(config, workdir)
    assert set_aside(workdir, "unreadable") == [1, 2, 3, 4, 5, 6, 7, 8]  # all kept for inspection
    assert checkpoint.committed_steps(workdir) == []

    # Still refused on the next try: the history is in the quarantine, not forgotten.
    with pytest.raises(train.TrainingError, match="no usable checkpoint"):
        train.train(config, workdir)

    summary = train.train(config, workdir, fresh=True)
    assert summary.status == "finished" and summary.step == 8
    assert same_arrays(final_state(workdir, 8), final_state(good_run, 8))  # a fresh start is the same run again
    assert set_aside(workdir, "unreadable") == [1, 2, 3, 4, 5, 6, 7, 8]


def test_fresh_is_refused_when_a_usable_checkpoint_exists(config, good_run, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(good_run, workdir)
    with pytest.raises(train.TrainingError, match="has one at step 8; drop --fresh"):
        train.train(config, workdir, fresh=True)
    assert checkpoint.committed_steps(workdir) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert not (workdir / "quarantine").exists()


def test_a_run_killed_before_its_first_checkpoint_just_starts(config, tmp_path):
    """No checkpoint was ever committed: starting from step 0 loses nothing, so no --fresh is needed."""
    workdir = tmp_path / "run"
    (workdir / "checkpoints" / ("2" + checkpoint.TMP_SUFFIX)).mkdir(parents=True)  # a first save, killed
    (workdir / "metrics.jsonl").write_text('{"step": 1, "loss": 5.5}\n')
    assert train.train(config, workdir, stop_at_step=2).step == 2
    assert set_aside(workdir, "uncommitted") == [2]
    assert checkpoint.committed_steps(workdir) == [1, 2]


def test_a_workdir_whose_checkpoints_all_lost_their_commit_marker_is_not_started_over(config, good_run, tmp_path):
    """They were committed once (only a committed step is renamed to STEP/), so a run was lost: say so."""
    workdir = tmp_path / "run"
    shutil.copytree(good_run, workdir)
    for step in checkpoint.committed_steps(workdir):
        delete_the_commit_marker(workdir / "checkpoints" / str(step))

    with pytest.raises(train.TrainingError, match=r"no usable checkpoint is left .* --fresh"):
        train.train(config, workdir)
    assert set_aside(workdir, "unmarked") == [1, 2, 3, 4, 5, 6, 7, 8]


def test_a_truncated_checkpoint_is_one_line_on_the_console_with_the_details_in_the_log(cli, good_run, tmp_path):
    """The line that reports it stands alone: the tracebacks Orbax and TensorStore log go to WORKDIR/logs."""
    workdir = tmp_path / "run"
    shutil.copytree(good_run, workdir)
    truncate_the_array_files(workdir / "checkpoints" / "8")
    result = cli("train", "--config", TINY, "--workdir", workdir, "--config.log_every=1", "--stop-at-step", "8")
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    assert f"checkpoint 8 at {workdir / 'checkpoints' / '8'} cannot be read" in result.stdout
    assert "resumed from step 7" in result.stdout


def files_of(directory) -> dict:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("sibling", ["none", "empty", "partly written"])
def test_a_save_over_a_committed_checkpoint_is_refused_and_leaves_it_untouched(config, good_run, tmp_path, sibling):
    """Orbax's save deletes a step directory that exists: bigjax refuses the save of a step already committed,
    whatever lies beside it (no temporary directory of that step, an empty one, one half written), touching
    neither."""
    import jax.numpy as jnp

    from bigjax.run import state as state_lib

    workdir = tmp_path / "run"
    shutil.copytree(good_run, workdir)
    committed = workdir / "checkpoints" / "8"
    temporary = committed.with_name("8" + checkpoint.TMP_SUFFIX)
    if sibling != "none":
        temporary.mkdir()
    if sibling == "partly written":
        shutil.copytree(committed / "params", temporary / "params")
    before = files_of(committed), files_of(temporary)

    state = state_lib.TrainState(step=jnp.int32(8), params={"w": jnp.zeros(2)}, opt_state={}, model_state={})
    with lock.held(workdir) as fence:
        saves = checkpoint.writer(workdir, 8, fence)
        with pytest.raises(checkpoint.CheckpointError, match="checkpoint 8 exists already"):
            saves.save(8, state, {}, {}, config)
        saves.finish()
    assert (files_of(committed), files_of(temporary)) == before
    assert checkpoint.committed_steps(workdir) == [1, 2, 3, 4, 5, 6, 7, 8]
