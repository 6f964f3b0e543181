"""Causal language modelling: next-token cross-entropy, accuracy, perplexity, bits per byte/char, FLOPs.

A batch is {"inputs": int32 [b, t], "targets": int32 [b, t], "weights": float32 [b, t]}; weight 0 marks
padding. Losses are returned as sums with their token count (see bigjax.tasks), so that microbatches, devices
and eval batches combine exactly: the mean is taken once, at the end.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from bigjax.models.gpt import GPT, GPTConfig, parameter_count


class CausalLM:
    def __init__(self, config):
        self.model_config = GPTConfig.from_config(config.model)
        self.model = GPT(self.model_config)
        self.seq_len = config.data.seq_len
        self.tokens_per_example = self.seq_len

    def init_variables(self, rng):
        tokens = jnp.zeros((1, self.seq_len), jnp.int32)
        return self.model.init({"params": rng}, tokens)

    def batch_spec(self, batch_size: int) -> dict:
        shape = (batch_size, self.seq_len)
        return {
            "inputs": jax.ShapeDtypeStruct(shape, jnp.int32),
            "targets": jax.ShapeDtypeStruct(shape, jnp.int32),
            "weights": jax.ShapeDtypeStruct(shape, jnp.float32),
        }

    def loss_sums(self, params, model_state, batch, rng=None, train: bool = False):
        rngs = {"dropout": rng} if train and rng is not None else {}
        logits = self.model.apply({"params": params}, batch["inputs"], train=train, rngs=rngs)
        return token_loss_sums(logits, batch["targets"], batch["weights"]), model_state

    def summarize(self, sums: dict, data_stats: dict | None = None) -> dict:
        return summarize(sums, **(data_stats or {}))

    def flops_per_example(self) -> float:
        return flops_per_token(self.model_config, self.seq_len) * self.seq_len

    def causal_flops_per_example(self) -> float:
        return flops_per_token(self.model_config, self.seq_len, causal_attention=True) * self.seq_len


def token_loss_sums(logits, targets, weights) -> dict:
    """fp32 cross-entropy summed over the weighted tokens, plus the counts the metrics need."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    weights = weights.astype(jnp.float32)
    correct = (jnp.argmax(logits, axis=-1) == targets) * weights
    return {"loss": jnp.sum(losses * weights), "accuracy": jnp.sum(correct), "count": jnp.sum(weights)}


def summarize(sums: dict, bytes_per_token: float | None = None, chars_per_token: float | None = None) -> dict:
    """Sums (possibly added over many batches) -> the metrics people read."""
    tokens = max(float(sums["count"]), 1.0)
    loss = float(sums["loss"]) / tokens
    metrics = {
        "loss": loss,
        "accuracy": float(sums["accuracy"]) / tokens,
        "perplexity": math.exp(min(loss, 700.0)),
        "bits_per_token": loss / math.log(2),
    }
    if bytes_per_token:
        metrics["bits_per_byte"] = metrics["bits_per_token"] / bytes_per_token
    if chars_per_token:
        metrics["bits_per_char"] = metrics["bits_per_token"] / chars_per_token
    return metrics


def flops_per_token(cfg: GPTConfig, seq_len: int, causal_attention: bool = False) -> float:
    """Training FLOPs per token by the PaLM formula: 6N for the matmuls plus 12·L·H·Q·T for attention.

    N counts the weights that multiply activations (the token-embedding lookup and learned positions do
    not; a tied embedding counts once, as the output projection). By default attention is counted unmasked,
    as PaLM and nanoGPT do. `causal_attention` counts only the half of the score matrix a causal mask keeps,
    as MaxText does: 6N + 6·L·H·Q·T. The first is the figure to compare with nanoGPT's MFU, the second with
    MaxText's.
    """
    n = parameter_count(cfg)["matmul"]
    attention = 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len
    return float(6 * n + (attention / 2 if causal_attention else attention))
