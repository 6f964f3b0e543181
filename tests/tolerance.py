"""How far apart float32 results computed in another order may be: the tolerances of the equivalence tests.

Another mesh, another batch grouping, a KV cache or rematerialization compute the same values with their sums added
in another order (per device and then across devices, per piece and then piece by piece). Rounding makes results
differ in their last bits; the bounds here say by how much at most, so that a test fails only when the code is wrong.

The bound: a float32 sum of n terms, in any order, is within gamma(n-1) ~ (n-1) * EPS32/2 of the exact sum, relative
to the sum of the terms' magnitudes (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., eq. 4.4); two
orders are within (n-1) * EPS32 of each other. For sums of products of sums, as in a network, the bounds of the
nested sums add (to first order): a value's tolerance counts the terms of every sum it went through.

What the magnitudes of the terms are is not known without redoing the computation; the tests take the magnitude
scale of the compared quantity instead: each leaf's largest magnitude (of a gradient, or of an update).
"""

import jax
import numpy as np

EPS32 = float(np.finfo(np.float32).eps)  # 2^-23: the gap between 1 and the next float32


def float32_sum_tolerance(*lengths: int) -> float:
    """Relative to the magnitude of the terms: how far apart two float32 computations of the same nested sums, of
    these lengths, added in different orders, can be: sum of (n - 1) * EPS32."""
    return sum(max(n - 1, 1) for n in lengths) * EPS32


def transformer_sum_lengths(tokens: int, vocab: int, d_model: int, mlp_dim: int, seq_len: int, layers: int) -> list:
    """The sums a Transformer's loss and gradient go through: over the batch's tokens (the gradient), over the
    vocabulary (the softmax) and the width of the output layer, and in each layer over the width three times (q/k/v,
    the attention output, the norm), the MLP's hidden width and the keys a query sees."""
    return [tokens, vocab, d_model] + [3 * d_model + mlp_dim + seq_len] * layers


def lm_sum_lengths(config, tokens: int) -> list:
    """transformer_sum_lengths of the GPT or BERT model of `config` (its vocabulary padded as the model pads it;
    a classifier's few classes are fewer than the vocabulary its embedding keeps)."""
    from bigjax.models.gpt import GPTConfig

    c = GPTConfig.from_config(config.model)
    return transformer_sum_lengths(tokens, c.vocab_size, c.d_model, c.mlp_dim, config.data.seq_len, c.num_layers)


def attention_tolerance(head_dim: int, keys: int, groups: int, blocks: int, logit_bound: float) -> float:
    """How far apart two float32 computations of softmax self-attention over `keys` tokens and its gradients may be,
    one with the keys whole and the other in `blocks` blocks (gathered from devices, or round a ring with an online
    softmax), relative to each result's magnitude. `groups` query heads share a key head; no score exceeds
    `logit_bound` in magnitude.

    The sums: a score sums head_dim products; the softmax's normalizer and the weighted sum of values sum over the
    keys; going back, a score's gradient sums head_dim products twice (d_out.v, and d_out.out, the softmax's own
    term), dq sums over the keys, dk and dv over the queries of every head of their group (keys x groups); the block
    by block computation rescales its running sums once per block (a product of `blocks` rounded factors).

    And the exponentials, where no sum counts the error: a weight is exp(score - max), with another max per block
    and then exp(block max - max) on top. An argument |x| <= 2 logit_bound rounded by EPS32/2 relative moves exp(x)
    by EPS32 logit_bound relative; each exp is within an ulp (EPS32) of exact, two exps per weight.
    """
    sums = float32_sum_tolerance(head_dim, head_dim, head_dim, keys, keys, keys * groups, blocks)
    return sums + (logit_bound + 2) * EPS32


