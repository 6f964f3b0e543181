"""Evaluation: the eval step shared with the trainer, and the separate eval job that follows checkpoints.

    bigjax eval --config experiments/X.py --workdir DIR [--once]

The job may start before, during or after training. It waits for checkpoints in DIR, restores only the
model variables of each new one onto its own mesh, evaluates it once, appends to DIR/eval/metrics.jsonl (and
TensorBoard), and exits once the final training step has been evaluated. Steps already in
DIR/eval/metrics.jsonl are not evaluated again, so the job can be restarted at any time.
"""

from __future__ import annotations

import pathlib
import time

import jax

from bigjax import checkpoint, data, metrics, tasks
from bigjax import mesh as mesh_lib
from bigjax import state as state_lib


class EvalError(Exception):
    """The eval job cannot go on: a message for the user."""


def make_eval_step(task, mesh, rules, variable_shardings):
    """jit: (variables, batch) -> the task's sums for one batch."""

    def sums(variables, batch):
        params, model_state = state_lib.split_variables(variables)
        return task.loss_sums(params, model_state, batch, train=False)[0]

    step = jax.jit(
        sums,
        in_shardings=(variable_shardings, mesh_lib.batch_sharding(mesh)),
        out_shardings=mesh_lib.replicated(mesh),
    )

    def run(variables, batch):
        with mesh_lib.activate(mesh, rules):
            return step(variables, batch)

    return run


def evaluate(eval_step, variables, eval_data: data.EvalData, mesh, task) -> dict:
    """Metrics over all eval batches: sums are added on device and fetched once."""
    sums = None
    for host_batch in eval_data.batches:
        sums = tasks.add_sums(sums, eval_step(variables, mesh_lib.global_batch_from_host(host_batch, mesh)))
    return task.summarize(jax.device_get(sums), eval_data.stats)


def run_eval_job(config, workdir, once: bool = False, poll_seconds: float = 2.0, timeout: float = 3600.0) -> dict:
    """Follow DIR's checkpoints until the final step is evaluated. Returns the newest step's metrics."""
    workdir = pathlib.Path(workdir)
    mesh = mesh_lib.make_mesh(config)
    rules = mesh_lib.logical_rules(config)
    task = tasks.make_task(config)
    eval_data = data.eval_data(config)
    abstract, shardings = state_lib.abstract_variables_and_shardings(task, config.seed, mesh, rules)
    target = state_lib.restore_target(abstract, shardings)
    eval_step = make_eval_step(task, mesh, rules, shardings)

    eval_dir = workdir / "eval"
    results = {row["step"]: row for row in metrics.read_jsonl(eval_dir / "metrics.jsonl")}
    writer = metrics.MetricWriter(eval_dir, console_prefix="eval ")
    metrics.say(f"eval job: mesh {mesh_lib.describe(mesh)}; following {checkpoint.checkpoint_dir(workdir)}")
    last_progress = time.monotonic()
    try:
        while True:
            steps = available_steps(workdir)
            todo = [max(steps)] if once and steps else [s for s in steps if s not in results]
            for step in todo:
                variables = restore_variables_or_none(workdir, step, target)
                if variables is None:
                    continue
                results[step] = evaluate(eval_step, variables, eval_data, mesh, task)
                writer.write(step, results[step])
                last_progress = time.monotonic()
            if (once and steps) or config.total_steps in results:
                break
            if time.monotonic() - last_progress > timeout:
                raise EvalError(
                    f"no new checkpoint in {workdir} for {timeout:.0f}s and the final step "
                    f"{config.total_steps} is not evaluated yet; is the trainer running? (--timeout sets the wait)"
                )
            time.sleep(poll_seconds)
    finally:
        writer.close()
    newest = max(results)
    return {"step": newest, **{k: v for k, v in results[newest].items() if k not in ("step", "time")}}


def available_steps(workdir) -> list[int]:
    """Committed checkpoint steps (Orbax hides unfinished ones), oldest first; [] if none yet."""
    if not checkpoint.checkpoint_dir(workdir).exists():
        return []
    return sorted(checkpoint.manager(workdir, read_only=True).all_steps())


def restore_variables_or_none(workdir, step: int, target):
    try:
        return checkpoint.restore_variables(checkpoint.manager(workdir, read_only=True), step, target)
    except FileNotFoundError:
        # The trainer's keep-N policy deleted it before we got there; the newer ones are still coming.
        metrics.say(f"eval: checkpoint {step} was removed before it could be evaluated; skipping it")
        return None
