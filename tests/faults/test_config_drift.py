"""Config drift on resume: a changed model shape, vocabulary, optimizer, or anything else that changes the
saved state's layout is refused with the differences listed, nothing touched; harmless changes (total_steps,
log_every, eval_every) are allowed and logged."""

import json
import shutil

import pytest
from conftest import TINY

from bigjax.run import checkpoint, train


@pytest.fixture(scope="module")
def half_run(tmp_path_factory):
    """The tiny run stopped at step 4 (of 8), with a checkpoint there."""
    from bigjax import config as config_lib

    workdir = tmp_path_factory.mktemp("half")
    train.train(config_lib.load(TINY), workdir, stop_at_step=4)
    return workdir


@pytest.fixture
def workdir(half_run, tmp_path):
    shutil.copytree(half_run, tmp_path / "run")
    return tmp_path / "run"


def untouched(workdir) -> bool:
    """Nothing was set aside, the checkpoint is still there, and config.json still describes it."""
    config_json = json.loads((workdir / "config.json").read_text())
    return (
        checkpoint.committed_steps(workdir) == [4]
        and not (workdir / "quarantine").exists()
        and config_json["model"]["vocab_size"] == 260
        and config_json["optim"]["name"] == "adamw"
        and config_json["optim"]["clip"] == 1.0
    )


@pytest.mark.parametrize(
    "override, listed",
    [
        ("config.model.vocab_size=512", "model.vocab_size: 260 -> 512"),
        ("config.model.num_layers=3", "model.num_layers: 2 -> 3"),
        ("config.optim.name=sgd", "optim.name: 'adamw' -> 'sgd'"),
        ("config.data.seq_len=16", "data.seq_len: 32 -> 16"),
    ],
)
def test_a_changed_model_vocabulary_or_optimizer_is_refused(override, listed, workdir, tiny_config):
    with pytest.raises(checkpoint.CheckpointError, match="cannot resume from checkpoint 4") as error:
        train.train(tiny_config("", override), workdir)
    assert listed in str(error.value)
    assert untouched(workdir)


def test_a_change_that_alters_the_optimizer_state_is_refused_with_the_arrays_that_differ(workdir, tiny_config):
    # Not a listed key, but turning clipping off removes a transformation and its state from the optimizer.
    with pytest.raises(checkpoint.CheckpointError, match="its arrays do not fit") as error:
        train.train(tiny_config("", "config.optim.clip=0"), workdir)
    message = str(error.value)
    assert "opt_state: not in the checkpoint: 0.0.count" in message and "optim.clip: 1.0 -> 0.0" in message
    assert untouched(workdir)


def test_harmless_changes_are_allowed_and_logged(workdir, tiny_config, capsys):
    summary = train.train(tiny_config("steps=10", "config.log_every=1", "config.eval_every=10"), workdir)

    out = capsys.readouterr().out
    assert summary.status == "finished" and summary.step == 10
    assert "resumed from step 4" in out
    for change in ("total_steps: 8 -> 10", "log_every: 2 -> 1", "eval_every: 0 -> 10"):
        assert f"resuming with a changed config: {change}" in out
    assert json.loads((workdir / "config.json").read_text())["total_steps"] == 10
