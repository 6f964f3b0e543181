"""Magnitude pruning during training: unstructured (a sparsity target reached on a schedule) or 2:4 structured
(the pattern sparse tensor cores run), as an optax transformation wrapped around the optimizer.

    prune = dict(kind="unstructured", sparsity=0.5, start_step=200, end_step=800, every=50)   # in the config
    prune = dict(kind="2:4", start_step=800)

No maintained JAX pruning library installs here: jaxpruner (google-research/jaxpruner) is not on this package
index, so the few pieces it would give are written out below (optax's `polynomial_schedule` is reused for the
ramp). `kind="none"` (the default) adds nothing to the optimizer: the opt_state, the step and every number of a run
are what they were without this module.

Decisions, each where the task left it open:

* **Where the mask lives**: in the optimizer state (`PruneState.masks`, one bool per pruned weight, a nested dict
  holding the pruned parameters alone), so Orbax checkpoints it with the moments and a resume restores it. The
  masks are made by `init` from the boxed parameters with `jax.tree.map` inside each parameter's box, so each mask
  carries its parameter's logical axis names and gets the parameter's sharding.
* **Exact zeros**: an optax transformation only returns updates, and `optax.apply_updates` adds them. For a pruned
  weight the update is `-param`, and `param + (-param)` is +0.0 exactly in IEEE arithmetic (round to nearest) for
  every finite param, in any float dtype; kept weights get the optimizer's update untouched (`jnp.where` selects,
  it does no arithmetic). Before the first pruning the values are the unpruned optimizer's up to how XLA compiles
  the larger program: measured on shakespeare_char (1 CPU device), bit-identical for 100 steps, then apart by
  rounding that training amplifies. `kind="none"` is bit-identical: it adds nothing.
* **The sparse model is what trains**: the gradients of pruned weights are set to 0 before the wrapped optimizer
  sees them, as if the forward pass multiplied by the mask (Zhu & Gupta's TF implementation): clipping's global
  norm and the moments see only the kept weights. (The step's logged grad_norm is of the raw gradient.)
* **When**: masks are recomputed at the optimizer's update counts `start_step, start_step + every, ...` and at
  `end_step`, from the weights as they stand at the start of that step (before its update), so a mask computed at
  step 0 depends on the initial weights alone. The count is the wrapper's own (like optax's schedules), which is
  the train step's number except under `nan_policy=skip`, where a skipped step does not count.
* **How much**: Zhu & Gupta's (2017) cubic ramp, `s(t) = s_f (1 - (1 - (t - t0) / (t1 - t0))^3)`, via
  `optax.polynomial_schedule`; `start_step == end_step` prunes once. Each slice prunes `round(s(t) * n)` of its `n`
  weights, and from `end_step` on exactly `round(sparsity * n)` computed in Python floats, so the achieved
  sparsity of a kernel is the target to the count.
* **Per what**: per tensor, and a tensor scanned over layers (logical axis `layers`) per layer: each layer of a
  stacked kernel reaches the target on its own, as if the layers were separate tensors. Per-tensor top-k is the
  standard choice (Zhu & Gupta; global pruning lets one layer be emptied) and needs no communication across
  parameters.
* **Which weights**: by `/`-joined parameter path, `include` minus `exclude` (regexes, `re.search`, as `freeze`
  and `init_from` use); the default `kernel$` takes the kernels of every Dense/DenseGeneral/Conv and leaves
  embeddings, norms and biases alone. A path that is also frozen is refused.
* **Monotone masks and ties**: a weight once pruned stays pruned (its score is -1, below every magnitude), so the
  mask only grows, as in Zhu & Gupta. Within a slice, weights are pruned smallest |w| first, equal magnitudes in
  index order (a stable sort): deterministic, and the same on any mesh (the sort runs on the logical array; XLA
  gathers a sharded slice as it needs, the result does not depend on the sharding).
* **2:4**: in every group of 4 consecutive weights along the kernel's innermost reduction (input) axis, the 2
  largest |w| are kept (the earlier one on a tie). The reduction axes are those before the output axes, which are
  the trailing `(heads|kv_heads, kv)` pair of a query/key/value kernel and the last axis of every other kernel;
  the innermost reduction axis is then consecutive along the matmul's K however the reduction axes are flattened
  (row-major), as cuSPARSELt wants it. That axis must be a multiple of 4. 2:4 is 50% by construction
  (`sparsity` must be 0.5) and is applied once, at `start_step` (NVIDIA ASP's recipe: prune a trained model once,
  then train on with the mask fixed; the monotone rule makes the later updates keep the same mask).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax.core.meta import AxisMetadata

from bigjax import params as params_lib
from bigjax.config import ConfigError

# Output axis pairs of the attention projections (bigjax.models.layers): their kernels end in (heads, kv).
HEAD_OUTPUTS = {("heads", "kv"), ("kv_heads", "kv")}


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where a kernel's layers and its matmul's reduction (input) axes are."""

    shape: tuple
    layer_axes: tuple  # stacked by nn.scan: pruned one layer at a time
    reduction_axes: tuple  # contracted with the activations; the last of them is the 2:4 groups' axis

    @property
    def slice_size(self) -> int:
        return math.prod(size for axis, size in enumerate(self.shape) if axis not in self.layer_axes)


