"""The training loop, top to bottom in the order things happen:

config -> devices and mesh -> data -> model and task -> optimizer -> state (restore or init)
-> compiled step -> loop (batch, step, log, eval, checkpoint) -> final save and summary.
"""

from __future__ import annotations

import dataclasses
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils

from bigjax import checkpoint, data, evaluate, finetune, lock, metrics, optim, paths, signals, tasks
from bigjax import mesh as mesh_lib
from bigjax import state as state_lib


class TrainingError(Exception):
    """The run cannot go on (non-finite loss, no usable checkpoint to resume): a message for the user."""


@dataclasses.dataclass
class Summary:
    step: int
    status: str  # "finished" | "preempted" | "stopped early"
    last_metrics: dict


def train(config, workdir, stop_at_step: int | None = None, fresh: bool = False) -> Summary:
    """Train until config.total_steps, resuming from workdir's newest usable checkpoint if there is one.

    `stop_at_step` ends this invocation early at that step, with a checkpoint, as a preemption would: for
    time-sliced jobs, and for testing that a resumed run matches an uninterrupted one. `fresh` starts again
    from step 0 in a workdir whose checkpoints are all unusable (without it, that is an error).
    """
    stop = PreemptionFlag()  # SIGTERM or Ctrl-C from here on: stop at the next safe point, with a checkpoint
    try:
        return train_until_stopped(config, paths.workdir(workdir), stop, stop_at_step, fresh)
    finally:
        stop.restore()


def train_until_stopped(config, workdir, stop, stop_at_step: int | None, fresh: bool) -> Summary:
    """`train`, with the signal handling in place; `workdir` is a directory or a bucket URL (gs://...)."""
    # Devices and mesh: the config is checked against them before anything is compiled.
    mesh = mesh_lib.make_mesh(config)
    rules = mesh_lib.logical_rules(config)
    metrics.say(f"mesh {mesh_lib.describe(mesh)} on {jax.devices()[0].device_kind}; workdir {workdir}")

    # Model, task and data: all checked before anything is written to the workdir.
    task = tasks.make_task(config)
    # Batches are copied to the devices `data.prefetch` steps ahead; checkpoints hold the position of the last used.
    train_batches = data.DeviceBatches(data.train_batches(config), mesh, config.data.prefetch)
    eval_data = data.eval_data(config) if config.eval_every else None
    tx = optim.make_optimizer(config.optim, config.total_steps, freeze=config.freeze)
    abstract_state, state_shardings = state_lib.abstract_state_and_shardings(task, tx, config.seed, mesh, rules)

    # One trainer per workdir: a second one is refused here, before it has touched a file of the first.
    with lock.held(workdir, say=metrics.say) as workdir_lock:
        stopper = finetune.EarlyStopping.from_config(config)  # None unless config.early_stopping.metric is set
        ranking = dict(best_metric=config.early_stopping.metric, best_mode=config.early_stopping.mode)
        mngr = checkpoint.manager(workdir, **ranking)
        keep = checkpoint.retention(config.keep_checkpoints, **ranking)  # the newest N, and the best for early stopping

        # State: restored from the newest usable checkpoint or freshly initialized into its shards.
        state, counters = restore_or_init(
            mngr, workdir, task, tx, config, mesh, rules, abstract_state, state_shardings, train_batches, fresh
        )
        checkpoint.write_config(
            workdir, config
        )  # only now: a refused resume must not overwrite the config of the checkpoints
        non_finite = NonFiniteGuard(config, start_step=int(state.step), skipped=counters.get("nan_skips", 0))
        start = int(state.step)
        log_model_size(state.params)
        if stopper is not None and start:
            resume_early_stopping(stopper, mngr, start, config.eval_every)

        # One compiled, sharded, donating step.
        train_step, compile_seconds = compile_train_step(task, tx, config, mesh, rules, state, state_shardings)
        metrics.say(f"compiled the train step in {compile_seconds:.1f}s")
        eval_step = evaluate.make_eval_step(task, mesh, rules, model_variables(state_shardings)) if eval_data else None
        if stop.reached(start):  # a signal during start-up: nothing was trained, so there is nothing new to save
            metrics.say(f"stopped by {stop.name} during start-up, at step {start}: nothing new to save")
            return Summary(step=start, status="preempted", last_metrics={})

        writer = metrics.MetricWriter(workdir)
        throughput = Throughput(config.batch_size, task, mesh.devices.size)
        pending = []  # per-step metrics still on device: fetched only at log time, never every step
        last = {}
        bar = metrics.progress_bar(start, config.total_steps)

        step = start
        try:
            while step < config.total_steps and not (stopper and stopper.should_stop):
                state, step_metrics = train_step(state, next(train_batches))
                pending.append(step_metrics)
                step += 1
                if bar is not None:
                    bar.update(1)

                if step % config.log_every == 0 or step == config.total_steps:
                    last = log_metrics(writer, step, pending, throughput, non_finite)
                    pending = []
                    checkpoint.raise_if_a_save_failed(mngr)  # a background save that failed stops the run here
                eval_metrics = None
                if eval_step is not None and step % config.eval_every == 0:
                    eval_metrics = evaluate.evaluate(eval_step, model_variables(state), eval_data, mesh, task)
                    writer.write(step, prefixed("eval/", eval_metrics))
                    if stopper is not None:
                        stopper.update(step, eval_metrics)
                stopping = stop.reached(step) or step == stop_at_step
                checkpoint_due = config.checkpoint_every and step % config.checkpoint_every == 0
                # With early stopping every evaluation is a checkpoint, ranked by its metrics: the best one is kept.
                ranked = stopper is not None and eval_metrics is not None
                if checkpoint_due or ranked or step == config.total_steps or stopping:
                    # Never save a state that went non-finite: check the steps not yet logged first.
                    non_finite.check(step, jax.device_get(pending))
                    workdir_lock.check()  # never write into a workdir another trainer has taken over
                    save(mngr, keep, step, state, train_batches, non_finite, config, eval_metrics if ranked else None)
                if stopping:
                    why = f"by {stop.name}" if stop.requested else "as asked (--stop-at-step)"
                    metrics.say(f"stopped {why} at step {step} with a checkpoint; rerun the same command to resume")
                    break
        finally:
            if bar is not None:
                bar.close()
            writer.close()
            # Even on failure, finish a save still in flight: the last good checkpoint is what a rerun resumes.
            checkpoint.finish_saves(mngr)
        workdir_lock.check()
        checkpoint.delete_old_checkpoints(mngr, keep)  # keep-N, now that the last save has committed
    status = "finished" if step >= config.total_steps else "preempted"
    if stopper is not None:
        if stopper.should_stop and step < config.total_steps:
            status = "stopped early"
            metrics.say(f"stopped early at step {step}: {stopper.patience} evaluations without improvement")
        metrics.say(
            f"early stopping: {stopper.describe()}; that checkpoint is kept in {checkpoint.checkpoint_dir(workdir)}"
        )
    return Summary(step=step, status=status, last_metrics=last)


