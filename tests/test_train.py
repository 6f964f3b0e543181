"""The train loop: resume bit-for-bit, resume onto another mesh, gradient accumulation, the step's randomness,
NaN stop and skip, SIGTERM."""

import dataclasses
import json
import signal
import subprocess
import sys
import tempfile

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import test_sharding
import test_text_models
from conftest import REPO, TINY, copy_run, init_params, read_until
from tolerance import assert_sgd_params_close_after_reordering, float32_sum_tolerance, lm_sum_lengths, norm_atol

from bigjax.errors import UserError
from bigjax.ops import logs, metrics
from bigjax.parallel import mesh as mesh_lib
from bigjax.run import checkpoint, train
from bigjax.run import step as step_lib
from bigjax.run.setup import make_setup
from bigjax.tasks import make_task


def losses_by_step(workdir):
    return {row["step"]: row["loss"] for row in metrics.read_jsonl(workdir / "metrics.jsonl") if "loss" in row}


def final_params(workdir, config):
    """The newest checkpoint's parameters, restored onto one device as numpy."""
    config = config.copy_and_resolve_references()
    config.mesh.update(dict.fromkeys(mesh_lib.MESH_AXES, 1))
    target = make_setup(config, jax.devices()[:1]).variables_target()
    mngr = checkpoint.manager(workdir, read_only=True)
    return jax.device_get(checkpoint.restore_variables(mngr, mngr.latest_step(), target)["params"])


# The runs that resume are trained by SGD without clipping, whose update is linear in the gradient, so that a run
# resumed onto another mesh can be held to a bound (see test_sharding.test_train_steps_match_on_every_mesh).
LINEAR_UPDATES = ("config.optim.name=sgd", "config.optim.clip=0")


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """8 uninterrupted steps on the 8-device data-parallel mesh, logging every step."""
    from bigjax import config as config_lib

    config = config_lib.load(TINY, ["config.log_every=1", *LINEAR_UPDATES])
    workdir = tmp_path_factory.mktemp("straight")
    summary = train.train(config, workdir)
    assert summary.status == "finished" and summary.step == 8
    return config, workdir


@pytest.fixture(scope="module")
def stopped_run(straight_run, tmp_path_factory):
    """The straight run's config stopped at step 4 (--stop-at-step): for the tests that resume it, each from a copy."""
    config, _ = straight_run
    workdir = tmp_path_factory.mktemp("stopped") / "run"
    assert train.train(config, workdir, stop_at_step=4).status == "preempted"
    assert checkpoint.manager(workdir, read_only=True).latest_step() == 4
    return workdir


def test_resume_is_bitwise_identical_on_the_same_mesh(straight_run, stopped_run, tmp_path):
    config, straight = straight_run
    workdir = copy_run(stopped_run, tmp_path)
    assert train.train(config, workdir).step == 8

    assert losses_by_step(workdir) == losses_by_step(straight)  # every step, bitwise
    jax.tree.map(np.testing.assert_array_equal, final_params(workdir, config), final_params(straight, config))


def test_resume_with_prefetch_saves_the_position_of_the_last_batch_used(straight_run, tmp_path, tiny_config):
    _, straight = straight_run  # prefetch=2, the default
    config = tiny_config("", "config.log_every=1", "config.data.prefetch=3", *LINEAR_UPDATES)
    train.train(config, tmp_path, stop_at_step=3)  # 3 batches used, 6 read from the host iterator
    mngr = checkpoint.manager(tmp_path, read_only=True)
    assert mngr.restore(3, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]["step"] == 3
    train.train(config, tmp_path)
    assert losses_by_step(tmp_path) == losses_by_step(straight)  # the same batches: every loss bitwise equal


def test_resume_onto_a_different_mesh(straight_run, stopped_run, tmp_path, tiny_config):
    config, straight = straight_run
    workdir = copy_run(stopped_run, tmp_path)  # data=8
    on_2x2x2 = ("config.mesh.data=2", "config.mesh.fsdp=2", "config.mesh.tensor=2")
    train.train(tiny_config("", "config.log_every=1", *on_2x2x2, *LINEAR_UPDATES), workdir)

    # The losses and the updates of steps 5-8 add their sums in another order: within the bounds of those sums.
    tolerance = float32_sum_tolerance(*lm_sum_lengths(config, tokens=config.batch_size * config.data.seq_len))
    np.testing.assert_allclose(
        [losses_by_step(workdir)[s] for s in range(1, 9)],
        [losses_by_step(straight)[s] for s in range(1, 9)],
        rtol=tolerance,
    )
    initial = jax.device_get(init_params(make_task(config), config.seed))
    resumed, straight_params = final_params(workdir, config), final_params(straight, config)
    assert_sgd_params_close_after_reordering(resumed, straight_params, initial, tolerance, 8, "parameters at step 8")


