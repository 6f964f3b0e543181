"""Evaluation: the eval step shared with the trainer, and the separate eval job that follows checkpoints.

    bigjax eval --config experiments/X.py --workdir DIR [--once]

The job may start before, during or after training. It waits for checkpoints in DIR, restores only the
model variables of each new one onto its own mesh, evaluates it once (and scores it on the lm-evaluation-harness
tasks of config.eval.harness, if any: bigjax.eval.harness), appends to DIR/eval/metrics.jsonl (and TensorBoard,
and the trainer's W&B and MLflow runs: bigjax.ops.trackers), and exits once the final training step has been
evaluated. Steps already in DIR/eval/metrics.jsonl are not evaluated again, so the job can be restarted at any time.

It reads only committed checkpoints (checkpoint.committed_steps), so never a half-written one, and it outlives
the trainer restarting under it: a checkpoint deleted (keep-N) or set aside while the job was reading it is
skipped, and one that cannot be read is reported once and tried again only after the trainer has replaced it.

It never waits for what cannot come: `--once` evaluates what is there or says why it cannot (no committed
checkpoint, none readable), and the job ends at the first evaluated step at or past total_steps (a run whose
total_steps was lowered below its newest checkpoint never saves that step). The checkpoints are read with the model
that wrote them: DIR/config.json's, where there is one (see `with_the_workdir_model`).
"""

from __future__ import annotations

import sys
import time

import jax

from bigjax import config as config_lib
from bigjax import data, tasks
from bigjax.errors import UserError
from bigjax.ops import metrics, trackers
from bigjax.run import checkpoint, compilation_cache
from bigjax.run import state as state_lib
from bigjax.run.setup import Setup, make_setup
from bigjax.run.workdir import Run


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
    """Follow DIR's checkpoints until the final step is evaluated. Returns the newest step's metrics.

    `once`: evaluate the newest committed checkpoint that can be read (an older one if it cannot) and return, never
    waiting for a trainer; EvalError if there is none.
    """
    run = Run(workdir)
    if once and not run.committed_steps():  # checked first: nothing is built or written for nothing
        raise nothing_readable(run, [], {})
    trackers.check(config, run.path)
    config = with_the_workdir_model(config, run)
    compilation_cache.use(config, run.path)  # a restarted eval job loads its eval step
    setup = make_setup(config)
    eval_data = data.eval_data(config)
    target = setup.variables_target()
    eval_step = make_eval_step(setup)
    harness = None
    if config.eval.harness.tasks:  # lm-evaluation-harness tasks: checked and loaded before any checkpoint is read
        from bigjax.eval import harness as eval_harness

        harness = eval_harness.for_eval_job(config, setup)

    results = {row["step"]: row for row in metrics.read_jsonl(run.eval_metrics_file)}
    # Into the trainer's tracker runs (as eval/NAME), opened at the first write: by then the trainer recorded them.
    writer = metrics.MetricWriter(
        run.eval_dir,
        console_prefix="eval ",
        tensorboard="tensorboard" in config.trackers,
        trackers=trackers.start(config, run.path),
    )
    metrics.say(f"eval job: mesh {setup.sharding.describe()}; following {run.checkpoints}")
    unreadable = {}  # step -> (its directory's identity (checkpoint.step_identity), why) when it could not be read
    last_progress = time.monotonic()
    newest = None
    try:
        while True:
            steps = run.committed_steps()
            # --once: the newest checkpoint that reads back; otherwise every one not evaluated yet, oldest first.
            todo = steps[::-1] if once else [s for s in steps if s not in results]
            for step in todo:
                variables = restore_variables_or_none(run, step, target, unreadable, waiting=not once)
                if variables is None:
                    continue
                results[step] = evaluate(setup, eval_step, variables, eval_data)
                if harness is not None and harness.wants(step):
                    results[step] |= harness.score(step, variables["params"])
                writer.write(step, results[step])
                newest, last_progress = step, time.monotonic()
                if once:
                    break
            if once:
                if newest is None:
                    raise nothing_readable(run, steps, unreadable)
                break
            # The final step, or one past it: a run whose total_steps was lowered never saves that step.
            if any(step >= config.total_steps for step in results):
                break
            if time.monotonic() - last_progress > timeout:
                raise EvalError(
                    f"no new checkpoint in {run} for {timeout:.0f}s and the final step "
                    f"{config.total_steps} is not evaluated yet; is the trainer running? (--timeout sets the wait)"
                )
            time.sleep(poll_seconds)
    finally:
        writer.close(quietly=sys.exception() is not None)  # the error that stopped the job is the one to report
    newest = newest if once else max(results)
    return {"step": newest, **{k: v for k, v in results[newest].items() if k not in ("step", "time")}}