# --------------------------------------------------------------------------------------------------
# The steps of the story


def restore_or_init(mngr, workdir, task, tx, config, mesh, rules, abstract_state, shardings, train_batches, fresh):
    """(state, counters) from the newest usable checkpoint, the data iterator moved to match; else a new state.

    A changed model or optimizer is refused (checkpoint.CheckpointError lists the differences); unusable
    checkpoints are set aside. A workdir whose checkpoints are all unusable is not silently started over:
    that needs `fresh` (`bigjax train --fresh`).
    """
    target = state_lib.restore_target(abstract_state, shardings)
    restored = checkpoint.restore_newest_usable(mngr, workdir, target, config)
    if restored is not None and fresh:
        raise TrainingError(
            f"--fresh starts over only in a workdir with no usable checkpoint, and {workdir} has one at step "
            f"{restored.step}; drop --fresh to resume from it, or use a new --workdir"
        )
    if restored is not None:
        train_batches.set_state(restored.data_state)
        metrics.say(f"resumed from step {restored.step}")
        return restored.state, restored.counters
    if checkpoint.had_checkpoints(workdir) and not fresh:
        raise TrainingError(
            f"no usable checkpoint is left in {checkpoint.checkpoint_dir(workdir)}: the ones there were set aside "
            f"in {checkpoint.quarantine_dir(workdir)} (see above). Rerun with --fresh to start again from step 0 "
            "in this workdir, or use a new --workdir"
        )
    if fresh:
        metrics.say(f"starting again from step 0 in {workdir} (--fresh)")
    state = state_lib.create_sharded_state(task, tx, config.seed, mesh, rules, shardings)
    if config.init_from.workdir:  # fine-tuning: parameters from another run, optimizer and data from scratch
        state = finetune.load_pretrained_state(state, config.init_from, shardings)
    return state, {}


def resume_early_stopping(stopper, mngr, step: int, eval_every: int) -> None:
    """A resumed run carries on counting from its best checkpoint (Orbax keeps it, with its metrics)."""
    best = mngr.best_step()
    stopper.resume(best, mngr.metadata(best).metrics if best is not None else None, step, eval_every)
    if stopper.best_step is not None:
        metrics.say(f"early stopping: {stopper.describe()}, {stopper.since_best} evaluations since")


def log_model_size(params) -> None:
    count = state_lib.count_parameters(params)
    metrics.say(f"model: {count / 1e6:.2f}M parameters")


def model_variables(state) -> dict:
    """The Flax variables of a TrainState (or of its shardings): what the model is applied with."""
    return {"params": state.params, **state.model_state}


