"""The classification task's sums: smoothed cross-entropy, top-1/top-5, per-class counts, padding weights."""

import jax
import numpy as np
import optax
from tolerance import float32_sum_tolerance

from bigjax.tasks.classification import Classification, classification_sums


def test_sums_match_a_direct_computation_and_ignore_padding():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 10)).astype(np.float32)
    labels = np.array([0, 3, 3, 9, 1, 2], np.int32)
    weights = np.array([1, 1, 1, 1, 1, 0], np.float32)  # the last row is padding
    sums = jax.device_get(classification_sums(logits, labels, weights, 10, label_smoothing=0.1))

    targets = optax.smooth_labels(np.eye(10)[labels[:5]], 0.1)
    expected_loss = optax.softmax_cross_entropy(logits[:5], targets).sum()
    # The same terms (>= 0) summed in another order: over 5 rows, each a softmax over 10 classes.
    np.testing.assert_allclose(sums["loss"], expected_loss, rtol=float32_sum_tolerance(5, 10))
    assert sums["count"] == 5
    assert sums["accuracy"] == (logits[:5].argmax(-1) == labels[:5]).sum()
    top5 = [labels[i] in np.argsort(logits[i])[-5:] for i in range(5)]
    assert sums["top5_accuracy"] == sum(top5)
    np.testing.assert_array_equal(sums["class_count"], np.bincount(labels[:5], minlength=10))


def test_per_segment_labels_and_summary():
    logits = np.zeros((2, 3, 2), np.float32)
    logits[..., 1] = 1.0  # always predicts class 1
    labels = np.array([[1, 0, 0], [1, 1, 0]], np.int32)
    weights = np.array([[1, 1, 0], [1, 0, 0]], np.float32)  # row 0 has 2 segments, row 1 has 1
    sums = jax.device_get(classification_sums(logits, labels, weights, 2))
    assert "top5_accuracy" not in sums  # two classes: top-5 means nothing
    metrics = Classification.summarize(None, sums)
    assert metrics["accuracy"] == 2 / 3
    assert metrics["class_0_count"] == 1 and metrics["class_0_accuracy"] == 0
    assert metrics["class_1_count"] == 2 and metrics["class_1_accuracy"] == 1
