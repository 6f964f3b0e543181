"""Optimizers, learning-rate schedules and weight-decay masks, built from optax.

The entry points take the `optim` section of the experiment config
(an `ml_collections.ConfigDict`) and return plain optax objects:

* `make_schedule(cfg, total_steps)`: a pure, jit-safe function step -> lr.
* `make_optimizer(cfg, total_steps)`: the full gradient transformation
  (clipping, weight decay and the optimizer itself, in that order).
* `decay_mask(params)`: which parameter leaves receive weight decay.

With `frozen` (bigjax.compress.variant.Variant.frozen: config.freeze, LoRA's base) the parameters it marks are
routed to `optax.set_to_zero()` by `optax.multi_transform`: they get no optimizer state (no moments), and since the clip
and the optimizer only see the trainable ones, neither does the gradient norm.

With `prune` (a bigjax.compress.prune.Pruning, from config.prune) the trainable optimizer is wrapped by
`prune.pruned`: it
then trains the sparse model and keeps its masks in its state (inside the "trained" branch when there is a freeze).
"""

import functools
import re

import jax
import jax.numpy as jnp
import optax

from bigjax import params as params_lib
from bigjax.compress import prune as prune_lib

# --------------------------------------------------------------------------- #
# Schedules
# --------------------------------------------------------------------------- #


def _decay_steps(cfg, total_steps: int) -> int:
    # At least one step, so that degenerate configs (warmup >= total) still
    # yield a valid schedule instead of an optax error.
    return max(total_steps - cfg.warmup_steps, 1)


def _constant(cfg, total_steps: int) -> optax.Schedule:
    return optax.constant_schedule(cfg.lr)


def _cosine(cfg, total_steps: int) -> optax.Schedule:
    return optax.cosine_decay_schedule(cfg.lr, _decay_steps(cfg, total_steps), alpha=cfg.min_lr_ratio)


def _linear(cfg, total_steps: int) -> optax.Schedule:
    return optax.linear_schedule(cfg.lr, cfg.lr * cfg.min_lr_ratio, _decay_steps(cfg, total_steps))


def _stable_then_decay(cfg, total_steps: int) -> optax.Schedule:
    """WSD body: flat at lr, then linear decay over the last decay_fraction."""
    decay_start = max(round((1.0 - cfg.decay_fraction) * total_steps), cfg.warmup_steps)
    decay_steps = max(total_steps - decay_start, 1)
    stable_steps = decay_start - cfg.warmup_steps
    return optax.join_schedules(
        [
            optax.constant_schedule(cfg.lr),
            optax.linear_schedule(cfg.lr, cfg.lr * cfg.min_lr_ratio, decay_steps),
        ],
        boundaries=[stable_steps],
    )


# The schedule that runs after warmup (counting its steps from 0), by the names config.CHOICES["optim.schedule"]
# lists; config.check_values refuses any other.
SCHEDULES_AFTER_WARMUP = {"constant": _constant, "cosine": _cosine, "linear": _linear, "wsd": _stable_then_decay}


