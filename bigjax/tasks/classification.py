"""Classification of images or of text: cross-entropy with optional label smoothing, top-1 and top-5 accuracy,
and per-class counts in eval.

Image batches are {"image": float32 [b, h, w, c], "labels": int32 [b], "label_weights": float32 [b]}. Text
batches pack several examples per row: {"tokens", "segment_ids", "positions": int32 [b, t], "labels": int32
[b, s], "label_weights": float32 [b, s]}, where labels[:, k-1] is the class of segment k (see bigjax.data). The
model returns logits of shape labels.shape + (num_classes,); weight 0 marks padding.

The model comes from the family's module (bigjax.families): every family's module in bigjax/models defines
`make_classifier(model_config, num_classes) -> nn.Module`; text families also take `max_segments`, the number
of examples a row may pack (they return that many rows of logits).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bigjax import families
from bigjax.compress.quantized import quantized
from bigjax.compress.variant import Variant
from bigjax.config import ConfigError


def make_classifier(model_config, num_classes: int, **text_options):
    """The family's classifier (make_task has checked that the family serves classification)."""
    return families.FAMILIES[model_config.family].models().make_classifier(model_config, num_classes, **text_options)


class Classification:
    def __init__(self, config):
        if config.task.num_classes < 2:
            raise ConfigError(f"config.task.num_classes must be at least 2, got {config.task.num_classes}")
        self.num_classes = config.task.num_classes
        self.label_smoothing = config.task.label_smoothing
        self.images = families.is_image(config.model.family)
        if self.images and config.data.image_size <= 0:
            raise ConfigError(
                f"config.data.image_size must be set for the image model {config.model.family!r} "
                "(the height and width the data pipeline resizes images to)"
            )
        text_options = {} if self.images else dict(max_segments=config.data.max_segments)
        # Which model (float, QAT, PTQ, LoRA, QLoRA), made once here from config.quant and config.lora: every later
        # question about it asks this value (bigjax.compress.variant), and the model is built as it says.
        self.variant = variant = Variant.of(config)
        self.model = quantized(make_classifier(config.model, self.num_classes, **text_options), variant)
        self.seq_len = config.data.seq_len
        self.max_segments = config.data.max_segments
        self.image_shape = (config.data.image_size, config.data.image_size, config.data.channels)
        self.tokens_per_example = 0 if self.images else self.seq_len

    def batch_spec(self, batch_size: int) -> dict:
        if self.images:
            return {
                "image": jax.ShapeDtypeStruct((batch_size, *self.image_shape), jnp.float32),
                "labels": jax.ShapeDtypeStruct((batch_size,), jnp.int32),
                "label_weights": jax.ShapeDtypeStruct((batch_size,), jnp.float32),
            }
        rows, labels = (batch_size, self.seq_len), (batch_size, self.max_segments)
        return {
            "tokens": jax.ShapeDtypeStruct(rows, jnp.int32),
            "segment_ids": jax.ShapeDtypeStruct(rows, jnp.int32),
            "positions": jax.ShapeDtypeStruct(rows, jnp.int32),
            "labels": jax.ShapeDtypeStruct(labels, jnp.int32),
            "label_weights": jax.ShapeDtypeStruct(labels, jnp.float32),
        }

    def _inputs(self, batch) -> tuple:
        if self.images:
            return (batch["image"],)
        return batch["tokens"], batch["segment_ids"], batch["positions"]

    def init_variables(self, rng):
        batch = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), self.batch_spec(1))
        return self.model.init({"params": rng, "dropout": rng}, *self._inputs(batch), train=False)

    def loss_sums(self, params, model_state, batch, rng=None, train: bool = False, teacher=None):
        """`teacher` (a bigjax.compress.distill.TeacherInStep, in the train step of a distillation) classifies the same
        examples in inference mode (its BatchNorm statistics as saved): soft targets for each weighted label."""
        rngs = {"dropout": rng} if train and rng is not None else {}
        variables = {"params": params, **model_state}
        inputs = self._inputs(batch)
        if train and model_state:  # BatchNorm: use and update the batch statistics
            logits, updates = self.model.apply(variables, *inputs, train=True, rngs=rngs, mutable=list(model_state))
            model_state = dict(updates)
        else:
            logits = self.model.apply(variables, *inputs, train=train, rngs=rngs)
        sums = classification_sums(
            logits, batch["labels"], batch["label_weights"], self.num_classes, self.label_smoothing
        )
        if teacher is not None:
            teacher_logits = teacher.task.logits(teacher.variables, batch)
            sums = teacher.distilled_sums(sums, logits, teacher_logits, batch["label_weights"])
        return sums, model_state

    def logits(self, variables, batch):
        """fp32 logits [..., num_classes] of a batch, in inference mode (a teacher's: no dropout, saved statistics)."""
        return self.model.apply(variables, *self._inputs(batch), train=False)

    def summarize(self, sums: dict, data_stats: dict | None = None) -> dict:
        count = max(float(sums["count"]), 1.0)
        metrics = {key: float(value) / count for key, value in sums.items() if np.ndim(value) == 0}
        metrics.pop("count")
        # Per class: how many eval examples it has and how many of them were classified right.
        for label, (total, right) in enumerate(zip(sums["class_count"], sums["class_correct"], strict=True)):
            metrics[f"class_{label}_count"] = float(total)
            metrics[f"class_{label}_accuracy"] = float(right) / max(float(total), 1.0)
        return metrics

    def flops_per_example(self) -> float:
        """Training FLOPs of one example: 3x the forward pass, as counted by XLA's cost model once."""
        batch = self.batch_spec(1)
        variables = jax.eval_shape(self.init_variables, jax.random.key(0))
        inputs = self._inputs(batch)
        lowered = jax.jit(lambda v, *x: self.model.apply(v, *x, train=False)).lower(variables, *inputs)
        cost = lowered.cost_analysis() or {}
        return 3.0 * float(cost.get("flops", 0.0))


def classification_sums(logits, labels, weights, num_classes: int, label_smoothing: float = 0.0) -> dict:
    """Sums of the (smoothed) cross-entropy, top-1/top-5 hits and per-class counts over the weighted labels."""
    logits = logits.astype(jnp.float32)
    targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)
    losses = optax.softmax_cross_entropy(logits, targets)
    weights = weights.astype(jnp.float32)
    top1 = jnp.argmax(logits, axis=-1) == labels
    sums = {
        "loss": jnp.sum(losses * weights),
        "accuracy": jnp.sum(top1 * weights),
        "count": jnp.sum(weights),
    }
    if num_classes > 5:
        top5 = jnp.any(jax.lax.top_k(logits, 5)[1] == labels[..., None], axis=-1)
        sums["top5_accuracy"] = jnp.sum(top5 * weights)
    one_hot = jax.nn.one_hot(labels, num_classes) * weights[..., None]
    sums["class_count"] = one_hot.reshape(-1, num_classes).sum(0)
    sums["class_correct"] = (one_hot * top1[..., None]).reshape(-1, num_classes).sum(0)
    return sums