# What a checkpoint's arrays are: the sections of a config that decide them.
SAVED_MODEL = ("model", "quant", "lora")


def with_the_workdir_model(config, run: Run):
    """`config` with the model of DIR/config.json (its `model`, `quant` and `lora`) where a run saved one; the data,
    the batches and the steps stay `config`'s. Each difference is said.

    The checkpoints of a workdir are read by the model that wrote them and no other, and DIR/config.json is that
    model's: the trainer writes it only once its checkpoints have been found to fit it, and `bigjax quantize`,
    `lora merge` and `import` write a workdir whose model is not the experiment file's (int8, merged, imported). So
    `bigjax eval --config EXPERIMENT --workdir DIR2` evaluates DIR2's model on the experiment's data, where the
    experiment's own model could read nothing there. A workdir with no config.json yet (a trainer starting) is
    followed with `config`'s model.
    """
    if not run.has_config():
        return config
    saved = run.saved_config()
    differences = [
        change for change in config_lib.harmless_changes(config, saved) if change.split(".")[0] in SAVED_MODEL
    ]
    if not differences:
        return config
    own = config_lib.from_dict({**config.to_dict(), **{key: saved[key].to_dict() for key in SAVED_MODEL}})
    config_lib.check_values(own)
    metrics.say(
        f"eval: reading the checkpoints with the model of {run.config_file}, which wrote them, not the "
        f"--config's: {'; '.join(differences)}"
    )
    return own


def nothing_readable(run: Run, steps: list[int], unreadable: dict) -> EvalError:
    """--once's error when there is no committed checkpoint, or none of the committed `steps` could be read."""
    if not steps:
        return EvalError(
            f"nothing to evaluate: no committed checkpoint in {run.checkpoints} yet, and --once "
            "does not wait for one; train there first, or leave out --once to follow the run as it saves"
        )
    newest = steps[-1]
    why = unreadable[newest][1] if newest in unreadable else "was removed while it was being read"
    return EvalError(
        f"no committed checkpoint of {run} could be read: checkpoint {newest} at "
        f"{run.step_dir(newest)} {why} (steps {', '.join(map(str, steps))} tried). --once does not "
        "wait for a trainer to set it aside and save again; rerun once one has"
    )


def restore_variables_or_none(run: Run, step: int, target, unreadable: dict, waiting: bool = True):
    """The model variables saved at `step`, or None if they cannot be had now.

    None, with a message, when the trainer deleted or set the checkpoint aside since it was listed (newer
    ones are coming), or when it cannot be read: then it is skipped (`waiting`: until its directory is replaced, as
    the trainer does when it restarts: it sets a bad checkpoint aside and saves that step again).
    """
    path = run.step_dir(step)
    identity = checkpoint.step_identity(path)
    if identity is None or unreadable.get(step, (None,))[0] == identity:
        return None
    try:
        return run.restore_variables(step, target)
    except Exception as error:
        if checkpoint.step_identity(path) != identity or step not in run.committed_steps():
            metrics.say(f"eval: checkpoint {step} was removed before it could be evaluated; skipping it")
        else:
            why = f"cannot be read ({checkpoint.describe(error)})"
            unreadable[step] = identity, why
            until = " until the trainer replaces it" if waiting else ""
            metrics.say(f"eval: checkpoint {step} at {path} {why}; skipping it{until}")
        return None
