"""Causal language modelling: next-token cross-entropy, accuracy, perplexity, bits per byte/char, FLOPs.

A batch is {"inputs": int32 [b, t], "targets": int32 [b, t], "weights": float32 [b, t]}; weight 0 marks
padding. Losses are returned as sums with their token count, so that microbatches, devices and eval batches
combine exactly: the mean is taken once, at the end.
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

    def init_params(self, rng):
        """Parameters, still boxed with their logical axis names."""
        tokens = jnp.zeros((1, self.seq_len), jnp.int32)
        return self.model.init({"params": rng}, tokens)["params"]

    def loss_sums(self, params, batch, rng=None, train: bool = False):
        """(sum of token losses, dict of sums) for one (micro)batch."""
        rngs = {"dropout": rng} if train and rng is not None else {}
        logits = self.model.apply({"params": params}, batch["inputs"], train=train, rngs=rngs)
        return token_loss_sums(logits, batch["targets"], batch["weights"])

    def flops_per_token(self) -> float:
        return flops_per_token(self.model_config, self.seq_len)


def token_loss_sums(logits, targets, weights):
    """fp32 cross-entropy summed over the weighted tokens, plus the counts the metrics need."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    weights = weights.astype(jnp.float32)
    loss_sum = jnp.sum(losses * weights)
    correct = jnp.sum((jnp.argmax(logits, axis=-1) == targets) * weights)
    return loss_sum, {"loss_sum": loss_sum, "correct": correct, "tokens": jnp.sum(weights)}


def summarize(sums: dict, bytes_per_token: float | None = None, chars_per_token: float | None = None) -> dict:
    """Sums (possibly added over many batches) -> the metrics people read."""
    tokens = max(float(sums["tokens"]), 1.0)
    loss = float(sums["loss_sum"]) / tokens
    metrics = {
        "loss": loss,
        "accuracy": float(sums["correct"]) / tokens,
        "perplexity": math.exp(min(loss, 700.0)),
        "bits_per_token": loss / math.log(2),
    }
    if bytes_per_token:
        metrics["bits_per_byte"] = metrics["bits_per_token"] / bytes_per_token
    if chars_per_token:
        metrics["bits_per_char"] = metrics["bits_per_token"] / chars_per_token
    return metrics


def flops_per_token(cfg: GPTConfig, seq_len: int) -> float:
    """Training FLOPs per token by the PaLM formula: 6N for the matmuls plus 12·L·H·Q·T for attention.

    N counts the weights that multiply activations (the token-embedding lookup and learned positions do
    not; a tied embedding counts once, as the output projection). Attention is counted unmasked, as PaLM
    and nanoGPT do; the causal-only count would halve the second term.
    """
    n = parameter_count(cfg)["matmul"]
    return 6 * n + 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len


def add_sums(a: dict | None, b: dict) -> dict:
    return b if a is None else jax.tree.map(jnp.add, a, b)