def make_schedule(optim_config, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `lr`, followed by the configured schedule."""
    body = SCHEDULES_AFTER_WARMUP[optim_config.schedule](optim_config, total_steps)
    if optim_config.warmup_steps <= 0:
        return body
    warmup = optax.linear_schedule(0.0, optim_config.lr, optim_config.warmup_steps)
    return optax.join_schedules([warmup, body], boundaries=[optim_config.warmup_steps])


# --------------------------------------------------------------------------- #
# Weight-decay mask
# --------------------------------------------------------------------------- #


def decay_mask(params, decay_embeddings: bool = False):
    """True for the leaves that get weight decay.

    Decided by name rather than ndim because nn.scan stacks layers, which gives
    1-D norm scales and biases a leading layer axis that makes them look like
    matrices.
    """

    def should_decay(path, _leaf) -> bool:
        name = params_lib.leaf_name(path)
        if name == "kernel" or re.search(params_lib.ADAPTERS, name):  # LoRA's adapters are kernels too
            return True
        if name == "embedding":
            return decay_embeddings
        return False

    return jax.tree_util.tree_map_with_path(should_decay, params)


# --------------------------------------------------------------------------- #
# Optimizers
# --------------------------------------------------------------------------- #


def _optional_momentum(momentum: float):
    # optax treats None as "no momentum buffer"; 0.0 would allocate a useless one.
    return momentum if momentum > 0 else None


def _mu_dtype(cfg):
    # The first moment in bfloat16 halves its memory and traffic; the second (v) stays fp32, since its small
    # values set the step size and lose too much in 8 mantissa bits. optax does the update math in fp32.
    return None if cfg.mu_dtype == "float32" else cfg.mu_dtype


def _adamw(cfg, lr, mask):
    return optax.adamw(
        lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=mask, mu_dtype=_mu_dtype(cfg)
    )


def _lion(cfg, lr, mask):
    # weight_decay must be passed explicitly: optax's default for lion is 1e-3.
    return optax.lion(lr, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=mask, mu_dtype=_mu_dtype(cfg))


def _adafactor(cfg, lr, mask):
    # optax's adafactor adds weight_decay_rate * param after the lr scaling, so
    # the rate is absolute. Scaling it by the schedule gives the same
    # lr * wd * param decay as adamw and lion, so `weight_decay` means one thing.
    wd = cfg.weight_decay
    rate = (lambda step: wd * lr(step)) if wd > 0 else None
    return optax.adafactor(lr, weight_decay_rate=rate, weight_decay_mask=mask)


def _adam(cfg, lr):
    return optax.adam(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, mu_dtype=_mu_dtype(cfg))


def _sgd(cfg, lr):
    return optax.sgd(lr, momentum=_optional_momentum(cfg.momentum), nesterov=cfg.nesterov)


def _adagrad(cfg, lr):
    return optax.adagrad(lr, eps=cfg.eps)


def _rmsprop(cfg, lr):
    return optax.rmsprop(lr, eps=cfg.eps, momentum=_optional_momentum(cfg.momentum))


# The optimizers, by the names config.CHOICES["optim.name"] lists (config.check_values refuses any other), in two
# tables. Those that implement decoupled weight decay themselves (given the mask):
DECOUPLED_DECAY = {"adamw": _adamw, "lion": _lion, "adafactor": _adafactor}
# Those without their own decay: they get classic L2, i.e. wd * param added
# to the gradient before the optimizer, as torch's `weight_decay` does for them.
L2_DECAY = {"adam": _adam, "sgd": _sgd, "adagrad": _adagrad, "rmsprop": _rmsprop}


def penalty_gradients(l1: float, l2: float, mask) -> optax.GradientTransformation:
    """The gradient of l1 * sum|w| + l2/2 * sum w^2 over the masked (kernel) weights, added to the loss's: an
    L1/L2 penalty in the loss, which the optimizer then treats like the rest of the gradient (unlike adamw's
    decoupled decay)."""

    def add_penalties(grads, params):
        return jax.tree.map(lambda g, w: g + l1 * jnp.sign(w) + l2 * w, grads, params)

    return optax.masked(optax.stateless(add_penalties), mask)


def make_optimizer(optim_config, total_steps: int, frozen=None, prune=None) -> optax.GradientTransformation:
    """(Penalties) -> clip -> (L2 decay) -> optimizer, with the lr following `make_schedule`, pruned as `prune` (a
    bigjax.compress.prune.Pruning or None) says; the parameters `frozen` (params -> a tree of bools,
    bigjax.compress.variant.Variant.frozen)
    marks get none of it."""
    tx = _trainable_optimizer(optim_config, total_steps)
    if prune is not None:
        tx = prune_lib.pruned(tx, prune)
    if frozen is None:
        return tx
    labels = lambda params: jax.tree.map(lambda fixed: "frozen" if fixed else "trained", frozen(params))
    return optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()}, labels)


def _trainable_optimizer(optim_config, total_steps: int) -> optax.GradientTransformation:
    name = optim_config.name
    lr = make_schedule(optim_config, total_steps)
    wd = optim_config.weight_decay
    # A callable mask lets optax derive it from the params at init time.
    mask = None
    if wd > 0:
        embeddings = bool(optim_config.decay_embeddings)
        mask = functools.partial(decay_mask, decay_embeddings=embeddings)

    chain = []
    if optim_config.l1_penalty or optim_config.l2_penalty:
        kernels = functools.partial(decay_mask, decay_embeddings=bool(optim_config.decay_embeddings))
        chain.append(penalty_gradients(optim_config.l1_penalty, optim_config.l2_penalty, kernels))
    if optim_config.clip > 0:
        chain.append(optax.clip_by_global_norm(optim_config.clip))
    if name in L2_DECAY:
        if wd > 0:
            chain.append(optax.add_decayed_weights(wd, mask))
        chain.append(L2_DECAY[name](optim_config, lr))
    else:
        chain.append(DECOUPLED_DECAY[name](optim_config, lr, mask))
    return optax.chain(*chain)
