"""Causal language modelling: next-token cross-entropy, accuracy, perplexity, bits per byte/char, FLOPs.

A batch is {"inputs": int32 [b, t], "targets": int32 [b, t], "weights": float32 [b, t]}; weight 0 marks
padding. Losses are returned as sums with their token count (see bigjax.tasks), so that microbatches, devices
and eval batches combine exactly: the mean is taken once, at the end.

`config.task.loss_chunk=k` takes the loss k positions at a time (`chunked_token_loss_sums`), so that the
[b, t, padded_vocab] logits, their fp32 copy and their gradient never exist whole; 0 (the default) makes them
in one piece.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from bigjax.models.gpt import GPT, GPTConfig, GPTHiddenStates, parameter_count
from bigjax.models.layers import constrain
from bigjax.models.quantized import quantized


class CausalLM:
    def __init__(self, config):
        self.model_config = GPTConfig.from_config(config.model)
        self.quant = config.get("quant")
        self.model = quantized(GPT(self.model_config), self.quant)
        self.seq_len = config.data.seq_len
        self.tokens_per_example = self.seq_len
        self.loss_chunk = config.task.loss_chunk

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
        if not self.loss_chunk:
            logits = self.model.apply({"params": params}, batch["inputs"], train=train, rngs=rngs)
            return token_loss_sums(logits, batch["targets"], batch["weights"]), model_state
        # Same parameter paths, so the same parameters and the same dropout masks as self.model.
        hidden, kernel = quantized(GPTHiddenStates(self.model_config), self.quant).apply(
            {"params": params}, batch["inputs"], train=train, rngs=rngs
        )
        # Cast as GPT's output layer casts, once, outside the loop over pieces; and gather an FSDP-split kernel
        # there too, or XLA gathers it inside the loop, once per piece.
        hidden, kernel = hidden.astype(self.model_config.dtype), kernel.astype(self.model_config.dtype)
        kernel = constrain(kernel, "activation_embed", "activation_vocab")
        sums = chunked_token_loss_sums(hidden, kernel, batch["targets"], batch["weights"], self.loss_chunk)
        return sums, model_state

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


def chunked_token_loss_sums(hidden, kernel, targets, weights, chunk: int) -> dict:
    """`token_loss_sums` of the logits `hidden @ kernel`, computed `chunk` positions at a time.

    hidden: [b, t, d], kernel: [d, vocab], both in the compute dtype; t must be a multiple of `chunk`. A scan over
    the t / chunk pieces of the sequence adds up each piece's sums; each piece's body is rematerialized, so the
    backward pass keeps only the piece's hidden states and recomputes its logits (one extra [b, chunk, d] x
    [d, vocab] matmul per piece) instead of keeping the fp32 logits of the whole sequence. Pieces are cut along
    the sequence, so the batch stays split over the data-parallel axes and the vocabulary over `tensor`.
    """
    b, t = targets.shape

    def pieces(x):  # [b, t, ...] -> [t / chunk, b, chunk, ...]: the scan runs over the leading axis
        return jnp.moveaxis(x.reshape(b, t // chunk, chunk, *x.shape[2:]), 1, 0)

    @jax.checkpoint
    def add_piece(sums, piece):
        x, piece_targets, piece_weights = piece
        x = constrain(x, "activation_batch", "activation_length", "activation_embed")
        logits = constrain(x @ kernel, "activation_batch", "activation_length", "activation_vocab")
        piece_sums = token_loss_sums(logits.astype(jnp.float32), piece_targets, piece_weights)
        return jax.tree.map(jnp.add, sums, piece_sums), None

    zeros = {key: jnp.zeros((), jnp.float32) for key in ("loss", "accuracy", "count")}
    sums, _ = jax.lax.scan(add_piece, zeros, (pieces(hidden), pieces(targets), pieces(weights)))
    return sums


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