@dataclasses.dataclass(frozen=True)
class Pruning:
    """What to prune, how and when: the config's `prune` section, with each pruned parameter's layout."""

    kind: str
    sparsity: float
    start_step: int
    end_step: int
    every: int
    layouts: dict  # {"layers/mlp/up/kernel": Layout}

    def is_update_step(self, count):
        """Is the mask recomputed at this optimizer count (a traced int)?"""
        on_grid = ((count - self.start_step) % self.every == 0) | (count == self.end_step)
        return (count >= self.start_step) & (count <= self.end_step) & on_grid

    def pruned_count(self, count, slice_size: int):
        """How many of a slice's weights are pruned once the mask of this count is applied (traced int32)."""
        final = round(self.sparsity * slice_size)  # Python floats: exactly the target, to the count
        if self.end_step == self.start_step:
            return jnp.int32(final)
        ramp = optax.polynomial_schedule(
            init_value=0.0,
            end_value=self.sparsity,
            power=3,
            transition_steps=self.end_step - self.start_step,
            transition_begin=self.start_step,
        )
        during = jnp.round(ramp(count) * slice_size).astype(jnp.int32)
        return jnp.where(count >= self.end_step, jnp.int32(final), jnp.minimum(during, final))


class PruneState(NamedTuple):
    count: jax.Array  # int32: updates applied so far
    masks: dict  # True = kept; a nested dict of the pruned parameters alone, each shaped and sharded like it
    inner: optax.OptState  # the wrapped optimizer's state


# --------------------------------------------------------------------------------------------------
# The config: what to prune, checked against the model's parameters


def from_config(config, task) -> Pruning | None:
    """The pruning `config.prune` asks for, with the layouts of the parameters it selects; None when off.

    Raises ConfigError for a combination that cannot work (see `check`)."""
    p = config.prune
    if p.kind == "none":
        return None
    boxed = jax.eval_shape(task.init_variables, jax.random.key(0))["params"]
    selected = params_lib.matches(boxed, p.include)
    excluded = params_lib.matches(boxed, p.exclude)
    frozen = task.variant.frozen(boxed, config.freeze)
    is_box = lambda x: isinstance(x, AxisMetadata)
    layouts, frozen_selected = {}, []
    leaves = jax.tree_util.tree_flatten_with_path(boxed, is_leaf=is_box)[0]
    flags = zip(jax.tree.leaves(selected), jax.tree.leaves(excluded), jax.tree.leaves(frozen), strict=True)
    for (path, leaf), (include, exclude, freeze) in zip(leaves, flags, strict=True):
        if not include or exclude:
            continue
        name = params_lib.param_path(path)
        if freeze:
            frozen_selected.append(name)
        layouts[name] = layout_of(leaf)
    pruning = Pruning(p.kind, p.sparsity, p.start_step, p.end_step, p.every, layouts)
    check(pruning, config, frozen_selected)
    return pruning


def layout_of(leaf) -> Layout:
    """A parameter's layout from its logical axis names (see the module docstring for the rule)."""
    names = tuple(getattr(leaf, "names", None) or ())
    value = leaf.value if isinstance(leaf, AxisMetadata) else leaf
    shape = tuple(value.shape)
    names = names if len(names) == len(shape) else (None,) * len(shape)
    layer_axes = tuple(axis for axis, name in enumerate(names) if name == "layers")
    own = [axis for axis in range(len(shape)) if axis not in layer_axes]
    outputs = 2 if len(own) >= 3 and tuple(names[a] for a in own[-2:]) in HEAD_OUTPUTS else 1
    return Layout(shape, layer_axes, tuple(own[:-outputs]))


def check(pruning: Pruning, config, frozen_selected: list) -> None:
    """The combinations that cannot work, each one error naming the key and the fix."""
    p = config.prune
    if not pruning.layouts:
        raise ConfigError(
            f"config.prune.include={p.include!r} (minus exclude={p.exclude!r}) matches no parameter; "
            "parameter paths look like layers/mlp/up/kernel"
        )
    if frozen_selected:
        raise ConfigError(
            f"config.prune would prune frozen parameters ({', '.join(frozen_selected[:3])}): frozen weights never "
            "change, so they cannot be pruned; exclude them with config.prune.exclude or unfreeze them"
        )
    if p.end_step >= config.total_steps:
        raise ConfigError(
            f"config.prune.end_step={p.end_step} is not before config.total_steps={config.total_steps}: the "
            "sparsity would never reach its target; lower end_step"
        )
    if pruning.kind != "2:4":
        return
    for name, layout in pruning.layouts.items():
        if not layout.reduction_axes:
            raise ConfigError(
                f"config.prune.kind='2:4' cannot prune {name} (shape {layout.shape}): it is not a matmul kernel "
                "with an input dimension; narrow config.prune.include to kernels"
            )
        axis = layout.reduction_axes[-1]
        if layout.shape[axis] % 4:
            raise ConfigError(
                f"config.prune.kind='2:4' needs the reduction (input) dimension of {name} to be a multiple of 4, "
                f"but it is {layout.shape[axis]} (axis {axis} of shape {layout.shape}); leave it out with "
                "config.prune.exclude or use kind='unstructured'"
            )