def make_train_step(task, tx, config):
    """The pure step: (state, batch) -> (new state, metrics). Gradients are accumulated over
    `optim.grad_accum` microbatches inside the step, as sums, so k microbatches equal one big batch."""
    schedule = optim.make_schedule(config.optim, config.total_steps)
    accum = config.optim.grad_accum
    dropout_key = jax.random.fold_in(jax.random.key(config.seed), 1)

    def loss_sum(params, model_state, batch, rng):
        # Frozen parameters are constants to the gradient: XLA computes no gradient for them at all.
        params = jax.tree.map(
            lambda frozen, p: jax.lax.stop_gradient(p) if frozen else p, finetune.matches(params, config.freeze), params
        )
        sums, new_model_state = task.loss_sums(params, model_state, batch, rng, train=True)
        return sums["loss"], (sums, new_model_state)

    grad_of_sums = jax.grad(loss_sum, has_aux=True)

    def grads_and_sums(params, model_state, batch, rng):
        if accum == 1:
            return grad_of_sums(params, model_state, batch, rng)
        # Microbatch i takes rows i, i+k, i+2k, ...: each device keeps its own rows, no data moves.
        micro = jax.tree.map(lambda x: x.reshape(-1, accum, *x.shape[1:]).swapaxes(0, 1), batch)

        def add_microbatch(carry, inputs):
            grads, sums, model_state = carry
            index, microbatch = inputs
            micro_grads, (micro_sums, model_state) = grad_of_sums(
                params, model_state, microbatch, jax.random.fold_in(rng, index)
            )
            return (jax.tree.map(jnp.add, grads, micro_grads), tasks.add_sums(sums, micro_sums), model_state), None

        shapes = jax.eval_shape(grad_of_sums, params, model_state, jax.tree.map(lambda x: x[0], micro), rng)
        zero_grads, zero_sums = jax.tree.map(jnp.zeros_like, (shapes[0], shapes[1][0]))
        # Model state (BatchNorm statistics) is threaded through the microbatches in order.
        carry = (zero_grads, zero_sums, model_state)
        (grads, sums, model_state), _ = jax.lax.scan(add_microbatch, carry, (jnp.arange(accum), micro))
        return grads, (sums, model_state)

    def train_step(state, batch):
        rng = jax.random.fold_in(dropout_key, state.step)
        grad_sums, (sums, model_state) = grads_and_sums(state.params, state.model_state, batch, rng)
        count = jnp.maximum(sums["count"], 1.0)
        grads = jax.tree.map(lambda g: g / count, grad_sums)  # the gradient of the mean loss
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        # Frozen parameters are kept as they are, not given a zero update: bit-identical even where p + 0 is not.
        params = jax.tree.map(
            lambda frozen, old, new: old if frozen else new,
            finetune.matches(state.params, config.freeze),
            state.params,
            optax.apply_updates(state.params, updates),
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


def compile_train_step(task, tx, config, mesh, rules, state, state_shardings):
    """jit with explicit shardings, donating the old state; compiled ahead of time to time the compile."""
    started = time.perf_counter()
    with mesh_lib.activate(mesh, rules):
        compiled = lower_train_step(task, tx, config, mesh, rules, state, state_shardings).compile()
    return compiled, time.perf_counter() - started


def lower_train_step(task, tx, config, mesh, rules, state, state_shardings):
    """The train step traced for these shapes and shardings (`state` may be abstract), not yet compiled."""
    batch_sharding = mesh_lib.batch_sharding(mesh)
    step_fn = jax.jit(
        make_train_step(task, tx, config),
        in_shardings=(state_shardings, batch_sharding),
        out_shardings=(state_shardings, mesh_lib.replicated(mesh)),
        donate_argnums=(0,),
    )
    abstract_batch = jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=batch_sharding),
        task.batch_spec(config.batch_size),
    )
    with mesh_lib.activate(mesh, rules):
        return step_fn.lower(state, abstract_batch)


class Throughput:
    """Wall time between log points -> step time, examples/s, tokens/s and MFU, without syncing every step."""

    def __init__(self, batch_size: int, task, num_devices: int):
        self.batch_size = batch_size
        self.tokens_per_example = task.tokens_per_example
        self.flops_per_example = task.flops_per_example()
        self.num_devices = num_devices
        self.last_time = time.perf_counter()

    def measure(self, steps: int) -> dict:
        now = time.perf_counter()
        step_time = (now - self.last_time) / max(steps, 1)
        self.last_time = now
        examples_per_second = self.batch_size / step_time
        rates = {"step_time": step_time, "examples_per_second": examples_per_second}
        if self.tokens_per_example:
            rates["tokens_per_second"] = examples_per_second * self.tokens_per_example
        rates["mfu"] = metrics.mfu(self.flops_per_example * examples_per_second, self.num_devices)
        return rates


