"""The train step: (state, batch) -> (new state, metrics), one jitted, sharded, donating program.

`train` runs it, `bench` times it and `plan` compiles it for XLA's memory analysis: the same program, lowered
from the same `Setup`.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import optax

from bigjax import tasks
from bigjax.run import optim
from bigjax.run.setup import Setup


def make_train_step(task, tx, config, teacher=None):
    """The pure step: (state, batch) -> (new state, metrics). Gradients are accumulated over
    `optim.grad_accum` microbatches inside the step, as sums, so k microbatches equal one big batch.

    With a `teacher` (bigjax.compress.distill.Teacher) the step is (state, batch, teacher_variables) -> (new state,
    metrics): the teacher's variables are an argument, not part of the state, and not differentiated."""
    schedule = optim.make_schedule(config.optim, config.total_steps)
    accum = config.optim.grad_accum
    dropout_key = jax.random.fold_in(jax.random.key(config.seed), 1)

    def loss_sum(params, model_state, batch, rng, teacher_variables):
        # Frozen parameters are constants to the gradient: XLA computes no gradient for them at all.
        frozen = task.variant.frozen(params, config.freeze)
        params = jax.tree.map(lambda frozen, p: jax.lax.stop_gradient(p) if frozen else p, frozen, params)
        teaching = {} if teacher is None else {"teacher": teacher.in_step(teacher_variables)}
        sums, new_model_state = task.loss_sums(params, model_state, batch, rng, train=True, **teaching)
        return sums["loss"], (sums, new_model_state)

    # Of the student's parameters alone. Integer ones (QLoRA's frozen base) get jax's float0 "no gradient",
    # replaced by float zeros so that every gradient adds up and reaches the optimizer like a frozen float one's.
    grad_with_integers = jax.grad(loss_sum, has_aux=True, allow_int=True)

    def grad_of_sums(params, *args):
        grads, aux = grad_with_integers(params, *args)
        return jax.tree.map(zero_if_integer, grads, params), aux

    def grads_and_sums(params, model_state, batch, rng, teacher_variables):
        if accum == 1:
            return grad_of_sums(params, model_state, batch, rng, teacher_variables)
        # Microbatch i takes rows i, i+k, i+2k, ...: each device keeps its own rows, no data moves.
        micro = jax.tree.map(lambda x: x.reshape(-1, accum, *x.shape[1:]).swapaxes(0, 1), batch)

        def add_microbatch(carry, inputs):
            grads, sums, model_state = carry
            index, microbatch = inputs
            micro_grads, (micro_sums, model_state) = grad_of_sums(
                params, model_state, microbatch, jax.random.fold_in(rng, index), teacher_variables
            )
            return (jax.tree.map(jnp.add, grads, micro_grads), tasks.add_sums(sums, micro_sums), model_state), None

        first = jax.tree.map(lambda x: x[0], micro)
        shapes = jax.eval_shape(grad_of_sums, params, model_state, first, rng, teacher_variables)
        zero_grads, zero_sums = jax.tree.map(jnp.zeros_like, (shapes[0], shapes[1][0]))
        # Model state (BatchNorm statistics) is threaded through the microbatches in order.
        carry = (zero_grads, zero_sums, model_state)
        (grads, sums, model_state), _ = jax.lax.scan(add_microbatch, carry, (jnp.arange(accum), micro))
        return grads, (sums, model_state)

    def train_step(state, batch, teacher_variables=None):
        rng = jax.random.fold_in(dropout_key, state.step)
        grad_sums, (sums, model_state) = grads_and_sums(state.params, state.model_state, batch, rng, teacher_variables)
        count = jnp.maximum(sums["count"], 1.0)
        grads = jax.tree.map(lambda g: g / count, grad_sums)  # the gradient of the mean loss
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        # Frozen parameters are kept as they are, not given a zero update: bit-identical even where p + 0 is not,
        # and an integer one (QLoRA's base) has nothing to add a float to.
        params = jax.tree.map(
            lambda frozen, old, update: old if frozen else optax.apply_updates(old, update),
            task.variant.frozen(state.params, config.freeze),
            state.params,
            updates,
        )
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            model_state=model_state,
        )
        step_metrics = {
            **tasks.means(sums),
            "grad_norm": optax.tree.norm(grads),
            "learning_rate": schedule(state.step),
        }
        if config.nan_policy == "skip":
            # A non-finite loss or gradient leaves the state as it was, but for the step count (the batch is
            # used up). Decided here, on device: the host only counts skips when it fetches metrics to log.
            finite = jnp.isfinite(step_metrics["loss"]) & jnp.isfinite(step_metrics["grad_norm"])
            unchanged = state.replace(step=new_state.step)
            new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, unchanged)
        return new_state, step_metrics

    return train_step


def zero_if_integer(grad, param):
    return jnp.zeros(param.shape, jnp.float32) if grad.dtype == jax.dtypes.float0 else grad


def compile_train_step(setup: Setup):
    """The step, compiled ahead of time (to time the compile): (the step to call, seconds)."""
    started = time.perf_counter()
    _ = setup.teacher  # a teacher's shapes are traced outside the mesh context, as the state's were (bigjax.run.state)
    step_fn, args = jit_train_step(setup)
    with setup.sharding.activate():
        compiled = step_fn.lower(*args).compile()
    seconds = time.perf_counter() - started
    if not holds_int4(setup.abstract_state):
        return compiled, seconds

    # XLA's CPU backend reports a program's int4 outputs (QLoRA's base) as laid out unpacked while the compiled
    # program wants them packed, and a compiled program refuses that mismatch at every call. The jitted function
    # takes them (and finds the program just compiled in jax's cache), called in the mesh context it was traced in.
    def step(*args):
        with setup.sharding.activate():
            return step_fn(*args)

    return step, seconds


def holds_int4(tree) -> bool:
    return any(leaf.dtype == jnp.int4 for leaf in jax.tree.leaves(tree))


def lower_train_step(setup: Setup):
    """The step jitted and traced for its shapes (the state abstract: nothing is allocated); not yet compiled."""
    step_fn, args = jit_train_step(setup)
    with setup.sharding.activate():
        return step_fn.lower(*args)


def jit_train_step(setup: Setup):
    """(the step jitted with the setup's shardings, donating the old state; the abstract arguments to lower it
    for). Distilling, the teacher's variables are a third argument, sharded on the same mesh and never donated:
    (state, batch, teacher_variables)."""
    sharding, teacher = setup.sharding, setup.teacher
    teacher_shardings = () if teacher is None else (teacher.variable_shardings,)
    step_fn = jax.jit(
        make_train_step(setup.task, setup.tx, setup.config, teacher),
        in_shardings=(setup.state_shardings, sharding.batch, *teacher_shardings),
        out_shardings=(setup.state_shardings, sharding.replicated),
        donate_argnums=(0,),
    )
    abstract_batch = jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding.batch),
        setup.task.batch_spec(setup.config.batch_size),
    )
    teacher_target = () if teacher is None else (teacher.variables_target(),)
    return step_fn, (setup.state_target(), abstract_batch, *teacher_target)


def with_teacher(train_step, teacher_variables):
    """A distillation's compiled step (state, batch, teacher_variables) as the loop calls it: (state, batch)."""
    return lambda state, batch: train_step(state, batch, teacher_variables)