# --------------------------------------------------------------------------------------------------
# Masks


def unstructured_mask(weights, old_mask, layout: Layout, pruned):
    """Keep all but the `pruned` smallest |w| of each slice (a layer of a stacked kernel, else the whole tensor);
    weights pruned before stay pruned; ties go in index order."""
    score = jnp.where(old_mask, jnp.abs(weights.astype(jnp.float32)), -1.0)
    leading = tuple(range(len(layout.layer_axes)))
    rows = jnp.moveaxis(score, layout.layer_axes, leading)
    moved_shape = rows.shape
    rows = rows.reshape(math.prod(moved_shape[: len(leading)]), -1)
    order = jnp.argsort(rows, axis=-1, stable=True)  # smallest first, equal scores in index order
    rank = jnp.argsort(order, axis=-1, stable=True)  # each weight's place in that order
    keep = (rank >= pruned).reshape(moved_shape)
    return jnp.moveaxis(keep, leading, layout.layer_axes)


def two_four_mask(weights, old_mask, layout: Layout):
    """In each group of 4 consecutive weights along the innermost reduction axis, keep the 2 largest |w| (on a tie,
    the earlier); weights pruned before stay pruned."""
    axis = layout.reduction_axes[-1]
    score = jnp.moveaxis(jnp.where(old_mask, jnp.abs(weights.astype(jnp.float32)), -1.0), axis, -1)
    groups = score.reshape(*score.shape[:-1], -1, 4)
    mine, other = groups[..., :, None], groups[..., None, :]
    index = jnp.arange(4)
    earlier = index[None, :] < index[:, None]  # [i, j]: j comes before i
    ahead = (other > mine) | ((other == mine) & earlier)  # [..., i, j]: j ranks ahead of i
    keep = ahead.sum(axis=-1) < 2
    return jnp.moveaxis(keep.reshape(score.shape), -1, axis)


def new_mask(pruning: Pruning, layout: Layout, weights, old_mask, count):
    if pruning.kind == "2:4":
        return two_four_mask(weights, old_mask, layout)
    return unstructured_mask(weights, old_mask, layout, pruning.pruned_count(count, layout.slice_size))


# --------------------------------------------------------------------------------------------------
# The transformation


def pruned(inner: optax.GradientTransformation, pruning: Pruning) -> optax.GradientTransformationExtraArgs:
    """`inner` (the optimizer) training the sparse model: masks recomputed on `pruning`'s schedule, gradients of
    pruned weights zeroed before `inner`, and updates that leave pruned weights exactly 0 (see the docstring)."""
    inner = optax.with_extra_args_support(inner)

    def init(params):
        # Inside each parameter's box: the mask keeps its logical axis names, hence its sharding.
        is_box = lambda x: isinstance(x, AxisMetadata)
        masks = {
            params_lib.param_path(path): jax.tree.map(lambda v: jnp.ones(v.shape, jnp.bool_), leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_box)[0]
            if params_lib.param_path(path) in pruning.layouts
        }
        return PruneState(jnp.zeros([], jnp.int32), params_lib.nest(masks), inner.init(params))

    def update(grads, state, params=None, **extra_args):
        if params is None:
            raise ValueError("pruning needs the parameters: call update(grads, state, params)")
        flat_params = params_lib.by_path(params)

        def recompute(masks):
            return params_lib.nest(
                {
                    name: new_mask(pruning, pruning.layouts[name], flat_params[name], mask, state.count)
                    for name, mask in params_lib.by_path(masks).items()
                }
            )

        masks = jax.lax.cond(pruning.is_update_step(state.count), recompute, lambda masks: masks, state.masks)
        flat_masks = params_lib.by_path(masks)

        def where_kept(path, value, pruned_value):
            mask = flat_masks.get(params_lib.param_path(path))
            return value if mask is None else jnp.where(mask, value, pruned_value(value))

        grads = jax.tree_util.tree_map_with_path(lambda path, g: where_kept(path, g, jnp.zeros_like), grads)
        updates, inner_state = inner.update(grads, state.inner, params, **extra_args)
        updates = jax.tree_util.tree_map_with_path(
            lambda path, u, p: where_kept(path, u, lambda u: -p.astype(u.dtype)), updates, params
        )
        return updates, PruneState(state.count + 1, masks, inner_state)

    return optax.GradientTransformationExtraArgs(init, update)


# --------------------------------------------------------------------------------------------------
# Reading a state


def masks_of(opt_state) -> dict:
    """{path: mask} of a train state's optimizer state (under `freeze`'s multi_transform or not); {} if unpruned."""
    is_prune_state = lambda node: isinstance(node, PruneState)
    found = {}
    for node in jax.tree.leaves(opt_state, is_leaf=is_prune_state):
        if is_prune_state(node):
            found.update(params_lib.by_path(node.masks))
    return found
