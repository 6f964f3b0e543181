"""The training loop, top to bottom in the order things happen:

config -> setup (mesh, model and task, optimizer, the state's shapes) -> data -> workdir lock -> state (restore
or init) -> compiled step -> loop (batch, step, log, eval, checkpoint) -> final save and summary.
"""

from __future__ import annotations

import dataclasses
import signal
import sys
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from bigjax import data, paths
from bigjax.compress import distill, lora
from bigjax.compress.variant import Variant
from bigjax.errors import UserError
from bigjax.ops import metrics, trackers
from bigjax.parallel import pipeline
from bigjax.run import checkpoint, compilation_cache, evaluate, finetune, goodput, lock, signals
from bigjax.run import state as state_lib
from bigjax.run import step as step_lib
from bigjax.run.setup import Setup, make_setup


class TrainingError(UserError):
    """The run cannot go on (non-finite loss, no usable checkpoint to resume): a message for the user."""


@dataclasses.dataclass
class Summary:
    step: int
    status: str  # "finished" | "preempted" | "stopped early"
    last_metrics: dict


def train(
    config, workdir, stop_at_step: int | None = None, fresh: bool = False, started: float | None = None
) -> Summary:
    """Train until config.total_steps, resuming from workdir's newest usable checkpoint if there is one.

    `stop_at_step` ends this invocation early at that step, with a checkpoint, as a preemption would: for
    time-sliced jobs, and for testing that a resumed run matches an uninterrupted one. `fresh` starts again
    from step 0 in a workdir whose checkpoints are all unusable (without it, that is an error). `started`: when the
    command started (time.monotonic()), where the account of the run's wall time begins (default: now).
    """
    refuse_quantized(Variant.of(config))  # before anything is read or written: the setup that makes it comes later
    if stop_at_step is not None and stop_at_step < 0:
        raise TrainingError(f"--stop-at-step {stop_at_step}: a step number is >= 0; pass the step to stop at")
    stop = PreemptionFlag()  # SIGTERM or Ctrl-C from here on: stop at the next safe point, with a checkpoint
    try:
        return train_until_stopped(config, paths.workdir(workdir), stop, stop_at_step, fresh, goodput.Clock(started))
    finally:
        stop.restore()


def refuse_quantized(variant: Variant) -> None:
    """A quantized run (`bigjax quantize`) holds integer weights with no optimizer state: evaluated, sampled and
    benchmarked, never trained (QLoRA trains adapters beside them; QAT trains float weights)."""
    if variant.inference_only:
        raise TrainingError(
            f"config.quant.bits={variant.bits}: this is a quantized run, whose checkpoint holds integer weights "
            "and no optimizer state; `bigjax eval`, `generate` and `bench` run it. To train a model for int"
            f"{variant.bits}, set config.quant.qat=True (quantization-aware training) or config.lora.rank "
            "(QLoRA); or train the float run it was quantized from (config.quant.bits=0)"
        )


