"""Fine-tuning: init_from another run onto another mesh, frozen parameters, early stopping, L1/L2 penalties."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import TINY
from test_optim import make_config
from test_train import final_params

from bigjax import config as config_lib
from bigjax import params as params_lib
from bigjax.ops import metrics
from bigjax.params import by_path
from bigjax.run import checkpoint, finetune, lock, optim, train
from bigjax.run.setup import make_setup


@pytest.fixture
def pretrained(tiny_run):
    """A tiny GPT language model trained for 8 steps on the 8-device data-parallel mesh (the session's, only read)."""
    return config_lib.load(TINY), tiny_run


def classifier_config(pretrained_workdir, *overrides):
    """The tiny GPT as a 3-class text classifier on a 2x2x2 mesh, starting from the pretrained run."""
    config = config_lib.load(
        TINY,
        [
            "config.task.name=classification",
            "config.task.num_classes=3",
            "config.mesh.data=2",
            "config.mesh.fsdp=2",
            "config.mesh.tensor=2",
            f"config.init_from.workdir={pretrained_workdir}",
            *overrides,
        ],
    )
    return config


def fresh_and_loaded(config):
    setup = make_setup(config)
    state, shardings = setup.init_state(), setup.state_shardings
    with setup.sharding.activate():
        loaded = finetune.load_pretrained(state.params, config.init_from, shardings.params)
    return state.params, loaded, shardings.params


def test_init_from_loads_the_backbone_onto_another_mesh_and_leaves_the_new_head_fresh(pretrained):
    source_config, source = pretrained
    config = classifier_config(source)
    fresh, loaded, shardings = fresh_and_loaded(config)
    pretrained_params = by_path(final_params(source, source_config))
    fresh, loaded, shardings = by_path(fresh), by_path(loaded), by_path(shardings)

    assert set(loaded) - set(pretrained_params) == {"classifier/kernel", "classifier/bias"}
    for name, value in loaded.items():
        assert value.sharding == shardings[name], name  # on this run's 2x2x2 mesh, not the source's 8x1x1
        if name in pretrained_params:
            np.testing.assert_array_equal(value, pretrained_params[name], err_msg=name)
        else:
            np.testing.assert_array_equal(value, fresh[name], err_msg=name)
    assert not np.array_equal(fresh["embed/embedding"], loaded["embed/embedding"])


def load_onto_abstract(config):
    """init_from into the abstract parameters of `config`'s model: loaded ones come back as arrays, the others
    stay ShapeDtypeStructs (no initialization is compiled: the checks run before any restore)."""
    setup = make_setup(config)
    loaded = finetune.load_pretrained(setup.abstract_state.params, config.init_from, setup.state_shardings.params)
    return by_path(loaded)


def test_init_from_include_and_exclude_select_what_is_loaded(pretrained):
    _, source = pretrained
    loaded = load_onto_abstract(
        classifier_config(source, "config.init_from.include=^layers/", "config.init_from.exclude=mlp")
    )
    restored = {name for name, leaf in loaded.items() if isinstance(leaf, jax.Array)}
    assert restored == {name for name in loaded if name.startswith("layers/") and "mlp" not in name}
    assert "layers/attention/query/kernel" in restored


def test_init_from_refuses_a_parameter_of_another_shape_and_a_missing_checkpoint(pretrained, tmp_path):
    _, source = pretrained
    longer = ("config.model.max_len=64", "config.data.seq_len=64")
    with pytest.raises(finetune.FinetuneError, match=r"position_embed/embedding has shape \(32, 32\).*\(64, 32\)"):
        load_onto_abstract(classifier_config(source, *longer))
    loaded = load_onto_abstract(classifier_config(source, *longer, "config.init_from.exclude=position_embed"))
    assert not isinstance(loaded["position_embed/embedding"], jax.Array)
    with pytest.raises(finetune.FinetuneError, match=r"checkpoint 5 is not a committed checkpoint .*committed: 4, 8"):
        load_onto_abstract(classifier_config(source, "config.init_from.step=5"))
    with pytest.raises(finetune.FinetuneError, match="no committed checkpoint"):
        load_onto_abstract(classifier_config(tmp_path))


def test_init_from_reads_only_committed_checkpoints(pretrained, tmp_path):
    """A step directory without its commit marker (a save that never finished, in a bucket; a deletion cut short)
    is not a checkpoint: init_from's newest is the newest committed one, and the uncommitted step is refused."""
    _, source = pretrained
    copy = tmp_path / "copy"
    shutil.copytree(source, copy)
    (copy / "checkpoints" / "8" / checkpoint.COMMIT_MARKER).unlink()
    assert finetune.newest_or_given_step(classifier_config(copy).init_from) == 4
    with pytest.raises(finetune.FinetuneError, match=r"checkpoint 8 is not a committed checkpoint .*committed: 4"):
        finetune.newest_or_given_step(classifier_config(copy, "config.init_from.step=8").init_from)


def test_fine_tuning_with_a_frozen_backbone_keeps_it_bit_identical(pretrained, tmp_path):
    """init_from a run on another mesh, freeze everything but the embeddings: the blocks stay exactly the
    pretrained ones, have no optimizer state, and the rest trains."""
    source_config, source = pretrained
    config = config_lib.load(
        TINY,
        [
            f"config.init_from.workdir={source}",
            "config.freeze=^(layers|final_norm)/",
            "config.mesh.data=2",
            "config.mesh.fsdp=2",
            "config.mesh.tensor=2",
            "config.optim.lr=1e-2",
        ],
    )
    assert train.train(config, tmp_path).status == "finished"
    before, after = (
        by_path(final_params(source, source_config)),
        by_path(final_params(tmp_path, config)),
    )
    frozen = [name for name in after if name.startswith(("layers/", "final_norm/"))]
    assert len(frozen) == 18  # 16 in the scanned blocks, 2 in the final norm
    for name in frozen:
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)
    assert not np.array_equal(after["embed/embedding"], before["embed/embedding"])

    # Adam's moments exist for the two trained embeddings only.
    shapes = [leaf.shape for leaf in jax.tree.leaves(make_setup(config).abstract_state.opt_state) if leaf.ndim]
    assert sorted(shapes) == sorted(
        [after["embed/embedding"].shape] * 2 + [after["position_embed/embedding"].shape] * 2
    )


