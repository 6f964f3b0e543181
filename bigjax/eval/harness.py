"""EleutherAI's lm-evaluation-harness on a bigjax run, in process, on the run's own mesh.

    bigjax lm-eval --workdir DIR --tasks hellaswag,wikitext [--include-path DIR] [--num-fewshot N] [--limit N]
                   [--batch-size N] [--step N] [--out results.json]

    results = harness.evaluate(workdir, ["my_task"], include_path="tasks/", limit=100)   # lm-eval's results dict

Everything is checked before anything is loaded or written, cheapest first: lm-eval installed (the optional extra
`bigjax[eval]`), the workdir a causal LM, the output file new, the task names known (to lm-eval, or as YAML files
under --include-path), each task's data readable (a task whose dataset is on the Hugging Face Hub needs the
network, or the datasets cache); then the model is loaded (bigjax.eval.model) and lm-eval runs its tasks.
"""

from __future__ import annotations

import difflib
import functools
import json
import os
import pathlib
import sys
from unittest import mock

from bigjax import generate
from bigjax.errors import UserError
from bigjax.run.workdir import Run

INSTALL = "pip install 'bigjax[eval]'"
PURPOSE = "lm-eval scores"  # "DIR trained a masked_lm model; lm-eval scores causal LMs only"


class HarnessError(UserError):
    """A message for the user."""


def require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise HarnessError(
            f"scoring with lm-evaluation-harness needs the lm-eval package, which is not installed: {INSTALL}"
        ) from None


def evaluate(
    workdir,
    tasks: list[str],
    include_path=None,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    batch_size: int = 16,
    step: int | None = None,
    mesh: dict | None = None,
    log_samples: bool = False,
) -> dict | None:
    """lm-eval's results dict for `tasks` on WORKDIR's newest committed checkpoint (or `step`), on the run's mesh
    updated with `mesh`. `log_samples`: the per-request responses too, under "samples" (as lm-eval logs them). In a
    job of several processes, process 0 gets the results and the others None (they followed it)."""
    require_lm_eval()
    run = Run(workdir)
    generate.check_causal_lm(run.saved_config(), run, PURPOSE)
    run.committed_step(step)  # refused before the tasks are loaded (which takes a while): none yet, or no such step
    manager = load_task_manager(tasks, include_path)
    lm = load_model(run, step, mesh, batch_size)
    return run_tasks(lm, manager, tasks, num_fewshot, limit, log_samples)


def load_model(workdir, step: int | None = None, mesh: dict | None = None, batch_size: int = 16):
    from bigjax.eval.model import BigjaxLM

    return BigjaxLM(generate.load(workdir, step, mesh={} if mesh is None else mesh, purpose=PURPOSE), batch_size)


def run_tasks(lm, manager, tasks, num_fewshot=None, limit=None, log_samples: bool = False) -> dict:
    """lm-eval's simple_evaluate on the loaded model `lm` by process 0; the other processes of a job follow it, and
    get None."""
    import jax
    import lm_eval

    if jax.process_index() != 0:
        lm.follow()
        return None
    # lm-eval records the environment with torch's collect_env, which runs a dozen commands (pip list among them:
    # ~1 s of every evaluation, so of every checkpoint an eval job scores); the model runs on JAX, whose environment
    # is the one to record.
    jax_environment = functools.partial(jax.print_environment_info, return_string=True)
    try:
        with mock.patch("torch.utils.collect_env.get_pretty_env_info", jax_environment):
            results = lm_eval.simple_evaluate(
                model=lm,
                tasks=list(tasks),
                task_manager=manager,
                num_fewshot=num_fewshot,
                limit=limit,
                log_samples=log_samples,
                bootstrap_iters=0,  # no standard errors by resampling: they cost more than scoring a small run
                verbosity=None,
            )
    finally:
        lm.followers.stop()
    return results


def load_task_manager(tasks: list[str], include_path=None):
    """lm-eval's TaskManager that knows `tasks`, with each task's data loaded once to prove it can be read.

    Only the --include-path's YAML files are indexed where they hold every task asked for: lm-eval's own index of its
    thousands of tasks takes half a minute to build."""
    from lm_eval.tasks import TaskManager

    if not tasks:
        raise HarnessError("no task given; name one or more with --tasks T1,T2 (lm-eval's names, or your YAML's)")
    if include_path is not None and not pathlib.Path(include_path).is_dir():
        raise HarnessError(f"--include-path {include_path} is not a directory of task YAML files")
    manager = TaskManager(include_path=include_path, include_defaults=False) if include_path else None
    if manager is None or any(task not in manager.all_tasks for task in tasks):
        manager = TaskManager(include_path=include_path)
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        near = sorted({m for task in unknown for m in difflib.get_close_matches(task, manager.all_tasks, n=3)})
        hint = f"; close: {', '.join(near)}" if near else ""
        raise HarnessError(
            f"unknown lm-eval task {', '.join(map(repr, unknown))}{hint}. `lm-eval ls tasks` lists lm-eval's own; "
            "a task of your own is a YAML file under --include-path DIR"
        )
    for task in tasks:
        check_task_data(manager, task)
    return manager


