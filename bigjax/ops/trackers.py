"""Experiment trackers beside metrics.jsonl: Weights & Biases and MLflow (TensorBoard is in bigjax.ops.metrics).

`config.trackers` names them, several at once. Each is an optional extra (`pip install 'bigjax[wandb]'`,
`'bigjax[mlflow]'`), checked before a command writes anything (`check`). Process 0 logs, through the writer interface
of bigjax.ops.metrics (`write(step, metrics)`, `close(failed)`), every call inside the trainer's fence like its other
writes.

One workdir is one tracker run. The trainer starts it, gives it the resolved config as its parameters, and records its
id in WORKDIR/trackers.json (under the workdir lock, like config.json), so that a resumed trainer continues the same run
and the eval job logs into it too (its metrics as `eval/NAME`). W&B's x-axis is the training step, logged as `step`
(W&B's own step counts the calls of each process, and the eval job logs beside the trainer).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import time

import jax

from bigjax import config as config_lib
from bigjax import paths
from bigjax.errors import UserError
from bigjax.ops.metrics import say

RECORD = "trackers.json"  # WORKDIR/trackers.json: {"wandb": RUN_ID, "mlflow": RUN_ID}
# What each tracker imports (MLflow's local store is SQLite, through SQLAlchemy and Alembic), and the extra that has it.
MODULES = {"tensorboard": ("tensorboardX",), "wandb": ("wandb",), "mlflow": ("mlflow", "sqlalchemy", "alembic")}
EXTRAS = {"tensorboard": "bigjax", "wandb": "bigjax[wandb]", "mlflow": "bigjax[mlflow]"}


class TrackerError(UserError):
    """A tracker that cannot be used or written: a message for the user."""


def check(config, workdir) -> None:
    """Before anything is written: every tracker's library is installed, and the MLflow store has a place."""
    for name in config.trackers:
        missing = [module for module in MODULES[name] if not installed(module)]
        if missing:
            raise TrackerError(
                f"config.trackers has {name!r}, but {', '.join(missing)} is not installed; pip install "
                f"'{EXTRAS[name]}' (or drop {name!r} from config.trackers)"
            )
    if "mlflow" in config.trackers and not config.mlflow.tracking_uri and paths.is_url(workdir):
        raise TrackerError(
            f"config.mlflow.tracking_uri is empty, and its default, a local store in the workdir, cannot be in a "
            f"bucket ({workdir}); set config.mlflow.tracking_uri to your MLflow tracking server"
        )


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: sys.modules holds None for it (an import that is refused)
        return False


def start(config, workdir, job_lock=None) -> list:
    """The W&B and MLflow runs of `config.trackers` for this workdir's writer, on process 0 (none elsewhere).

    The trainer passes its `job_lock` (lock.JobLock): each run is opened now, continuing the one recorded in
    WORKDIR/trackers.json or starting one and recording it, and gets the config as its parameters. The eval job passes
    none: it holds no lock and records nothing; its runs open at its first write (once a checkpoint exists, the
    trainer has recorded its runs) and log its metrics as `eval/NAME`."""
    if jax.process_index() != 0:
        return []
    workdir = paths.workdir(workdir)
    kinds = [kind for name, kind in (("wandb", WandbRun), ("mlflow", MlflowRun)) if name in config.trackers]
    if job_lock is None:
        return [kind(config, workdir, role="eval") for kind in kinds]
    runs = [kind(config, workdir, role="train", fence=job_lock.fenced) for kind in kinds]
    recorded = read_record(workdir)
    for run in runs:
        run.open(recorded.get(run.name))
        if recorded.get(run.name) != run.run_id:  # recorded at once: a failure of the next tracker does not lose it
            recorded = {**recorded, run.name: run.run_id}
            job_lock.write_text(workdir / RECORD, json.dumps(recorded, indent=2, sort_keys=True) + "\n")
    return runs


def read_record(workdir) -> dict:
    """The tracker runs recorded in WORKDIR/trackers.json; {} if none (or a file bigjax did not write)."""
    path = paths.workdir(workdir) / RECORD
    try:
        record = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in record.items() if isinstance(v, str)} if isinstance(record, dict) else {}


def run_name(section, workdir) -> str:
    """config.wandb.name or config.mlflow.name; by default the workdir's name."""
    return section.name or workdir.name


def flat_config(config) -> dict[str, str]:
    """The config as MLflow parameters: `optim.lr` -> "0.001" (lists and tuples as JSON)."""
    flat = {}

    def walk(node, prefix):
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                flat[prefix + key] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)

    walk(json.loads(config_lib.to_json(config)), "")
    return flat


