"""Tasks: what a model is trained to do. A task owns its model, the layout of a batch, the loss and the metrics;
the train loop, the eval job and the checkpoints know only this interface.

    task = make_task(config)
    task.model                                   the Flax module
    task.init_variables(rng)                     {"params": ..., other collections (e.g. "batch_stats")}, still
                                                 boxed with their logical axis names
    task.batch_spec(batch_size)                  {key: ShapeDtypeStruct} of one batch of that many examples
    task.loss_sums(params, model_state, batch, rng, train, teacher=None)
                                                 -> (sums, new_model_state) for one (micro)batch; with a
                                                 teacher (bigjax.compress.distill), "loss" is the distilled loss and
                                                 "hard_loss", "distill_kl" are added
    task.logits(...)                             the model's fp32 logits, as a distillation teacher's are read
    task.summarize(sums, data_stats)             host side: sums over any number of batches -> metrics
    task.flops_per_example()                     training FLOPs (forward and backward) of one example
    task.causal_flops_per_example()              optional, causal LMs: the same with attention counted only
                                                 where the causal mask keeps it (MaxText's count)
    task.tokens_per_example                      tokens in one example (0 for images): tokens/s and MFU

`sums` is a dict of scalars that add across microbatches, devices and eval batches: "count" is the number of
loss terms (tokens or examples) and every other entry is a sum over them, so `sums[k] / sums["count"]` is the mean
of metric k, and `sums["loss"] / sums["count"]` is the loss whose gradient the optimizer follows. A task may add
entries that are not means (e.g. per-class counts) and turn them into metrics in `summarize`.

`model_state` holds the mutable collections other than the parameters (BatchNorm statistics); it is `{}` for
models without any.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bigjax.config import ConfigError, check_family

NON_MEAN_SUMS = ("count",)


def make_task(config):
    """The task named by config.task.name, with the model config.model describes."""
    check_family(config)  # the family table (bigjax.families) says which families serve which task
    name = config.task.name
    if name == "causal_lm":
        from bigjax.tasks.causal_lm import CausalLM

        return CausalLM(config)
    if name == "masked_lm":
        from bigjax.tasks.masked_lm import MaskedLM

        return MaskedLM(config)
    if name == "classification":
        from bigjax.tasks.classification import Classification

        return Classification(config)
    raise ConfigError(f"config.task.name={name!r} is not a known task")


def means(sums: dict) -> dict:
    """Every mean-type entry of `sums` divided by the count (jit-safe; for the per-step metrics)."""
    count = jnp.maximum(sums["count"], 1.0)
    return {key: value / count for key, value in sums.items() if key not in NON_MEAN_SUMS and jnp.ndim(value) == 0}


def add_sums(a: dict | None, b: dict) -> dict:
    return b if a is None else jax.tree.map(jnp.add, a, b)
