"""The vocabulary-chunked cross-entropy (`config.task.loss_chunk`) against the plain one.

The same loss, accuracy and count sums and the same gradients on one device and on the 8-device mesh, with the
tied embedding and with the `unembed` layer as the output matrix; the same compiled train step; fewer bytes of
temporaries in the compiled program; a clear error for pieces that do not divide the sequence.

Tolerance: fp32; the pieces' sums are added in another order than one reduction over the whole batch, so values
agree to rounding, not bitwise: within tests/tolerance.py's bounds for the sums they went through. The accuracy and
count sums are small integers and agree exactly.
"""

import jax
import numpy as np
import pytest
from conftest import REPO, init_params
from test_sharding import fixed_batch, on_mesh
from tolerance import (
    assert_close_after_reordering,
    assert_sgd_params_close_after_reordering,
    float32_sum_tolerance,
    lm_sum_lengths,
    norm_atol,
)

from bigjax import config as config_lib
from bigjax import plan
from bigjax.config import ConfigError
from bigjax.run import step as step_lib
from bigjax.tasks import make_task

CHUNK = 8  # tiny.py's sequences are 32 tokens: four pieces; fixed_batch's padding lies inside the last one
MESHES = {"gpt2": [(1, 1, 1), (8, 1, 1), (2, 2, 2)], "llama": [(1, 1, 1), (2, 2, 2)]}


def sums_and_grads(setup, params, batch):
    """The loss sums and the gradient of the mean loss, jitted with the parameters sharded for the setup's mesh."""

    def mean_loss(p, b):
        sums, _ = setup.task.loss_sums(p, {}, b)
        return sums["loss"] / sums["count"], sums

    fn = jax.jit(jax.grad(mean_loss, has_aux=True), in_shardings=(setup.state_shardings.params, setup.sharding.batch))
    with setup.sharding.activate():
        grads, sums = fn(params, setup.sharding.global_batch(batch))
    return jax.device_get((sums, grads))


def batch_half_predicted(task, params, config):
    """fixed_batch with every other target replaced by the model's own prediction, so that accuracy is ~1/2 and
    comparing it means something (a fresh model predicts almost no real target)."""
    batch = fixed_batch(config)
    predicted = np.asarray(jax.jit(task.model.apply)({"params": params}, batch["inputs"]).argmax(-1))
    every_other = np.arange(batch["targets"].shape[1]) % 2 == 0
    batch["targets"] = np.where(every_other, predicted, batch["targets"])  # a new array: targets are a view of inputs
    return batch


@pytest.mark.parametrize("variant", ["gpt2", "llama"])  # tied embedding; untied `unembed` layer
def test_chunked_loss_and_gradients_match_the_full_logits(tiny_config, variant):
    arg = "llama=True" if variant == "llama" else ""
    plain = tiny_config(arg)
    config = tiny_config(arg, f"config.task.loss_chunk={CHUNK}")
    plain_task = make_task(plain)
    host_params = jax.device_get(init_params(plain_task))
    batch = batch_half_predicted(plain_task, host_params, config)

    def on(config, shape):
        setup = on_mesh(config, shape)
        return sums_and_grads(setup, jax.device_put(host_params, setup.state_shardings.params), batch)

    want_sums, want_grads = on(plain, (1, 1, 1))
    assert want_sums["accuracy"] >= 128 - 3  # the predicted half is right, but for 3 padded tokens
    tolerance = float32_sum_tolerance(*lm_sum_lengths(config, tokens=batch["weights"].size))
    for shape in MESHES[variant]:
        sums, grads = on(config, shape)
        assert sums.keys() == want_sums.keys()
        # The loss sum adds terms >= 0: relative to itself.
        np.testing.assert_allclose(sums["loss"], want_sums["loss"], rtol=tolerance, err_msg=f"loss sum on {shape}")
        assert sums["accuracy"] == want_sums["accuracy"] and sums["count"] == want_sums["count"], shape
        assert_close_after_reordering(grads, want_grads, tolerance, f"gradients on mesh {shape}")


