"""Evaluation: the eval step shared with the trainer, and the separate eval job that follows checkpoints.

    bigjax eval --config experiments/X.py --workdir DIR [--once]

The job may start before, during or after training. It waits for checkpoints in DIR, restores only the
model variables of each new one onto its own mesh, evaluates it once, appends to DIR/eval/metrics.jsonl (and
TensorBoard), and exits once the final training step has been evaluated. Steps already in
DIR/eval/metrics.jsonl are not evaluated again, so the job can be restarted at any time.

It reads only committed checkpoints (checkpoint.committed_steps), so never a half-written one, and it outlives
the trainer restarting under it: a checkpoint deleted (keep-N) or set aside while the job was reading it is
skipped, and one that cannot be read is reported once and tried again only after the trainer has replaced it.
"""

from __future__ import annotations

import time

import jax

from bigjax import checkpoint, compilation_cache, data, metrics, paths, tasks
from bigjax import state as state_lib
from bigjax.errors import UserError
from bigjax.setup import Setup, make_setup


class EvalError(UserError):
    """The eval job cannot go on: a message for the user."""


def make_eval_step(setup: Setup):
    """jit: (variables, batch) -> the task's sums for one batch."""

    def sums(variables, batch):
        params, model_state = state_lib.split_variables(variables)
        return setup.task.loss_sums(params, model_state, batch, train=False)[0]

    sharding = setup.sharding
    step = jax.jit(sums, in_shardings=(setup.variable_shardings, sharding.batch), out_shardings=sharding.replicated)

    def run(variables, batch):
        with sharding.activate():
            return step(variables, batch)

    return run


def evaluate(setup: Setup, eval_step, variables, eval_data: data.EvalData) -> dict:
    """Metrics over all eval batches: sums are added on device and fetched once."""
    sums = None
    for host_batch in eval_data.batches:
        sums = tasks.add_sums(sums, eval_step(variables, setup.sharding.global_batch(host_batch)))
    return setup.task.summarize(jax.device_get(sums), eval_data.stats)


def run_eval_job(config, workdir, once: bool = False, poll_seconds: float = 2.0, timeout: float = 3600.0) -> dict:
    """Follow DIR's checkpoints until the final step is evaluated. Returns the newest step's metrics."""
    workdir = paths.workdir(workdir)
    compilation_cache.use(config, workdir)  # a restarted eval job loads its eval step
    setup = make_setup(config)
    eval_data = data.eval_data(config)
    target = setup.variables_target()
    eval_step = make_eval_step(setup)

    eval_dir = workdir / "eval"
    results = {row["step"]: row for row in metrics.read_jsonl(eval_dir / "metrics.jsonl")}
    writer = metrics.MetricWriter(eval_dir, console_prefix="eval ")
    metrics.say(f"eval job: mesh {setup.sharding.describe()}; following {checkpoint.checkpoint_dir(workdir)}")
    unreadable = {}  # step -> its directory's identity (checkpoint.step_identity) when it could not be read
    last_progress = time.monotonic()
    newest = None
    try:
        while True:
            steps = checkpoint.committed_steps(workdir)
            # --once: the newest checkpoint that reads back; otherwise every one not evaluated yet, oldest first.
            todo = steps[::-1] if once else [s for s in steps if s not in results]
            for step in todo:
                variables = restore_variables_or_none(workdir, step, target, unreadable)
                if variables is None:
                    continue
                results[step] = evaluate(setup, eval_step, variables, eval_data)
                writer.write(step, results[step])
                newest, last_progress = step, time.monotonic()
                if once:
                    break
            if (once and newest is not None) or config.total_steps in results:
                break
            if time.monotonic() - last_progress > timeout:
                raise EvalError(
                    f"no new checkpoint in {workdir} for {timeout:.0f}s and the final step "
                    f"{config.total_steps} is not evaluated yet; is the trainer running? (--timeout sets the wait)"
                )
            time.sleep(poll_seconds)
    finally:
        writer.close()
    newest = newest if once else max(results)
    return {"step": newest, **{k: v for k, v in results[newest].items() if k not in ("step", "time")}}


def restore_variables_or_none(workdir, step: int, target, unreadable: dict):
    """The model variables saved at `step`, or None if they cannot be had now.

    None, with a message, when the trainer deleted or set the checkpoint aside since it was listed (newer
    ones are coming), or when it cannot be read: then it is skipped until its directory is replaced (the
    trainer sets a bad checkpoint aside when it restarts, and saves that step again).
    """
    path = checkpoint.step_dir(workdir, step)
    identity = checkpoint.step_identity(path)
    if identity is None or unreadable.get(step) == identity:
        return None
    try:
        return checkpoint.restore_variables(checkpoint.manager(workdir, read_only=True), step, target)
    except Exception as error:
        if checkpoint.step_identity(path) != identity or step not in checkpoint.committed_steps(workdir):
            metrics.say(f"eval: checkpoint {step} was removed before it could be evaluated; skipping it")
        else:
            unreadable[step] = identity
            metrics.say(
                f"eval: checkpoint {step} at {path} cannot be read ({checkpoint.describe(error)}); "
                "skipping it until the trainer replaces it"
            )
        return None