def train_until_stopped(config, workdir, stop, stop_at_step: int | None, fresh: bool, clock) -> Summary:
    """`train`, with the signal handling in place; `workdir` is a directory or a bucket URL (gs://...); `clock`
    (goodput.Clock) accounts for the wall time."""
    trackers.check(config, workdir)  # an extra not installed: said before anything is written
    # Before anything compiles: a resumed run loads the steps it compiled last time.
    cache = compilation_cache.use(config, workdir)
    # Distillation: the teacher checkpoint this run started with stays its teacher when it resumes.
    config = distill.pin_teacher_step(config, workdir)
    # Mesh, model and task, optimizer, the state's shapes and shardings (and a teacher's): the config is checked
    # against the devices before anything is compiled, and everything is checked before anything is written to
    # the workdir.
    setup = make_setup(config)
    teacher = setup.teacher  # None unless config.distill.teacher is set
    metrics.say(f"mesh {setup.sharding.describe()} on {jax.devices()[0].device_kind}; workdir {workdir}")
    if schedule := pipeline.schedule_of(config.model, setup.mesh.shape["stage"]):
        metrics.say(pipeline.describe(schedule))

    # Data. Batches are copied to the devices `data.prefetch` steps ahead; checkpoints hold the position of the
    # last one used.
    train_batches = data.DeviceBatches(data.train_batches(config), setup.mesh, config.data.prefetch)
    eval_data = data.eval_data(config) if config.eval_every else None

    # Adapters to start from (config.lora.adapters) are checked before anything is written; a resumed run does not
    # read them.
    if config.lora.adapters and not checkpoint.committed_steps(workdir):
        lora.check_adapters(setup)

    # One trainer per workdir: a second one is refused here, before it has touched a file of the first.
    with lock.held(workdir, say=metrics.say) as workdir_lock:
        stopper = finetune.EarlyStopping.from_config(config)  # None unless config.early_stopping.metric is set
        # The newest keep_checkpoints are kept, and for early stopping the best one too.
        ranking = config.early_stopping.metric, config.early_stopping.mode
        # Every write into the workdir from here on is fenced by the lock: a trainer that lost it writes nothing.
        saves = checkpoint.writer(workdir, config.keep_checkpoints, workdir_lock, *ranking)
        mngr = saves.mngr

        # State: restored from the newest usable checkpoint or freshly initialized into its shards.
        with clock("restore"):
            state, counters = restore_or_init(setup, saves, workdir, train_batches, fresh)
        start = int(state.step)
        if stop_at_step is not None and stop_at_step <= start:
            return stopped_before_training(start, stop_at_step)
        # Only now: a refused resume must not overwrite the config of the checkpoints.
        checkpoint.write_config(workdir, config, workdir_lock)
        non_finite = NonFiniteGuard(config, start_step=start, skipped=counters.get("nan_skips", 0))
        log_model_size(state.params, setup)
        if stopper is not None and start:
            resume_early_stopping(stopper, mngr, start, config.eval_every)

        # One compiled, sharded, donating step.
        with clock("compile"):
            train_step, compile_seconds = step_lib.compile_train_step(setup)
        metrics.say(f"compiled the train step in {compile_seconds:.1f}s; {cache.describe()}")
        if teacher is not None:  # its variables go into every step, never into the state or its checkpoints
            train_step = step_lib.with_teacher(train_step, teacher.load())
        eval_step = evaluate.make_eval_step(setup) if eval_data else None
        if stop.reached(start):  # a signal during start-up: nothing was trained, so there is nothing new to save
            metrics.say(f"stopped by {stop.name} during start-up, at step {start}: nothing new to save")
            metrics.say(goodput.line(clock.totals(), cache.describe()))
            return Summary(step=start, status="preempted", last_metrics={})

        # The tracker runs (W&B, MLflow) continue the ones this workdir recorded, or start and record them.
        runs = trackers.start(config, workdir, workdir_lock)
        tensorboard = "tensorboard" in config.trackers
        writer = metrics.MetricWriter(workdir, fence=workdir_lock.fenced, tensorboard=tensorboard, trackers=runs)
        throughput = Throughput(config.batch_size, setup.task, setup.mesh.devices.size)
        pending = []  # per-step metrics still on device: fetched only at log time, never every step
        last = {}
        bar = metrics.progress_bar(start, config.total_steps)

        step = start
        clock.switch_to("steps")
        try:
            while step < config.total_steps and not (stopper and stopper.should_stop):
                with clock("data"):
                    batch = next(train_batches)
                state, step_metrics = train_step(state, batch)
                pending.append(step_metrics)
                step += 1
                if bar is not None:
                    bar.update(1)

                if step % config.log_every == 0 or step == config.total_steps:
                    last = log_metrics(writer, step, pending, throughput, non_finite)
                    pending = []
                    saves.raise_if_a_save_failed()  # a background save that failed stops the run here
                eval_metrics = None
                if eval_step is not None and step % config.eval_every == 0:
                    with clock("eval"):
                        eval_metrics = evaluate.evaluate(setup, eval_step, state_lib.model_variables(state), eval_data)
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
                    counters = {"nan_skips": non_finite.skipped}  # run-level counts a resume must carry on
                    ranks = eval_metrics if ranked else None
                    with clock("checkpoint"):
                        saves.save(step, state, train_batches.get_state(), counters, config, ranks)
                if stopping:
                    why = f"by {stop.name}" if stop.requested else "as asked (--stop-at-step)"
                    metrics.say(f"stopped {why} at step {step} with a checkpoint; rerun the same command to resume")
                    break
            with clock("checkpoint"):
                saves.finish()  # the last save committed, its wait counted, before the account is written
            log_goodput(writer, step, clock, cache)
        finally:
            if bar is not None:
                bar.close()
            # A full disk that stopped the run fails the writers' flushes too: the error in flight is the one to say.
            writer.close(quietly=sys.exception() is not None)
            # Even on failure, finish a save still in flight: the last good checkpoint is what a rerun resumes.
            saves.finish()
        workdir_lock.check()
        saves.delete_old()  # keep-N, now that the last save has committed
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


