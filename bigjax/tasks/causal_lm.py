"""Causal language modelling: next-token cross-entropy, accuracy, perplexity, bits per byte/char, FLOPs.

A batch is {"inputs": int32 [b, t], "targets": int32 [b, t], "weights": float32 [b, t]}; weight 0 marks
padding. In zig-zag order (bigjax.config.balances_context: the sequence split over mesh.context, load-balanced) it
also holds "positions": int32 [b, t], each token's place in the original order, and every array is reordered alike.
Losses are returned as sums with their token count (see bigjax.tasks), so that microbatches, devices and eval
batches combine exactly (and a zig-zag batch's sums are its original order's): the mean is taken once, at the end.

`config.task.loss_chunk=k` takes the loss k positions at a time (`chunked_token_loss_sums`), so that the
[b, t, padded_vocab] logits, their fp32 copy and their gradient never exist whole; 0 (the default) makes them
in one piece.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from bigjax import config as config_lib
from bigjax.compress.quantized import quantized
from bigjax.compress.variant import Variant
from bigjax.models import moe
from bigjax.models.gpt import GPT, GPTConfig, GPTHiddenStates, parameter_count
from bigjax.models.layers import constrain


class CausalLM:
    def __init__(self, config):
        self.model_config = GPTConfig.from_config(config.model)
        # Which model (float, QAT, PTQ, LoRA, QLoRA), made once here from config.quant and config.lora: every later
        # question about it asks this value (bigjax.compress.variant), and the model is built as it says.
        self.variant = variant = Variant.of(config)
        self.model = quantized(GPT(self.model_config), variant)
        self.seq_len = config.data.seq_len
        self.tokens_per_example = self.seq_len
        self.loss_chunk = config.task.loss_chunk
        self.has_positions = config_lib.balances_context(config)

    def init_variables(self, rng):
        tokens = jnp.zeros((1, self.seq_len), jnp.int32)
        return self.model.init({"params": rng}, tokens)

    def batch_spec(self, batch_size: int) -> dict:
        shape = (batch_size, self.seq_len)
        spec = {
            "inputs": jax.ShapeDtypeStruct(shape, jnp.int32),
            "targets": jax.ShapeDtypeStruct(shape, jnp.int32),
            "weights": jax.ShapeDtypeStruct(shape, jnp.float32),
        }
        if self.has_positions:
            spec["positions"] = jax.ShapeDtypeStruct(shape, jnp.int32)
        return spec

    def loss_sums(self, params, model_state, batch, rng=None, train: bool = False, teacher=None):
        """`teacher` (a bigjax.compress.distill.TeacherInStep, in the train step of a distillation) adds its soft
        targets
        at the same weighted tokens: in one piece, or `loss_chunk` positions at a time alike."""
        rngs = {"dropout": rng} if train and rng is not None else {}
        inputs, targets, weights = batch["inputs"], batch["targets"], batch["weights"]
        positions = batch.get("positions")  # None: the tokens in their order
        if not self.loss_chunk:
            logits, sown = self.apply_sowing(self.model, params, inputs, train, rngs, positions)
            sums = token_loss_sums(logits, targets, weights)
            if teacher is not None:
                sums = teacher.distilled_sums(
                    sums, logits, teacher.task.logits(teacher.params, inputs, positions=positions), weights
                )
            return self.with_router_losses(sums, sown, train), model_state
        (hidden, kernel), sown = self.hidden_and_kernel(params, inputs, train, rngs, positions, sown=True)
        teacher_pieces = (
            None if teacher is None else teacher.task.hidden_and_kernel(teacher.params, inputs, positions=positions)
        )
        sums = chunked_token_loss_sums(hidden, kernel, targets, weights, self.loss_chunk, teacher, teacher_pieces)
        return self.with_router_losses(sums, sown, train), model_state

    def apply_sowing(self, model, params, inputs, train: bool, rngs, positions=None):
        """(model's output, what its MoE layers sowed: {} without MoE), the tokens at `positions` (None: in order)."""
        options = dict(train=train, positions=positions, rngs=rngs or {})
        if self.model_config.moe is None:
            return model.apply({"params": params}, inputs, **options), {}
        out, sown = model.apply({"params": params}, inputs, mutable=["intermediates"], **options)
        return out, sown["intermediates"]

    def with_router_losses(self, sums: dict, sown, train: bool) -> dict:
        """A MoE model's sums with its router statistics (`moe_*`, as sums: each times the token count, so that
        their means are the statistics) and, in training, the weighted router losses added to the loss: what the
        gradient follows. Evaluation's loss stays the cross-entropy alone."""
        if self.model_config.moe is None:
            return sums
        stats, c = moe.model_stats(sown), self.model_config.moe
        count = sums["count"]
        sums = {**sums, **{f"moe_{key}": value * count for key, value in stats.items()}}
        if train:
            router_loss = c.router_aux_loss * stats["aux_loss"] + c.router_z_loss * stats["z_loss"]
            sums["loss"] = sums["loss"] + count * router_loss
        return sums

    def logits(self, params, inputs, train: bool = False, rngs=None, positions=None):
        """fp32 logits [b, t, padded_vocab] of the tokens `inputs` [b, t] at `positions` [b, t] (None: in order)."""
        return self.model.apply({"params": params}, inputs, train=train, positions=positions, rngs=rngs or {})

    def hidden_and_kernel(self, params, inputs, train: bool = False, rngs=None, positions=None, sown: bool = False):
        """The final hidden states [b, t, d] and the output kernel [d, padded_vocab], in the compute dtype: what the
        chunked loss multiplies a piece at a time. The same parameter paths as `self.model`, so the same parameters
        and the same dropout masks. `sown=True` returns ((hidden, kernel), what the MoE layers sowed)."""
        model = quantized(GPTHiddenStates(self.model_config), self.variant)
        (hidden, kernel), sown_stats = self.apply_sowing(model, params, inputs, train, rngs, positions)
        # Cast as GPT's output layer casts, once, outside the loop over pieces; and gather an FSDP-split kernel
        # there too, or XLA gathers it inside the loop, once per piece.
        hidden, kernel = hidden.astype(self.model_config.dtype), kernel.astype(self.model_config.dtype)
        pieces = hidden, constrain(kernel, "activation_embed", "activation_vocab")
        return (pieces, sown_stats) if sown else pieces

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


def chunked_token_loss_sums(hidden, kernel, targets, weights, chunk: int, teacher=None, teacher_pieces=None) -> dict:
    """`token_loss_sums` of the logits `hidden @ kernel`, computed `chunk` positions at a time.

    hidden: [b, t, d], kernel: [d, vocab], both in the compute dtype; t must be a multiple of `chunk`. A scan over
    the t / chunk pieces of the sequence adds up each piece's sums; each piece's body is rematerialized, so the
    backward pass keeps only the piece's hidden states and recomputes its logits (one extra [b, chunk, d] x
    [d, vocab] matmul per piece) instead of keeping the fp32 logits of the whole sequence. Pieces are cut along
    the sequence, so the batch stays split over the data-parallel axes and the vocabulary over `tensor`.

    Distilling, `teacher_pieces` are the teacher's (hidden [b, t, d_teacher], kernel): its logits are made a piece
    at a time beside the student's, so that neither model's full logits ever exist.
    """
    b, t = targets.shape

    def pieces(x):  # [b, t, ...] -> [t / chunk, b, chunk, ...]: the scan runs over the leading axis
        return jnp.moveaxis(x.reshape(b, t // chunk, chunk, *x.shape[2:]), 1, 0)

    def piece_logits(x, kernel):
        x = constrain(x, "activation_batch", "activation_length", "activation_embed")
        return constrain(x @ kernel, "activation_batch", "activation_length", "activation_vocab")

    @jax.checkpoint
    def add_piece(sums, piece):
        x, piece_targets, piece_weights, *teacher_x = piece
        logits = piece_logits(x, kernel)
        piece_sums = token_loss_sums(logits.astype(jnp.float32), piece_targets, piece_weights)
        if teacher is not None:
            teacher_logits = piece_logits(teacher_x[0], teacher_pieces[1])
            piece_sums = teacher.distilled_sums(piece_sums, logits, teacher_logits, piece_weights)
        return jax.tree.map(jnp.add, sums, piece_sums), None

    keys = ("loss", "accuracy", "count") + (teacher.SUMS if teacher is not None else ())
    zeros = {key: jnp.zeros((), jnp.float32) for key in keys}
    scanned = (pieces(hidden), pieces(targets), pieces(weights))
    if teacher is not None:
        scanned += (pieces(teacher_pieces[0]),)
    sums, _ = jax.lax.scan(add_piece, zeros, scanned)
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
    metrics.update({key: float(value) / tokens for key, value in sums.items() if key.startswith("moe_")})
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
