"""Vision models through the real train loop on the bundled digits: the loss falls and accuracy rises; a run with
BatchNorm resumes bit for bit, statistics included, and resumes onto another mesh.

Configs come from the experiment files (as the CLI loads them), shrunk by overrides.
"""

import jax
import numpy as np
import pytest
from conftest import REPO, copy_run, init_params
from test_vision import vision_sum_lengths
from tolerance import assert_close_after_reordering, assert_sgd_params_close_after_reordering, float32_sum_tolerance

from bigjax import config as config_lib
from bigjax.ops import metrics
from bigjax.run import checkpoint, train
from bigjax.run.setup import make_setup
from bigjax.tasks import make_task

CNN_DIGITS = str(REPO / "experiments" / "cnn_digits.py")
VIT_DIGITS = str(REPO / "experiments" / "vit_digits.py")


def digits_config(experiment: str, arg: str, *overrides: str):
    return config_lib.load(f"{experiment}:{arg}", ["config.log_every=1", *overrides])


def rows(workdir, key):
    return {row["step"]: row[key] for row in metrics.read_jsonl(workdir / "metrics.jsonl") if key in row}


def test_the_cnn_loss_falls_and_accuracy_rises_on_digits(tmp_path):
    shrunk = ["config.model.features=(16, 32)", "config.model.hidden_dim=64"]
    config = digits_config(
        CNN_DIGITS, "steps=120,batch=32", *shrunk, "config.eval_every=120", "config.checkpoint_every=0"
    )
    train.train(config, tmp_path)
    losses = rows(tmp_path, "loss")
    assert np.mean([losses[s] for s in range(1, 11)]) > 2.0  # about ln(10) = 2.30 at the start
    assert np.mean([losses[s] for s in range(111, 121)]) < 1.5
    assert rows(tmp_path, "eval/accuracy")[120] > 0.5  # 10 classes: chance is 0.1


def test_the_vit_loss_falls_and_accuracy_rises_on_digits(tmp_path):
    # A Transformer learns 8x8 digits more slowly than the CNN (vit_digits reaches 87% in 1500 steps): a small
    # one with 4x4 patches and average pooling, 150 steps, shows the learning without waiting for it.
    shrunk = ["config.optim.warmup_steps=10", "config.optim.lr=0.003", "config.model.dropout=0.0"]
    config = digits_config(
        VIT_DIGITS,
        "steps=150,batch=32,layers=2,d=32,patch=4,pooling=gap",
        *shrunk,
        "config.task.label_smoothing=0.0",
        "config.eval_every=150",
        "config.checkpoint_every=0",
    )
    train.train(config, tmp_path)
    losses = rows(tmp_path, "loss")
    assert np.mean([losses[s] for s in range(1, 11)]) > 2.2  # about ln(10) = 2.30 at the start
    assert np.mean([losses[s] for s in range(141, 151)]) < 2.05
    assert rows(tmp_path, "eval/accuracy")[150] > 0.25  # 10 classes: chance is 0.1


@pytest.fixture(scope="module")
def batchnorm_run(tmp_path_factory):
    """8 uninterrupted steps of the CNN with BatchNorm on the 8-device data-parallel mesh."""
    config = digits_config(
        CNN_DIGITS,
        "steps=8,batch=16,norm=batchnorm",
        "config.model.features=(8, 16)",
        "config.model.hidden_dim=32",
        "config.checkpoint_every=4",
        "config.eval_every=0",
        # SGD without clipping: its update is linear in the gradient, so a resume onto another mesh can be held to
        # a bound (see test_sharding.test_train_steps_match_on_every_mesh).
        "config.optim.name=sgd",
        "config.optim.clip=0",
    )
    workdir = tmp_path_factory.mktemp("straight")
    assert train.train(config, workdir).step == 8
    return config, workdir


