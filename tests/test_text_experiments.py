"""The text experiments: the CPU ones run end to end from the CLI (pretrain, resume bit-exact, fine-tune onto
another mesh with a frozen backbone); the full-size ones build their configs and compile a train step."""

import jax
import numpy as np
import pytest
from conftest import REPO
from test_train import final_params, losses_by_step

from bigjax import config as config_lib
from bigjax.models.gpt import parameter_count
from bigjax.params import by_path
from bigjax.run import step as step_lib
from bigjax.run import train
from bigjax.run.setup import make_setup
from bigjax.tasks import make_task

EXPERIMENTS = REPO / "experiments"
# bert_tiny_mlm at toy size: 8 steps of 8 rows, saved every 4.
TOY_MLM = (
    str(EXPERIMENTS / "bert_tiny_mlm.py") + ":layers=2,d=32,seq=32,steps=8",
    ["config.batch_size=8", "config.log_every=1", "config.checkpoint_every=4", "config.eval_every=0"],
)


@pytest.fixture(scope="module")
def pretrained_bert(tmp_path_factory):
    config = config_lib.load(*TOY_MLM)
    workdir = tmp_path_factory.mktemp("bert")
    assert train.train(config, workdir).status == "finished"
    return config, workdir


def test_masked_lm_on_shakespeare_resumes_bit_exact(pretrained_bert, tmp_path):
    config, straight = pretrained_bert
    losses = losses_by_step(straight)
    assert all(np.isfinite(list(losses.values()))) and losses[8] < losses[1]
    train.train(config, tmp_path, stop_at_step=4)
    train.train(config, tmp_path)
    assert losses_by_step(tmp_path) == losses  # the masks come from (seed, step): the same after a resume
    jax.tree.map(np.testing.assert_array_equal, final_params(tmp_path, config), final_params(straight, config))


def test_finetune_genre_from_the_bert_run_onto_another_mesh_with_a_frozen_backbone(pretrained_bert, tmp_path):
    config_mlm, source = pretrained_bert
    config = config_lib.load(
        str(EXPERIMENTS / "finetune_genre.py") + f":steps=6,freeze=True,init={source}",
        [
            "config.batch_size=8",
            "config.eval_every=2",
            "config.eval_batches=2",
            "config.log_every=1",
            "config.mesh.data=2",
            "config.mesh.fsdp=2",
            "config.mesh.tensor=2",
        ],
    )
    summary = train.train(config, tmp_path)
    assert summary.status in ("finished", "stopped early")
    before = by_path(final_params(source, config_mlm))
    after = by_path(final_params(tmp_path, config))
    head = {name for name in after if name.startswith(("classifier/", "pooler/"))}
    assert head == {"classifier/kernel", "classifier/bias", "pooler/kernel", "pooler/bias"}
    for name in set(after) - head:  # the pretrained backbone, loaded onto 2x2x2 and frozen: exactly as saved
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)
    assert np.any(after["classifier/kernel"])  # the head started at zero and learned


@pytest.mark.parametrize("name", ["bert_base_mlm", "imdb_finetune"])
def test_full_size_text_experiments_compile_a_train_step(name):
    config = config_lib.load(str(EXPERIMENTS / f"{name}.py"))
    assert config.model.num_layers == 12 and config.model.d_model == 768 and config.model.norm_position == "post"
    assert config.data.source.startswith("tfds:")
    # TFDS data cannot be downloaded here: compile the real model and step for synthetic batches of 8 rows.
    config = config_lib.load(
        str(EXPERIMENTS / f"{name}.py"),
        [
            "config.data.source=synthetic",
            "config.data.tokenizer=byte",
            "config.batch_size=8",
            "config.init_from.workdir=",
        ],
    )
    task = make_task(config)
    counts = parameter_count(task.model.cfg)
    assert 108e6 < counts["layers"] + counts["embedding"] < 112e6  # BERT-base: 110M
    setup = make_setup(config)  # shapes only: nothing is allocated
    if name == "imdb_finetune":  # the same encoder under a classifier head (compiled at toy size elsewhere)
        assert set(setup.abstract_state.params) >= {"classifier", "pooler", "layers"}
        return
    compiled, _ = step_lib.compile_train_step(setup)
    assert compiled.cost_analysis() is not None