def test_one_train_step_gives_the_same_metrics_and_parameters(tiny_config):
    """Through step.compile_train_step, with dropout on: the chunked path draws the same dropout masks.

    One SGD step at the full learning rate without clipping or weight decay: the update is -lr x the gradient, so
    the parameters differ as the gradients do, and the gradient (hence the bound of its norm) can be read off it.
    """
    step_outputs, start = [], None
    sgd = ["config.optim.name=sgd", "config.optim.warmup_steps=0", "config.optim.clip=0", "config.optim.weight_decay=0"]
    for chunk in (0, CHUNK):
        config = tiny_config("", "config.model.dropout=0.1", f"config.task.loss_chunk={chunk}", *sgd)
        setup = on_mesh(config, (2, 2, 2))
        if start is None:  # one fresh state (loss_chunk is not read by the initialization), placed for both steps
            start = jax.device_get(setup.init_state())
            initial = start.params
        state = jax.device_put(start, setup.state_shardings)
        step, _ = step_lib.compile_train_step(setup)
        state, step_metrics = step(state, setup.sharding.global_batch(fixed_batch(config)))
        step_outputs.append(jax.device_get((step_metrics, state.params)))
    (plain_metrics, plain_params), (chunked_metrics, chunked_params) = step_outputs
    assert chunked_metrics.keys() == plain_metrics.keys() == {"loss", "accuracy", "grad_norm", "learning_rate"}
    tolerance = float32_sum_tolerance(*lm_sum_lengths(config, tokens=config.batch_size * config.data.seq_len))
    np.testing.assert_allclose(chunked_metrics["loss"], plain_metrics["loss"], rtol=tolerance, err_msg="loss")
    assert chunked_metrics["accuracy"] == plain_metrics["accuracy"]  # the same hits over the same count
    assert chunked_metrics["learning_rate"] == plain_metrics["learning_rate"] == config.optim.lr
    grads = jax.tree.map(lambda p, p0: (np.float64(p0) - p) / config.optim.lr, plain_params, initial)
    assert abs(chunked_metrics["grad_norm"] - plain_metrics["grad_norm"]) <= norm_atol(grads, tolerance)
    what = "parameters after one step"
    assert_sgd_params_close_after_reordering(chunked_params, plain_params, initial, tolerance, 1, what)


def compiled_temporaries(config) -> int:
    compiled, _ = step_lib.compile_train_step(on_mesh(config, (1, 1, 1)))
    return compiled.memory_analysis().temp_size_in_bytes


def test_chunking_shrinks_the_compiled_train_steps_temporaries(tiny_config):
    """With a vocabulary far larger than d_model, the [batch, length, vocab] fp32 logits and their gradient
    dominate the step's temporaries (2 x 16 MiB here); in pieces of 8 positions only one piece's are live. The
    bound is loose (XLA's other temporaries vary) but not vacuous: were the scan's body not rematerialized, the
    scan would keep every piece's logits for the backward pass and save almost nothing."""
    large_vocab = ("config.model.vocab_size=16384",)
    plain = compiled_temporaries(tiny_config("", *large_vocab))
    chunked = compiled_temporaries(tiny_config("", *large_vocab, f"config.task.loss_chunk={CHUNK}"))
    assert chunked < 0.75 * plain, (chunked, plain)


def test_the_plan_counts_one_piece_of_logits(tiny_config):
    """`bigjax plan`'s model for absent devices: GPT-2 at batch 24 keeps 24 x 1024 tokens of logits (bf16, their
    fp32 copy and fp32 gradient: 10 bytes per vocabulary entry), chunked 24 x 128."""
    gpt2 = str(REPO / "experiments" / "gpt2_124m.py")
    plain = plan.make_plan(config_lib.load(gpt2), num_devices=1, device_kind="h100")
    chunked = plan.make_plan(config_lib.load(gpt2, ["config.task.loss_chunk=128"]), num_devices=1, device_kind="h100")
    saved = plain.per_device["activations"] - chunked.per_device["activations"]
    assert saved == pytest.approx(24 * (1024 - 128) * 50304 * 10, abs=16)


@pytest.mark.parametrize(
    ("experiment", "overrides", "message"),
    [
        ("tiny.py", ["config.task.loss_chunk=5"], r"loss_chunk=5 does not divide .*seq_len=32.*\(e.g. 4, 8, 16\)"),
        ("tiny.py", ["config.task.loss_chunk=64"], r"loss_chunk=64 does not divide config.data.seq_len=32"),
        ("tiny.py", ["config.task.loss_chunk=-1"], r"loss_chunk must be >= 0"),
        ("bert_tiny_mlm.py", ["config.task.loss_chunk=8"], r"applies to task.name='causal_lm', not 'masked_lm'"),
    ],
)
def test_a_loss_chunk_that_cannot_work_is_a_clear_error(experiment, overrides, message):
    with pytest.raises(ConfigError, match=message):
        config_lib.load(str(REPO / "experiments" / experiment), overrides)