def check_task_data(manager, task: str) -> None:
    """Load `task`'s data (and its group's), or say why it cannot be: the Hub unreachable, a file missing."""
    try:
        manager.load([task])
    except (ConnectionError, TimeoutError) as error:  # datasets and huggingface_hub raise ConnectionError
        offline = " (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set)" if offline_mode() else ""
        raise HarnessError(
            f"task {task!r} needs to download its data from the Hugging Face Hub, which cannot be reached{offline} "
            f"({error}); run where the network is, or once there to fill the datasets cache, or write the task as a "
            "YAML over local files (dataset_path: json, dataset_kwargs.data_files) under --include-path"
        ) from None
    except FileNotFoundError as error:
        raise HarnessError(f"task {task!r}: its data cannot be read ({error})") from None


def offline_mode() -> bool:
    return any(
        os.environ.get(name, "").lower() in ("1", "true", "yes") for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


# --------------------------------------------------------------------------------------------------
# In the eval job: config.eval.harness


class JobHarness:
    """config.eval.harness in the eval job (bigjax.run.evaluate): its tasks scored on the checkpoints it evaluates,
    with the parameters the job restored onto its own mesh; the step compiled once for the whole job."""

    def __init__(self, config, setup):
        settings = config.eval.harness
        self.tasks = [task for task in settings.tasks.split(",") if task]
        require_lm_eval()
        if config.task.name != "causal_lm":
            raise HarnessError(
                f"config.eval.harness.tasks={settings.tasks!r}: lm-eval scores causal LMs only, and this run is a "
                f"{config.task.name} model; set config.eval.harness.tasks=''"
            )
        self.manager = load_task_manager(self.tasks, settings.include_path or None)  # before any checkpoint
        self.config, self.setup, self.batch_size = config, setup, settings.batch_size
        self.every, self.limit = settings.every, settings.limit or None
        self.num_fewshot = None if settings.num_fewshot < 0 else settings.num_fewshot
        self.lm = None

    def wants(self, step: int) -> bool:
        return not self.every or step % self.every == 0 or step >= self.config.total_steps

    def score(self, step: int, params) -> dict:
        """{"harness/TASK/METRIC": value} for the checkpoint `step` whose parameters are `params`."""
        from bigjax import data
        from bigjax.eval.model import BigjaxLM

        if self.lm is None:
            tokenizer = data.make_tokenizer(self.config.data.tokenizer)
            model_config = self.setup.task.model_config
            generator = generate.Generator(
                model_config, params, tokenizer, step, self.setup.variant, self.setup.sharding, self.config
            )
            self.lm = BigjaxLM(generator, self.batch_size)
        self.lm.generator.params, self.lm.generator.step = params, step
        results = run_tasks(self.lm, self.manager, self.tasks, self.num_fewshot, self.limit)
        if results is None:  # a process other than 0: it followed; process 0 logs
            return {}
        return {f"harness/{task}/{metric}": value for task, metric, value in metric_rows(results)}


def for_eval_job(config, setup) -> JobHarness | None:
    """The eval job's harness, its tasks checked and loaded; None where config.eval.harness.tasks is ""."""
    return JobHarness(config, setup) if config.eval.harness.tasks else None


# --------------------------------------------------------------------------------------------------
# The results: lm-eval's JSON, and a short table


def check_new_file(out) -> pathlib.Path:
    out = pathlib.Path(out).expanduser()
    if out.exists():
        raise HarnessError(f"--out {out} exists; name a new file (lm-eval results are never overwritten)")
    if not out.parent.is_dir():
        raise HarnessError(f"--out {out}: its directory {out.parent} does not exist; create it first")
    return out


def write_results(results: dict, out) -> pathlib.Path:
    """lm-eval's results dict as lm-eval writes it (the per-request samples left out), into the new file `out`."""
    from lm_eval.utils import handle_non_serializable

    out = pathlib.Path(out).expanduser()
    text = json.dumps({k: v for k, v in results.items() if k != "samples"}, indent=2, default=handle_non_serializable)
    try:
        with out.open("x", encoding="utf-8") as file:  # "x": made here, or the write is refused
            file.write(text)
    except FileExistsError:
        raise HarnessError(f"--out {out} appeared while the tasks ran; the results are not written over it") from None
    except OSError:
        out.unlink(missing_ok=True)
        raise
    return out


def metric_rows(results: dict) -> list[tuple[str, str, float]]:
    """(task, metric, value) for each number lm-eval reports, standard errors left out; a metric of a filter other
    than lm-eval's "none" is named METRIC/FILTER (gsm8k's exact_match/strict-match)."""
    rows = []
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            metric, _, applied = key.partition(",")
            if isinstance(value, int | float) and not isinstance(value, bool) and not metric.endswith("_stderr"):
                rows.append((task, metric if applied in ("", "none") else f"{metric}/{applied}", float(value)))
    return rows


def table(results: dict) -> str:
    rows = metric_rows(results)
    width = max([len("task")] + [len(task) for task, _, _ in rows])
    metric_width = max([len("metric")] + [len(metric) for _, metric, _ in rows])
    lines = [f"{'task':<{width}}  {'metric':<{metric_width}}  value"]
    lines += [f"{task:<{width}}  {metric:<{metric_width}}  {value:.4f}" for task, metric, value in rows]
    return "\n".join(lines)


def note(message: str) -> None:
    print(message, file=sys.stderr)