def log_metrics(writer, step: int, pending: list, throughput: Throughput, non_finite: NonFiniteGuard) -> dict:
    """Fetch the pending steps' metrics (one host sync per log), check them, write their mean."""
    fetched = jax.device_get(pending)
    non_finite.check(step, fetched)
    applied = [m for m in fetched if is_finite(m)] or fetched  # skipped steps changed nothing: not in the mean
    mean = {key: float(np.mean([m[key] for m in applied])) for key in applied[0]}
    mean["learning_rate"] = float(fetched[-1]["learning_rate"])
    if non_finite.policy == "skip":
        mean["skipped_steps"] = non_finite.skipped
    mean.update(throughput.measure(len(pending)))
    writer.write(step, mean)
    return mean


def is_finite(step_metrics: dict) -> bool:
    return all(np.isfinite(step_metrics[name]) for name in NonFiniteGuard.WATCHED)


class NonFiniteGuard:
    """What a NaN/Inf loss or gradient norm does, seen on the host when metrics are fetched (each step once).

    nan_policy="stop": stop, naming the step and the metric; nothing at or after that step is saved.
    nan_policy="skip": the jitted step has already skipped that update; count it, say so, and stop once more
    than config.max_nan_skips steps were skipped in the whole run (the count is saved in checkpoints).
    """

    WATCHED = ("loss", "grad_norm")

    def __init__(self, config, start_step: int, skipped: int = 0):
        self.policy = config.nan_policy
        self.limit = config.max_nan_skips
        self.skipped = skipped
        self.checked_through = start_step

    def check(self, step: int, fetched: list) -> None:
        first_step = step - len(fetched) + 1
        for offset, step_metrics in enumerate(fetched):
            if first_step + offset > self.checked_through and not is_finite(step_metrics):
                self._on_non_finite(first_step + offset, step_metrics)
        self.checked_through = max(self.checked_through, step)

    def _on_non_finite(self, step: int, step_metrics: dict) -> None:
        name = next(name for name in self.WATCHED if not np.isfinite(step_metrics[name]))
        what = f"{name} is {step_metrics[name]} at step {step}"
        advice = "The last good checkpoint is kept; lower optim.lr, raise optim.warmup_steps, or check the data"
        if self.policy == "stop":
            raise TrainingError(f"{what}; stopping. {advice} (or set config.nan_policy=skip)")
        self.skipped += 1
        if self.skipped > self.limit:
            raise TrainingError(
                f"{what}: {self.skipped} non-finite steps skipped, more than config.max_nan_skips={self.limit}; "
                f"stopping. {advice}"
            )
        metrics.say(f"{what}: update skipped ({self.skipped} of at most {self.limit}, config.max_nan_skips)")


def save(mngr, keep, step: int, state, train_batches, non_finite: NonFiniteGuard, config, eval_metrics=None) -> None:
    """Save what a resume needs: the state, where the data iterator is, and the run's counts."""
    counters = {"nan_skips": non_finite.skipped}
    checkpoint.save(mngr, keep, step, state, train_batches.get_state(), counters, config, eval_metrics)


def prefixed(prefix: str, values: dict) -> dict:
    return {prefix + key: value for key, value in values.items()}


class PreemptionFlag:
    """SIGTERM (a preemption, `kill`, a scheduler's time limit) or Ctrl-C asks the loop to save and exit cleanly
    (`bigjax.signals`; the CLI starts listening before JAX is even imported).

    With several processes all of them must stop at the same step: a process that saves alone waits forever for
    the others to join the save. A scheduler may signal one host only, or each at a different step, so there JAX's
    preemption service takes SIGTERM instead of Python: it tells every process that one was signalled, and they
    agree on the first step all of them can still reach (`multihost_utils.reached_preemption_sync_point`, asked
    at every step; a local check until a notice arrives). Ctrl-C there stops the process at once.
    """

    def __init__(self):
        self.shared = jax.process_count() > 1 and jax.config.jax_enable_preemption_service
        if self.shared:
            # JAX's service took SIGTERM when the job formed (after the CLI began listening): a Python handler
            # installed now would take the signal from it. Ctrl-C stops one process at once.
            signals.release([signal.SIGINT])
            self.request = None
        else:
            self.request = signals.catch()
        self.requested = False

    @property
    def name(self) -> str:
        return "SIGTERM" if self.shared else self.request.name

    def reached(self, step: int) -> bool:
        """Whether this step is where the run stops for a signal (with several processes: every process's)."""
        if self.shared:
            self.requested = multihost_utils.reached_preemption_sync_point(step)
        else:
            self.requested = self.request.requested
        return self.requested

    def restore(self):
        signals.release([signal.SIGINT] if self.shared else signals.SIGNALS)