def restore_or_init(setup: Setup, saves, workdir, train_batches, fresh: bool):
    """(state, counters) from the newest usable checkpoint, the data iterator moved to match; else a new state.

    A changed model or optimizer is refused (checkpoint.CheckpointError lists the differences); unusable
    checkpoints are set aside. A workdir whose checkpoints are all unusable is not silently started over:
    that needs `fresh` (`bigjax train --fresh`).
    """
    config = setup.config
    restored = checkpoint.restore_newest_usable(saves.mngr, workdir, setup.state_target(), config, saves.fence)
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
    state = setup.init_state()
    if config.init_from.workdir:  # fine-tuning: parameters from another run, optimizer and data from scratch
        state = finetune.load_pretrained_into(setup, state)
    if config.lora.adapters:  # LoRA: its trained parameters from a `bigjax lora save`
        state = lora.load(state, setup)
    return state, {}


def stopped_before_training(start: int, stop_at_step: int) -> Summary:
    """--stop-at-step at the step the run resumes from: nothing to train. Before it: a step that cannot be stopped
    at again (the checkpoints after it would have to go), so refused rather than ignored."""
    if stop_at_step < start:
        raise TrainingError(
            f"--stop-at-step {stop_at_step} is before step {start}, where this run resumes; pass a step after "
            f"{start}, or leave it out to train to the end"
        )
    metrics.say(f"already at step {start} (--stop-at-step {stop_at_step}): nothing to train")
    return Summary(step=start, status="preempted", last_metrics={})


def resume_early_stopping(stopper, mngr, step: int, eval_every: int) -> None:
    """A resumed run carries on counting from its best checkpoint (Orbax keeps it, with its metrics)."""
    best = mngr.best_step()
    stopper.resume(best, mngr.metadata(best).metrics if best is not None else None, step, eval_every)
    if stopper.best_step is not None:
        metrics.say(f"early stopping: {stopper.describe()}, {stopper.since_best} evaluations since")


def log_goodput(writer, step: int, clock, cache) -> None:
    """Where the run's wall time went: a `goodput:` line, and a `goodput/...` row in metrics.jsonl."""
    totals = clock.totals()
    writer.write(step, goodput.row(totals), console=False)
    metrics.say(goodput.line(totals, cache.describe()))


def log_model_size(params, setup) -> None:
    count, freeze = state_lib.count_parameters(params), setup.config.freeze
    trained = ""
    if setup.variant.freezes_any(freeze):  # a freeze, or LoRA: say how much of it trains
        frozen = jax.tree.leaves(setup.variant.frozen(params, freeze))
        numbers = sum(leaf.size for leaf, fixed in zip(jax.tree.leaves(params), frozen, strict=True) if not fixed)
        trained = f", {numbers / 1e6:.3f}M of them trained"
    metrics.say(f"model: {count / 1e6:.2f}M parameters{trained}")


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


def prefixed(prefix: str, values: dict) -> dict:
    return {prefix + key: value for key, value in values.items()}


class PreemptionFlag:
    """SIGTERM (a preemption, `kill`, a scheduler's time limit) or Ctrl-C asks the loop to save and exit cleanly
    (`bigjax.run.signals`; the CLI starts listening before JAX is even imported).

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