def test_resume_with_a_changed_model_or_a_stop_step_already_passed_is_refused(
    straight_run, stopped_run, tmp_path, tiny_config
):
    config, _ = straight_run
    workdir = copy_run(stopped_run, tmp_path)
    wider = tiny_config("", "config.model.d_model=64", *LINEAR_UPDATES)
    with pytest.raises(checkpoint.CheckpointError, match=r"model\.d_model: 32 -> 64"):
        train.train(wider, workdir)
    assert checkpoint.manager(workdir, read_only=True).latest_step() == 4  # nothing lost

    # --stop-at-step before the step the run resumes at cannot be honoured; at that very step, nothing is trained.
    config_json = (workdir / "config.json").read_text()
    with pytest.raises(train.TrainingError, match=r"--stop-at-step 3 is before step 4, where this run resumes"):
        train.train(config, workdir, stop_at_step=3)
    summary = train.train(config, workdir, stop_at_step=4)
    assert (summary.step, summary.status) == (4, "preempted")
    assert checkpoint.committed_steps(workdir) == [4] and (workdir / "config.json").read_text() == config_json


def compiled_train_step(config, task=None):
    """(the compiled train step, a fresh state, the state's shardings, the mesh) for `config` (and `task`, one
    with the same variables as config's)."""
    setup = make_setup(config)
    if task is not None:
        setup = dataclasses.replace(setup, task=task)
    step, _ = step_lib.compile_train_step(setup)
    return step, setup.init_state(), setup.state_shardings, setup.mesh


def test_gradient_accumulation_equals_one_big_batch(tiny_config):
    """k microbatches inside the step give the same update as one batch k times larger.

    One SGD step at the full learning rate, without clipping or weight decay: the update is -lr x the gradient, so
    the parameters differ as the gradients do, and the gradient (for the bound of its norm) can be read off it.
    """
    sgd = ["config.optim.name=sgd", "config.optim.warmup_steps=0", "config.optim.clip=0", "config.optim.weight_decay=0"]
    results = []
    for accum in (1, 4):
        config = tiny_config("", f"config.optim.grad_accum={accum}", "config.batch_size=32", *sgd)
        step, state, _, mesh = compiled_train_step(config)
        initial = jax.device_get(state.params)
        rng = np.random.default_rng(0)
        tokens = rng.integers(0, 256, (32, 33), dtype=np.int32)
        weights = (rng.random((32, 32)) > 0.2).astype(np.float32)  # uneven token counts per microbatch
        batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": weights}
        state, m = step(state, mesh_lib.global_batch_from_host(batch, mesh))
        results.append(jax.device_get((m, state.params)))
    (m1, p1), (m4, p4) = results
    assert not np.array_equal(p1["embed"]["embedding"], initial["embed"]["embedding"])  # the step did move them
    # The microbatches' sums are added in another order than the whole batch's: within the bound of those sums.
    tolerance = float32_sum_tolerance(*lm_sum_lengths(config, tokens=weights.size))
    np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=tolerance)
    grads = jax.tree.map(lambda p, p0: (np.float64(p0) - p) / config.optim.lr, p1, initial)
    assert abs(m4["grad_norm"] - m1["grad_norm"]) <= norm_atol(grads, tolerance)
    assert_sgd_params_close_after_reordering(p4, p1, initial, tolerance, 1, "parameters after one step")


def random_parts_of_the_task(tiny_config, which):
    """(config, batch) whose training loss depends on the step's random key alone: dropout in a GPT, or the
    masked LM's choice and corruption of tokens (its model without dropout)."""
    if which == "dropout":
        config = tiny_config("", "config.model.dropout=0.1")
        return config, test_sharding.fixed_batch(config)
    config = test_text_models.tiny("bert", "masked_lm")
    assert config.model.dropout == 0  # the masks alone
    return config, test_text_models.fixed_batch(config)


@pytest.mark.parametrize("which", ["dropout", "masked_lm"])
def test_the_compiled_step_draws_new_randomness_each_step_and_the_same_again_at_the_same_step(tiny_config, which):
    """The same parameters and batch at step counts 3, 3 and 4: the loss (computed before the update, so a function
    of the parameters, the batch and the step's key alone) repeats bit for bit at the same step and changes with
    the step, i.e. the dropout masks / the masked-LM's chosen tokens of a row are drawn anew for every step."""
    config, batch = random_parts_of_the_task(tiny_config, which)
    step, state, shardings, mesh = compiled_train_step(config)
    host_state, batch = jax.device_get(state), mesh_lib.global_batch_from_host(batch, mesh)

    def loss_at(step_count: int) -> float:
        at = jax.device_put(host_state.replace(step=np.asarray(step_count, host_state.step.dtype)), shardings)
        return float(step(at, batch)[1]["loss"])  # the step donates its state: a fresh copy each call

    assert loss_at(3) == loss_at(3)
    assert loss_at(3) != loss_at(4)


