"""The read side of a run: `Run(workdir)` knows where everything of a workdir is, the config it saved, which of
its checkpoints are committed, and how to restore their parameters onto a setup.

Every command that reads a run (eval, generate, quantize, lora, export, deploy, distill's teacher, init_from,
plot) starts from a `Run`; the writers own the names of the files they write (`checkpoint`, `lock`, `metrics`,
`config`), and this class is where a reader finds them. The workdir is normalised once, here.

    WORKDIR/config.json          the resolved config of the latest run (config.CONFIG_FILE)
    WORKDIR/checkpoints/STEP/    one per save; committed when STEP/commit_success.txt exists (checkpoint.py)
    WORKDIR/quarantine/          unusable checkpoints, set aside, never deleted
    WORKDIR/lock.json, staging/  the trainer's lease and its unfinished writes (lock.py)
    WORKDIR/metrics.jsonl        the trainer's rows (and its inline evaluations, as eval/NAME)
    WORKDIR/eval/metrics.jsonl   the eval job's rows
"""

from __future__ import annotations

import ml_collections
from etils import epath

from bigjax import config as config_lib
from bigjax import paths
from bigjax.ops import metrics
from bigjax.run import checkpoint, lock

EVAL_DIR = "eval"  # WORKDIR/eval: what the eval job writes (its metrics, its compiled step)


class Run:
    """A workdir, read: its paths, its saved config, its committed steps, its parameters."""

    def __init__(self, workdir):
        self.path: epath.Path = workdir.path if isinstance(workdir, Run) else paths.workdir(workdir)

    def __str__(self) -> str:
        return str(self.path)

    # Where things are

    @property
    def config_file(self) -> epath.Path:
        return self.path / config_lib.CONFIG_FILE

    @property
    def checkpoints(self) -> epath.Path:
        return checkpoint.checkpoint_dir(self.path)

    @property
    def quarantine(self) -> epath.Path:
        return checkpoint.quarantine_dir(self.path)

    def step_dir(self, step: int) -> epath.Path:
        return checkpoint.step_dir(self.path, step)

    @property
    def lock_file(self) -> epath.Path:
        return self.path / lock.LOCK_FILE

    @property
    def staging(self) -> epath.Path:
        return self.path / lock.STAGING_DIR

    @property
    def metrics_file(self) -> epath.Path:
        return self.path / metrics.METRICS_FILE

    @property
    def eval_dir(self) -> epath.Path:
        return self.path / EVAL_DIR

    @property
    def eval_metrics_file(self) -> epath.Path:
        return self.eval_dir / metrics.METRICS_FILE

    # What it holds

    def has_config(self) -> bool:
        return self.config_file.exists()

    def saved_config(self, overrides=(), alternative: str = "") -> ml_collections.ConfigDict:
        """WORKDIR/config.json, read and checked (config.load_saved)."""
        return config_lib.load_saved(self.path, overrides, alternative)

    def committed_steps(self) -> list[int]:
        """The committed steps, oldest first: the only ones anything reads."""
        return checkpoint.committed_steps(self.path)

    def committed_step(self, step: int | None = None) -> int:
        """`step` if it is a committed checkpoint here, else (None) the newest: the one step picker. One
        CheckpointError naming what there is otherwise."""
        committed = self.committed_steps()
        if not committed:
            raise checkpoint.CheckpointError(
                f"no committed checkpoint in {self.checkpoints}; train first, or wait for the first save"
            )
        if step is not None and step not in committed:
            raise checkpoint.CheckpointError(
                f"checkpoint {step} is not a committed checkpoint of {self.path}; committed: "
                f"{', '.join(map(str, committed))}"
            )
        return committed[-1] if step is None else step

    # Reading checkpoints

    def reader(self):
        """A read-only Orbax manager of the checkpoints: it writes nothing, and reads only what it is asked. A new
        one each time: a manager lists the steps once, and a run that is being followed saves new ones."""
        return checkpoint.manager(self.path, read_only=True)

    def config_at(self, step: int) -> ml_collections.ConfigDict:
        """The config checkpoint `step` was saved with, upgraded like config.json (not checked)."""
        return config_lib.from_dict(checkpoint.saved_config(self.reader(), step).to_dict())

    def restore_variables(self, step: int, target: dict) -> dict:
        """The model's variables at `step` ({"params": ..., other collections}), onto `target`'s shardings."""
        return checkpoint.restore_variables(self.reader(), step, target)

    def restore_onto(self, setup, step: int) -> dict:
        """The model's variables at `step`, laid out on `setup`'s mesh as its model wants them."""
        return self.restore_variables(step, setup.variables_target())