def saved_variables(workdir, config):
    """The newest checkpoint's parameters and BatchNorm statistics, restored onto one device as numpy."""
    config = config.copy_and_resolve_references()
    config.mesh.update(dict(data=1, fsdp=1, tensor=1))
    target = make_setup(config, jax.devices()[:1]).variables_target()
    mngr = checkpoint.manager(workdir, read_only=True)
    return jax.device_get(checkpoint.restore_variables(mngr, mngr.latest_step(), target))


@pytest.fixture(scope="module")
def stopped_run(batchnorm_run, tmp_path_factory):
    """The same run stopped at step 4 (its checkpoint 4): the start of both resumes below. Copy it (copy_run)."""
    config, _ = batchnorm_run
    workdir = tmp_path_factory.mktemp("stopped")
    assert train.train(config, workdir, stop_at_step=4).status == "preempted"
    return workdir


def test_batchnorm_run_resumes_bit_exact_with_its_statistics(batchnorm_run, stopped_run, tmp_path):
    config, straight = batchnorm_run
    tmp_path = copy_run(stopped_run, tmp_path)
    assert train.train(config, tmp_path).step == 8

    assert rows(tmp_path, "loss") == rows(straight, "loss")  # every step, bitwise
    resumed, reference = saved_variables(tmp_path, config), saved_variables(straight, config)
    assert resumed.keys() == {"params", "batch_stats"}
    jax.tree.map(np.testing.assert_array_equal, resumed, reference)
    # The statistics really were trained (BatchNorm starts at mean 0, variance 1).
    assert np.abs(reference["batch_stats"]["norm1"]["mean"]).max() > 1e-3


def test_batchnorm_run_resumes_onto_another_mesh(batchnorm_run, stopped_run, tmp_path):
    config, straight = batchnorm_run
    tmp_path = copy_run(stopped_run, tmp_path)  # stopped at 4 on data=8
    resharded = config.copy_and_resolve_references()
    resharded.mesh.update(dict(data=2, fsdp=2, tensor=2))
    train.train(resharded, tmp_path)

    # Steps 5-8 add their sums in another order: the losses, updates and statistics within the bounds of those sums.
    tolerance = float32_sum_tolerance(*vision_sum_lengths(config))
    np.testing.assert_allclose(
        [rows(tmp_path, "loss")[s] for s in range(1, 9)],
        [rows(straight, "loss")[s] for s in range(1, 9)],
        rtol=tolerance,
    )
    resumed, reference = saved_variables(tmp_path, config), saved_variables(straight, config)
    initial = jax.device_get(init_params(make_task(config), config.seed))
    assert_sgd_params_close_after_reordering(resumed["params"], reference["params"], initial, tolerance, 8, "at 8")
    assert_close_after_reordering(resumed["batch_stats"], reference["batch_stats"], tolerance, "statistics at 8")


def test_transfer_loads_the_batch_statistics_with_the_backbone_and_keeps_both_fixed(batchnorm_run, tmp_path):
    """resnet50_transfer's recipe at toy size: init_from a BatchNorm run, all but the head frozen, statistics too."""
    config, source = batchnorm_run
    transfer = config.copy_and_resolve_references()
    transfer.init_from.update(dict(workdir=str(source), exclude="^head/"))
    transfer.freeze = "^(?!head/)"
    transfer.model.freeze_batch_stats = True
    transfer.total_steps = 4
    train.train(transfer, tmp_path)

    before, after = saved_variables(source, config), saved_variables(tmp_path, transfer)
    jax.tree.map(np.testing.assert_array_equal, after["batch_stats"], before["batch_stats"])
    backbone = {name for name in after["params"] if name != "head"}
    assert backbone and all(
        np.array_equal(a, b)
        for name in backbone
        for a, b in zip(jax.tree.leaves(after["params"][name]), jax.tree.leaves(before["params"][name]), strict=True)
    )
    assert not np.array_equal(after["params"]["head"]["kernel"], before["params"]["head"]["kernel"])
