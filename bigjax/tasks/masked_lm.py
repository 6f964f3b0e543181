"""Masked language modelling (BERT): choose 15% of the tokens, corrupt them 80/10/10, predict the originals.

A batch packs several examples per row: {"tokens", "segment_ids", "positions": int32 [b, t]} (segment 0 is
padding; see bigjax.data). The masking happens here, inside the jitted step, from an rng folded from (seed, step),
never in the data pipeline: the data stays a pure function of the step, a resumed run masks exactly as the
uninterrupted one would, and each epoch sees new masks. Evaluation masks each row by a key of its own tokens: the
same masks at every evaluation, whatever the batch size.

Like BERT, each row gets round(mask_rate x its real tokens) predictions (special tokens are never chosen), at
most `max_predictions = ceil(mask_rate x seq_len)`; of the chosen tokens 80% become the mask token, 10% a random
ordinary token and 10% stay as they are. Only the chosen positions go through the vocabulary projection, and loss
and accuracy count them alone: a row of padding alone (segment 0 throughout) counts for nothing.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from bigjax.compress.quantized import quantized
from bigjax.compress.variant import Variant
from bigjax.config import ConfigError
from bigjax.data import make_tokenizer
from bigjax.models.bert import BertConfig, BertMLM
from bigjax.models.gpt import parameter_count
from bigjax.tasks import causal_lm

MASK_FRACTION, RANDOM_FRACTION = 0.8, 0.1  # of the chosen tokens; the remaining 10% are kept


class MaskedLM:
    def __init__(self, config):
        tokenizer = make_tokenizer(config.data.tokenizer)
        if config.model.vocab_size < tokenizer.vocab_size:
            raise ConfigError(
                f"config.model.vocab_size={config.model.vocab_size} is smaller than the vocabulary of tokenizer "
                f"{config.data.tokenizer!r} ({tokenizer.vocab_size} with its special tokens); raise it"
            )
        self.model_config = BertConfig.from_config(config.model)
        # Which model (float, QAT, PTQ, LoRA, QLoRA), made once here from config.quant and config.lora: every later
        # question about it asks this value (bigjax.compress.variant), and the model is built as it says.
        self.variant = variant = Variant.of(config)
        self.model = quantized(BertMLM(self.model_config), variant)
        self.seq_len = config.data.seq_len
        self.tokens_per_example = self.seq_len
        self.mask_rate = config.task.mask_rate
        self.max_predictions = math.ceil(self.mask_rate * self.seq_len)
        self.mask_id = tokenizer.special_ids["mask"]
        self.special_ids = np.array(sorted(set(tokenizer.special_ids.values())), np.int32)
        # A "random" replacement is an ordinary token: never a special one, never the model's vocabulary padding.
        self.ordinary_ids = np.setdiff1d(np.arange(tokenizer.vocab_size, dtype=np.int32), self.special_ids)
        self.eval_key = jax.random.fold_in(jax.random.key(config.seed), 2)

    def batch_spec(self, batch_size: int) -> dict:
        shape = (batch_size, self.seq_len)
        return {key: jax.ShapeDtypeStruct(shape, jnp.int32) for key in ("tokens", "segment_ids", "positions")}

    def init_variables(self, rng):
        batch = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), self.batch_spec(1))
        predict_at = jnp.zeros((1, self.max_predictions), jnp.int32)
        return self.model.init(
            {"params": rng}, batch["tokens"], batch["segment_ids"], batch["positions"], predict_at=predict_at
        )

    def loss_sums(self, params, model_state, batch, rng=None, train: bool = False, teacher=None):
        """`teacher` (a bigjax.compress.distill.TeacherInStep, in the train step of a distillation) reads the same
        corrupted
        rows and predicts at the same chosen positions: its soft targets are for exactly the tokens scored."""
        masking = (self.mask_rate, self.max_predictions, self.mask_id, self.special_ids, self.ordinary_ids)
        if rng is None:
            # Evaluation: each row masked by a key of its own tokens, so an example gets the same masks at every
            # evaluation whatever batch it is in, and the eval metrics do not depend on the batch size.
            row_keys = jax.vmap(lambda row: jax.random.fold_in(self.eval_key, jnp.sum(row).astype(jnp.uint32)))
            keys = row_keys(batch["tokens"])
            masked = mask_each_row(keys, batch["tokens"], batch["segment_ids"], *masking)
            dropout_rng = self.eval_key
        else:
            mask_rng, dropout_rng = jax.random.split(rng)
            masked = mask_tokens(mask_rng, batch["tokens"], batch["segment_ids"], *masking)
        corrupted, predict_at, targets, weights = masked
        rows = (corrupted, batch["segment_ids"], batch["positions"], predict_at)
        logits = self.logits(params, *rows, train=train, rngs={"dropout": dropout_rng} if train else {})
        sums = causal_lm.token_loss_sums(logits, targets, weights)
        if teacher is not None:
            sums = teacher.distilled_sums(sums, logits, teacher.task.logits(teacher.params, *rows), weights)
        return sums, model_state

    def logits(self, params, tokens, segment_ids, positions, predict_at, train: bool = False, rngs=None):
        """fp32 logits [b, P, padded_vocab] at the positions `predict_at` [b, P] of the (corrupted) rows."""
        return self.model.apply(
            {"params": params},
            tokens,
            segment_ids,
            positions,
            train=train,
            predict_at=predict_at,
            rngs=rngs or {},
        )

    def summarize(self, sums: dict, data_stats: dict | None = None) -> dict:
        return causal_lm.summarize(sums)  # per-byte/char figures mean nothing when 15% of tokens are scored

    def flops_per_example(self) -> float:
        """6N per token for the encoder's matmuls plus attention (as causal_lm counts it), and the masked-LM
        head (transform and vocabulary projection) on the predicted positions only."""
        c = self.model_config
        per_token = 6 * parameter_count(c)["layers"] + 12 * c.num_layers * c.num_heads * c.head_dim * self.seq_len
        head = 6 * (c.d_model * c.d_model + c.d_model * c.vocab_size)
        return per_token * self.seq_len + head * self.max_predictions


def mask_each_row(keys, tokens, segment_ids, *masking):
    """`mask_tokens` with a key for each row [b]: a row's masks do not depend on the rows beside it."""

    def one_row(key, row_tokens, row_segment_ids):
        return tuple(x[0] for x in mask_tokens(key, row_tokens[None], row_segment_ids[None], *masking))

    return jax.vmap(one_row)(keys, tokens, segment_ids)