@jax.custom_vjp
def overflow_backward(x):
    """The identity, whose gradient comes out infinite (or NaN where it was 0): a backward pass that overflows."""
    return x


overflow_backward.defvjp(lambda x: (x, None), lambda _, g: (g * np.float32(np.inf),))


class BackwardOverflow:
    """The task, except that its gradients overflow while its loss stays finite."""

    def __init__(self, task):
        self.task = task

    def __getattr__(self, name):
        return getattr(self.task, name)

    def loss_sums(self, params, *args, **kwargs):
        return self.task.loss_sums(jax.tree.map(overflow_backward, params), *args, **kwargs)


def test_skip_policy_skips_a_step_whose_loss_is_finite_but_whose_gradient_is_not(tiny_config):
    config = tiny_config("", "config.nan_policy=skip", "config.optim.warmup_steps=0")
    step, state, _, mesh = compiled_train_step(config, BackwardOverflow(make_task(config)))
    before, batch = jax.device_get(state), mesh_lib.global_batch_from_host(test_sharding.fixed_batch(config), mesh)
    after, step_metrics = jax.device_get(step(state, batch))
    assert np.isfinite(step_metrics["loss"]) and not np.isfinite(step_metrics["grad_norm"])
    assert after.step == before.step + 1  # the batch is used up
    unchanged = lambda path, new, old: np.testing.assert_array_equal(new, old, err_msg=jax.tree_util.keystr(path))
    jax.tree_util.tree_map_with_path(unchanged, after.replace(step=before.step), before)  # nothing else moved


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, tiny_config):
    # An absurd learning rate with no clipping blows the weights up within a few steps.
    config = tiny_config(
        "steps=40",
        "config.optim.name=sgd",
        "config.optim.lr=1e12",
        "config.optim.clip=0",
        "config.optim.warmup_steps=0",
        "config.checkpoint_every=1",
        "config.log_every=20",
    )
    with pytest.raises(train.TrainingError, match=r"(loss|grad_norm) is (nan|inf) at step (\d+)") as error:
        train.train(config, tmp_path)
    bad_step = int(error.value.args[0].split(" at step ")[1].split(";")[0])
    saved = checkpoint.manager(tmp_path, read_only=True).all_steps()
    assert saved and max(saved) < bad_step  # nothing at or after the bad step was saved
    params = final_params(tmp_path, config)
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(params))


def test_sigterm_saves_a_checkpoint_and_exits_zero(tmp_path):
    workdir, stderr = tmp_path / "w", tmp_path / "stderr"
    command = [sys.executable, "-m", "bigjax.cli", "train", "--config", TINY + ":steps=100000", "--workdir", workdir]
    with open(stderr, "w") as errors:
        process = subprocess.Popen(
            [*map(str, command), "--config.log_every=1", "--config.checkpoint_every=0"],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=errors,
            text=True,
        )
    # The first step's log line: the loop is running, with the SIGTERM handler in place since before it started.
    out = read_until(process, "step 1:", stderr)
    process.send_signal(signal.SIGTERM)
    out += process.stdout.read()  # to the end: the process exits
    assert process.wait() == 0, stderr.read_text()[-3000:]
    assert "stopped by SIGTERM at step" in out
    saved = checkpoint.manager(workdir, read_only=True).latest_step()
    assert saved is not None and 1 <= saved < 100000
    assert json.loads((workdir / "config.json").read_text())["total_steps"] == 100000


def test_a_negative_stop_step_or_an_empty_workdir_is_refused_before_anything_is_written(
    tiny_config, tmp_path, monkeypatch
):
    with pytest.raises(train.TrainingError, match=r"--stop-at-step -1: .*a step number"):
        train.train(tiny_config(), tmp_path / "run", stop_at_step=-1)
    assert not (tmp_path / "run").exists()
    # An empty --workdir would be the current directory: never trained into by accident ("." says it on purpose).
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"the workdir is an empty path"):
        train.train(tiny_config(), "")
    assert not list(tmp_path.iterdir())
    assert logs.log_file_candidates("", "train")[0].startswith(tempfile.gettempdir())  # the CLI's log: not in "."


def test_a_start_refused_by_the_data_leaves_no_trace_in_the_workdir(tiny_config, tmp_path):
    """The model, task and data are checked before the workdir is locked or written to."""
    from bigjax.data import DataError

    workdir = tmp_path / "run"
    with pytest.raises(DataError, match="config.model.vocab_size=100"):
        train.train(tiny_config("", "config.model.vocab_size=100"), workdir)
    assert not workdir.exists()
