"""NaN / Inf from a bad batch: the run stops naming the step and the metric, the last good checkpoint intact;
with nan_policy="skip" the jitted step skips the update instead, the skips are counted (across restarts) and
logged, and the run stops once there are more than max_nan_skips."""

import math

import jax
import numpy as np
import pytest
from conftest import TINY
from harness import final_state, last_row_per_step, same_arrays

from bigjax import data
from bigjax.run import checkpoint, train


class PoisonedBatches:
    """The real training batches, except that those for the training steps in `bad_steps` carry a NaN weight,
    which makes that step's loss and gradients NaN (as a corrupt example or a tokenizer bug would)."""

    def __init__(self, real, bad_steps):
        self.real, self.bad_steps = real, set(bad_steps)

    def __iter__(self):
        return self

    def __next__(self):
        step = self.real.step + 1  # the training step this batch is for
        batch = next(self.real)
        if step in self.bad_steps:
            batch = dict(batch, weights=batch["weights"].copy())
            batch["weights"][0, 0] = np.nan
        return batch

    def get_state(self):
        return self.real.get_state()

    def set_state(self, state):
        self.real.set_state(state)


@pytest.fixture
def poison(monkeypatch):
    """poison(3, 5): the batches of training steps 3 and 5 are bad, in every train() call of the test."""
    real = data.train_batches

    def poison_steps(*bad_steps):
        poisoned = lambda config, *args: PoisonedBatches(real(config, *args), bad_steps)
        monkeypatch.setattr(data, "train_batches", poisoned)

    return poison_steps


def load(*overrides):
    from bigjax import config as config_lib

    every_step = ["config.checkpoint_every=1", "config.keep_checkpoints=10", "config.log_every=1"]
    return config_lib.load(TINY, every_step + list(overrides))


def all_finite(tree) -> bool:
    return all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(tree))


def test_a_bad_batch_stops_the_run_naming_the_step_and_the_metric(poison, tmp_path):
    poison(3)
    with pytest.raises(train.TrainingError, match=r"loss is nan at step 3; stopping\. The last good checkpoint"):
        train.train(load("config.log_every=4"), tmp_path)  # step 3 is checked before its checkpoint, not at log
    assert checkpoint.committed_steps(tmp_path) == [1, 2]  # nothing at or after the bad step was saved
    assert all_finite(final_state(tmp_path, 2))


def test_skip_policy_skips_the_update_counts_it_and_keeps_the_count_across_a_restart(poison, tmp_path, capsys):
    poison(3, 6)
    config = load("config.nan_policy=skip", "config.max_nan_skips=2")
    assert train.train(config, tmp_path, stop_at_step=4).status == "preempted"
    summary = train.train(config, tmp_path)

    assert summary.status == "finished" and summary.step == 8
    out = capsys.readouterr().out
    assert "loss is nan at step 3: update skipped (1 of at most 2" in out
    assert "loss is nan at step 6: update skipped (2 of at most 2" in out
    rows = last_row_per_step(tmp_path)
    # Counted and logged; the count at the restart (step 4) came back from the checkpoint.
    assert [rows[step]["skipped_steps"] for step in range(1, 9)] == [0, 0, 1, 1, 1, 2, 2, 2]
    assert math.isnan(rows[3]["loss"]) and all(math.isfinite(rows[s]["loss"]) for s in (1, 2, 4, 5, 7, 8))
    # A skipped step leaves parameters and optimizer state exactly as they were; the next step trains on.
    assert same_arrays(final_state(tmp_path, 3), final_state(tmp_path, 2))
    assert same_arrays(final_state(tmp_path, 6), final_state(tmp_path, 5))
    assert not same_arrays(final_state(tmp_path, 4), final_state(tmp_path, 3))
    assert all_finite(final_state(tmp_path, 8))


def test_skip_policy_stops_once_more_steps_than_the_limit_were_skipped(poison, tmp_path):
    poison(3, 5)
    config = load("config.nan_policy=skip", "config.max_nan_skips=1")
    with pytest.raises(train.TrainingError, match=r"loss is nan at step 5: 2 non-finite steps skipped, more than"):
        train.train(config, tmp_path)
    assert checkpoint.committed_steps(tmp_path) == [1, 2, 3, 4]
    assert all_finite(final_state(tmp_path, 4))
