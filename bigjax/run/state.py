"""The train state and its sharded creation.

Parameters and optimizer state are created inside one `jax.jit` whose `out_shardings` come from the logical
axis names, so each device only ever holds its own shard: a model larger than one device never exists whole.
"""

from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from bigjax.parallel import mesh as mesh_lib


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array  # int32 scalar: the number of updates applied
    params: dict
    opt_state: optax.OptState
    model_state: dict  # mutable collections besides the parameters (BatchNorm statistics); {} for most models


def split_variables(variables) -> tuple[dict, dict]:
    """Flax variables -> (params, everything else)."""
    variables = dict(variables)
    return variables.pop("params"), variables


def boxed_init(task, tx, seed: int):
    """The function that creates a TrainState whose params and optimizer moments still carry logical-axis metadata.

    Make it once per setup and pass the same function to `abstract_state_and_shardings` and `create_sharded_state`:
    jax keeps a function's trace, so the model is traced once for both (a large model's trace takes seconds)."""

    def init():
        params, model_state = split_variables(task.init_variables(jax.random.key(seed)))
        # optax maps over the boxed leaves, so its moments inherit the parameters' logical names.
        return TrainState(
            step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), model_state=model_state
        )

    return init


def count_parameters(params) -> int:
    """How many numbers a parameter tree holds (arrays or ShapeDtypeStructs alike)."""
    return int(sum(leaf.size for leaf in jax.tree.leaves(params)))


def abstract_state_and_shardings(init, sharding: mesh_lib.Sharding):
    """Shapes/dtypes of the (unboxed) state `init` (`boxed_init`) creates, and the NamedSharding of each leaf. No
    FLOPs, no memory."""
    with sharding.activate():
        boxed = jax.eval_shape(init)
    return nn.unbox(boxed), sharding.of(boxed)


def create_sharded_state(init, sharding: mesh_lib.Sharding, shardings) -> TrainState:
    """Run `init` (`boxed_init`) directly into its shards: `shardings`, one per leaf of the unboxed state."""
    with sharding.activate():
        boxed = jax.eval_shape(init)  # the trace `abstract_state_and_shardings` made: jax's cache holds it
        boxed_shardings = jax.tree.unflatten(jax.tree.structure(boxed), jax.tree.leaves(shardings))
        created = jax.jit(init, out_shardings=boxed_shardings)()
    # Unboxed by structure: nn.unbox would constrain each array's sharding again, a program per shape outside jit.
    return jax.tree.unflatten(jax.tree.structure(shardings), jax.tree.leaves(created))


def restore_target(abstract_state, shardings):
    """ShapeDtypeStructs carrying the current mesh's shardings: what Orbax restores onto."""
    return jax.tree.map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        abstract_state,
        shardings,
    )


def model_variables(state) -> dict:
    """The Flax variables of a TrainState (or of its shardings, or its abstract shapes): what the model is
    applied with, and what eval, generation and fine-tuning restore alone."""
    return {"params": state.params, **state.model_state}