def mask_tokens(rng, tokens, segment_ids, rate, max_predictions, mask_id, special_ids, ordinary_ids):
    """BERT's corruption of a batch of packed rows.

    Returns (corrupted tokens [b, t], predict_at [b, P] positions, targets [b, P] original tokens, weights
    [b, P]: 1 for the chosen positions, 0 for the unused tail of P).
    """
    choose_rng, action_rng, random_rng = jax.random.split(rng, 3)
    tokens = jnp.asarray(tokens)
    eligible = (segment_ids > 0) & ~jnp.isin(tokens, special_ids)
    num_eligible = eligible.sum(axis=-1)
    # round(rate * n), at least one where the row has any real token, at most P.
    num_chosen = jnp.clip(jnp.round(rate * num_eligible), jnp.minimum(num_eligible, 1), max_predictions)

    # The eligible positions in a random order: the first num_chosen of them are this row's predictions.
    priority = jnp.where(eligible, jax.random.uniform(choose_rng, tokens.shape), 2.0)
    predict_at = jax.lax.top_k(-priority, max_predictions)[1]
    weights = (jnp.arange(max_predictions) < num_chosen[:, None]).astype(jnp.float32)
    targets = jnp.take_along_axis(tokens, predict_at, axis=1)

    action = jax.random.uniform(action_rng, predict_at.shape)
    random_tokens = jnp.asarray(ordinary_ids)[jax.random.randint(random_rng, predict_at.shape, 0, len(ordinary_ids))]
    replacement = jnp.where(
        action < MASK_FRACTION, mask_id, jnp.where(action < MASK_FRACTION + RANDOM_FRACTION, random_tokens, targets)
    )
    replacement = jnp.where(weights > 0, replacement, targets)  # the unused tail writes back what was there
    rows = jnp.arange(tokens.shape[0])[:, None]
    corrupted = tokens.at[rows, predict_at].set(replacement.astype(tokens.dtype), unique_indices=True)
    return corrupted, predict_at, targets, weights