def leaf_atols(reference, tolerance: float, at_tree_scale: bool = False) -> list:
    """The absolute tolerance of each leaf: `tolerance` times the leaf's largest magnitude, which stands for the
    magnitude of the terms that were summed into it. A leaf that is no larger than the tolerance of the whole tree's
    largest magnitude is rounding noise of a value that is 0 in exact arithmetic (the gradient of attention's key
    bias: softmax ignores a shift shared by every key): its terms are as large as the tree's, so is its scale.
    `at_tree_scale`: every leaf at the tree's scale, where every leaf's terms may be as large as the tree's."""
    scales = [float(np.max(np.abs(leaf), initial=0.0)) for leaf in jax.tree.leaves(reference)]
    tree_scale = max(scales, default=0.0)
    keeps_own = lambda scale: scale > tolerance * tree_scale and not at_tree_scale
    return [tolerance * (scale if keeps_own(scale) else tree_scale) for scale in scales]


def norm_atol(reference, tolerance: float) -> float:
    """How far the global norm of a tree within leaf_atols of `reference` can be from `reference`'s own: no further
    than the norm of the difference (the triangle inequality), at most sqrt(sum of size x atol^2) over the leaves."""
    sizes = [np.size(leaf) for leaf in jax.tree.leaves(reference)]
    return float(np.sqrt(sum(n * atol**2 for n, atol in zip(sizes, leaf_atols(reference, tolerance), strict=True))))


def assert_close_after_reordering(tree, reference, tolerance: float, what: str) -> None:
    """Every leaf of `tree` within its leaf_atols bound of `reference`'s."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    wanted = [np.asarray(leaf, np.float64) for leaf in jax.tree.leaves(reference)]
    for (path, leaf), want, atol in zip(leaves, wanted, leaf_atols(wanted, tolerance), strict=True):
        where = f"{what}: {jax.tree_util.keystr(path)} (bound {atol:.3g})"
        np.testing.assert_allclose(np.asarray(leaf, np.float64), want, rtol=0, atol=atol, err_msg=where)


def assert_sgd_params_close_after_reordering(
    params, reference, initial, tolerance: float, steps: int, what: str, batchnorm: bool = False
):
    """Parameters after `steps` SGD steps from the same `initial` ones. SGD's update is linear in the gradient (the
    learning rate and momentum only scale it), so the updates (params - initial) are compared as the gradients are,
    at the scale of each leaf's update; and each step's params + update is rounded once more in each run, by at most
    EPS32/2 of the parameter.

    `batchnorm`: every leaf at the scale of the largest update (leaf_atols' tree scale). Going back through
    BatchNorm, a gradient is the upstream gradient less its mean over the batch and its projection on the normalized
    activations: a difference of terms as large as the upstream gradient, however small the result (seen: a norm's
    bias in the last stage of a ResNet on another mesh, 5.6 times the bound at its own update's scale away, 0.84 of
    the bound at the tree's)."""
    as_updates = lambda tree: jax.tree.map(lambda p, p0: np.asarray(p, np.float64) - p0, tree, initial)
    atols = leaf_atols(as_updates(reference), tolerance, at_tree_scale=batchnorm)
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    for (path, leaf), want, atol in zip(leaves, jax.tree.leaves(reference), atols, strict=True):
        where = f"{what}: {jax.tree_util.keystr(path)} (bound {atol:.3g} + {steps} x EPS32 x |parameter|)"
        np.testing.assert_allclose(leaf, want, rtol=steps * EPS32, atol=atol, err_msg=where)


def image_sum_lengths(config) -> list:
    """The float32 sums an image classifier's logits go through (convolution windows, dense widths, attention),
    counted generously: each layer's longest."""
    m, image = config.model, config.data.image_size
    if m.family == "vit":
        d = m.d_model
        return [m.patch_size**2 * config.data.channels, d] + [3 * d + m.mlp_dim + image**2] * m.num_layers
    if m.family == "cnn":
        widths = [config.data.channels, *m.features]
        return [9 * w for w in widths[:-1]] + [widths[-1] * (image // 2 ** len(m.features)) ** 2, m.hidden_dim]
    return [49 * config.data.channels] + [9 * m.width * 8] * 2 * 8 + [image**2, m.width * 8]
