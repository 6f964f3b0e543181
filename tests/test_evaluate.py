"""Eval metrics count every example of the eval split once: the last batch's padding weighs nothing in any task,
so the metrics over a split whose size the batch does not divide equal those over the same examples unpadded."""

import dataclasses
import json

import flax.linen as nn
import jax
import numpy as np
import pytest
from tolerance import float32_sum_tolerance

from bigjax import config as config_lib
from bigjax import data
from bigjax.data import corpus, pipeline
from bigjax.run import evaluate
from bigjax.run.setup import make_setup
from bigjax.tasks import make_task

# (model family, task, eval batch size): each batch size leaves the last batch of its split partly padding.
TASKS = {
    "causal_lm": ("gpt", "causal_lm", 8),
    "masked_lm": ("bert", "masked_lm", 11),
    "text_classification": ("bert", "classification", 7),
    "image_classification": ("cnn", "classification", 64),
}


def write_speeches(path, count=120):
    """A JSONL file of Shakespeare's lines, labelled 0, 1 or 2 by their first letter (labels the text tasks ignore)."""
    lines = [line for line in corpus.shakespeare_split("eval", 0.1).splitlines() if 10 < len(line) < 40][:count]
    path.write_text("".join(json.dumps({"text": line, "label": ord(line[0]) % 3}) + "\n" for line in lines))


def eval_config(name, tmp_path):
    family, task, batch_size = TASKS[name]
    config = config_lib.defaults(model=family, task=task)
    config.batch_size, config.eval_batches = batch_size, 1000  # the whole eval split
    config.mesh.update(dict(data=1, fsdp=1, tensor=1))
    if family == "cnn":
        config.model.update(dict(features=(4, 8), hidden_dim=16))
        config.task.num_classes = 10
        config.data.update(dict(source="digits", image_size=8, channels=1))
    else:
        config.model.update(dict(num_layers=1, d_model=16, num_heads=2, max_len=32, vocab_size=260))
        config.task.num_classes = 3
        write_speeches(tmp_path / "speeches.jsonl")
        config.data.update(dict(source=f"jsonl:{tmp_path / 'speeches.jsonl'}", eval_fraction=0.25, seq_len=32))
        config.data.update(dict(max_segments=4, cache_dir=str(tmp_path / "cache")))
    config_lib.check_values(config)
    return config


class Recorded:
    """A task that remembers the sums its last metrics were computed from."""

    def __init__(self, task):
        self.task, self.sums = task, None

    def summarize(self, sums, stats):
        self.sums = sums
        return self.task.summarize(sums, stats)


def eval_metrics(config, variables):
    """(metrics, sums) of the eval job's evaluation of `variables` on one device, at config.batch_size."""
    setup = make_setup(config, jax.devices()[:1])
    recorded = dataclasses.replace(setup, task=Recorded(setup.task))
    metrics = evaluate.evaluate(recorded, evaluate.make_eval_step(setup), variables, data.eval_data(config))
    return metrics, jax.device_get(recorded.task.sums)


def random_variables(config):
    """The model's variables, filled with random values: the zero-initialized heads would make every example's
    loss the same, and padding counted twice would then move no mean."""
    shapes = nn.unbox(jax.eval_shape(make_task(config).init_variables, jax.random.key(0)))
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda leaf: (0.3 * rng.normal(size=leaf.shape)).astype(leaf.dtype), shapes)


@pytest.mark.parametrize("name", list(TASKS))
def test_padding_of_the_last_eval_batch_weighs_nothing(name, tmp_path):
    config = eval_config(name, tmp_path)
    examples = len(pipeline.split_examples(config, "eval")[0])
    assert examples % config.batch_size, "the last batch must be partly padding"
    variables = random_variables(config)
    padded, padded_sums = eval_metrics(config, variables)
    config.batch_size = examples  # one batch holding every example: no padding at all
    unpadded, unpadded_sums = eval_metrics(config, variables)

    assert padded_sums["count"] == unpadded_sums["count"]  # the loss terms (tokens or examples) of the real rows
    # Every other sum (of losses, hits, per-class counts) adds the same terms in another order (per batch, then batch
    # by batch): within float32_sum_tolerance(terms) of each other, relative to the sum of the terms' magnitudes,
    # which for losses (>= 0) and hits (0 or 1) is the sum itself. The metrics are these sums over the count.
    rtol = float32_sum_tolerance(int(unpadded_sums["count"]))
    for key, value in unpadded_sums.items():
        np.testing.assert_allclose(padded_sums[key], value, rtol=rtol, atol=0, err_msg=key)
    for key in ("loss", "accuracy"):
        assert padded[key] == pytest.approx(unpadded[key], rel=rtol, abs=0), key