def test_frozen_parameters_get_no_update_even_from_weight_decay_or_penalties():
    params = {"backbone": {"kernel": jnp.full((4, 4), -0.0)}, "head": {"kernel": jnp.ones((4, 2))}}
    config = make_config(name="adamw", lr=0.1, weight_decay=0.1, l1_penalty=0.1, l2_penalty=0.1)
    tx = optim.make_optimizer(config, 10, frozen=lambda params: params_lib.matches(params, "^backbone/"))
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    assert not np.any(updates["backbone"]["kernel"]) and np.all(updates["head"]["kernel"] < 0)


def test_l1_and_l2_penalties_add_their_gradients_on_kernels_only():
    params = {"dense": {"kernel": jnp.array([[2.0, -3.0]])}, "norm": {"scale": jnp.array([5.0, -5.0])}}
    tx = optim.make_optimizer(make_config(name="sgd", lr=1.0, l1_penalty=0.5, l2_penalty=0.1), 10)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    # d/dw (0.5 |w| + 0.1/2 w^2) = 0.5 sign(w) + 0.1 w; sgd steps against it.
    np.testing.assert_allclose(updates["dense"]["kernel"], [[-(0.5 + 0.2), -(-0.5 - 0.3)]], rtol=1e-6)
    np.testing.assert_array_equal(updates["norm"]["scale"], [0.0, 0.0])
    assert optax.tree.norm(updates) > 0


# --------------------------------------------------------------------------------------------------
# Early stopping


def stopping_config(*overrides):
    # "max" of the loss: the loss falls, so the first evaluations are the best and the run soon stops.
    return config_lib.load(
        TINY + ":steps=40",
        [
            "config.eval_every=2",
            "config.early_stopping.metric=loss",
            "config.early_stopping.mode=max",
            "config.early_stopping.patience=2",
            "config.keep_checkpoints=1",
            "config.checkpoint_every=0",
            *overrides,
        ],
    )


def eval_history(workdir) -> dict:
    return {
        row["step"]: row["eval/loss"] for row in metrics.read_jsonl(workdir / "metrics.jsonl") if "eval/loss" in row
    }


def test_early_stopping_stops_after_patience_keeps_the_best_checkpoint_and_resumes_its_count(tmp_path):
    config = stopping_config()
    summary = train.train(config, tmp_path / "straight")
    history = eval_history(tmp_path / "straight")
    best_step = max(history, key=history.get)
    assert summary.status == "stopped early"
    assert summary.step == best_step + 2 * config.eval_every < config.total_steps  # two evaluations, no gain
    assert max(history) == summary.step
    mngr = checkpoint.manager(tmp_path / "straight", read_only=True)
    assert sorted(mngr.all_steps()) == sorted({best_step, summary.step})  # the best and the newest
    assert mngr.metadata(best_step).metrics["loss"] == pytest.approx(history[best_step])

    # Running it again finds the run already stopped: no step is trained, nothing is lost.
    again = train.train(config, tmp_path / "straight")
    assert again.status == "stopped early" and again.step == summary.step
    assert eval_history(tmp_path / "straight") == history

    # Preempted one step before it would stop, the resumed run counts on from its best checkpoint.
    train.train(config, tmp_path / "resumed", stop_at_step=summary.step - 1)
    resumed = train.train(config, tmp_path / "resumed")
    assert resumed.status == "stopped early" and resumed.step == summary.step
    assert eval_history(tmp_path / "resumed") == history


@pytest.mark.parametrize("mode, best", [("min", 4), ("max", 6)])
def test_with_one_checkpoint_kept_the_best_by_the_mode_stays_beside_the_newest(tmp_path, mode, best):
    """keep_checkpoints=1 with early stopping: each save deletes what is neither the newest nor the best by the
    metric, the lowest for mode=min, the highest for max; and the best is what a resumed run counts on from."""
    from bigjax.run import state as state_lib

    losses = {2: 3.0, 4: 1.0, 6: 5.0, 8: 2.0}  # the newest, 8, is neither the lowest nor the highest
    config = config_lib.load(TINY)
    with lock.held(tmp_path) as fence:
        saves = checkpoint.writer(tmp_path, 1, fence, "loss", mode)
        for step, loss in losses.items():
            state = state_lib.TrainState(step=jnp.int32(step), params={"w": jnp.zeros(2)}, opt_state={}, model_state={})
            saves.save(step, state, {}, {}, config, {"loss": loss})
        saves.finish()
        saves.delete_old()
    assert checkpoint.committed_steps(tmp_path) == [best, 8]
    assert saves.mngr.best_step() == best  # train.resume_early_stopping's


def test_fine_tuning_config_errors_are_clear(tiny_config):
    with pytest.raises(config_lib.ConfigError, match="set config.eval_every"):
        tiny_config("", "config.early_stopping.metric=accuracy")
    with pytest.raises(config_lib.ConfigError, match=r"config.freeze='\(' is not a valid regular expression"):
        tiny_config("", "config.freeze=(")
    with pytest.raises(config_lib.ConfigError, match="early_stopping.mode='best' is not one of max, min"):
        tiny_config("", "config.early_stopping.mode=best")