class TrackerRun:
    """One tracker's run for one writer: opened by `open` (the trainer) or at its first `write` (the eval job)."""

    name = ""

    def __init__(self, config, workdir, role: str, fence=contextlib.nullcontext):
        self.config, self.workdir, self.role = config, workdir, role
        self.fence = fence
        self.prefix = "eval/" if role == "eval" else ""
        self.run_id = None
        self.opened = False

    def open(self, run_id: str | None) -> None:
        with self.fence(), self.said("start"):
            self.run_id = self._open(run_id)
        self.opened = True

    def write(self, step: int, metrics: dict) -> None:
        if not self.opened:  # the eval job's first write
            run_id = read_record(self.workdir).get(self.name)
            if run_id is None:
                say(
                    f"eval: {self.workdir / RECORD} names no {self.name} run (its trainer did not log to {self.name}); "
                    "logging to a run of the eval job's own"
                )
            self.open(run_id)
        metrics = {self.prefix + key: value for key, value in metrics.items()}
        with self.fence(), self.said("log to"):
            self._log(step, metrics)

    @contextlib.contextmanager
    def said(self, what: str):
        """A library's error (not logged in, a server that cannot be reached, a full disk) as one line for the user."""
        try:
            yield
        except Exception as error:
            raise TrackerError(
                f"cannot {what} the {self.name} run of {self.workdir}: {type(error).__name__}: {error}; fix that, or "
                f"drop {self.name!r} from config.trackers, then rerun the same command"
            ) from error

    def close(self, failed: bool = False) -> None:
        if self.opened:
            self._close(failed)
            self.opened = False


class WandbRun(TrackerRun):
    """A Weights & Biases run: online, or offline in WORKDIR/wandb/ (`wandb sync` uploads it later)."""

    name = "wandb"

    def _open(self, run_id):
        import wandb

        c = self.config.wandb
        self.run = wandb.init(
            project=c.project,
            entity=c.entity or None,
            name=run_name(c, self.workdir),
            id=run_id,  # None: W&B makes one
            resume="allow",
            mode=c.mode or None,
            dir=None if paths.is_url(self.workdir) else str(self.workdir),
            reinit="create_new",
            # Its label names this process's system metrics; the console stays bigjax's (its lines are the metrics).
            settings=wandb.Settings(x_label=self.role, x_primary=self.role == "train", console="off", silent=True),
        )
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")  # the training step is every chart's x-axis
        if self.role == "train":
            self.run.config.update(self.config.to_dict(), allow_val_change=True)  # a resume's changes replace the old
        return self.run.id

    def _log(self, step, metrics):
        self.run.log({"step": step, **metrics})

    def _close(self, failed):
        self.run.finish(exit_code=1 if failed else 0)


class MlflowRun(TrackerRun):
    """An MLflow run, by default in the local store sqlite:///WORKDIR/mlflow.db (`mlflow ui --backend-store-uri`)."""

    name = "mlflow"

    def _open(self, run_id):
        import logging

        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        logging.getLogger("mlflow").setLevel(logging.WARNING)  # not its INFO lines about creating tables
        c = self.config.mlflow
        local = not c.tracking_uri
        self.uri = f"sqlite:///{self.workdir / 'mlflow.db'}" if local else c.tracking_uri
        self.client = MlflowClient(tracking_uri=self.uri)
        run, self.owned = None, self.role == "train"
        if run_id:
            try:
                run = self.client.get_run(run_id)
            except MlflowException:
                say(
                    f"trackers: MLflow run {run_id} of {self.workdir / RECORD} is not in {self.uri}; starting a new one"
                )
        if run is None:
            experiment = self.client.get_experiment_by_name(c.experiment)
            if experiment is not None:
                experiment_id = experiment.experiment_id
            else:  # its artifacts (none from bigjax) stay in the workdir too, not in ./mlruns
                artifacts = (self.workdir / "mlartifacts").as_uri() if local else None
                experiment_id = self.client.create_experiment(c.experiment, artifact_location=artifacts)
            run = self.client.create_run(experiment_id, run_name=run_name(c, self.workdir))
            self.owned = True  # its status is this process's to end, whatever its role
        elif self.role == "train":
            self.client.update_run(run.info.run_id, status="RUNNING")
        if self.role == "train":
            self._log_params(run)
        return run.info.run_id

    def _log_params(self, run) -> None:
        """The config as the run's parameters. MLflow's cannot change, so a resumed run adds only new keys."""
        from mlflow.entities import Param

        params = [Param(k, v) for k, v in flat_config(self.config).items() if k not in run.data.params]
        for start in range(0, len(params), 100):  # at most 100 per call
            self.client.log_batch(run.info.run_id, params=params[start : start + 100])

    def _log(self, step, metrics):
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def _close(self, failed):
        if self.owned:  # the trainer's run, or the eval job's own: not the trainer's run, which goes on
            self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")
