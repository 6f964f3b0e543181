"""Orbax checkpoints in WORKDIR/checkpoints/STEP: params, optimizer state, model state (BatchNorm statistics,
where a model has them), data-iterator state, counters, config.

Parameters and optimizer state are separate items so that eval, generation and fine-tuning can restore the
parameters alone. Restores take their target shardings from the *current* mesh, so a run can resume on a
different mesh shape than the one that saved it. Saves are async: training continues while they are written.

What keeps checkpoints trustworthy (docs/reliability.md):

* Orbax writes a step into the trainer's own WORKDIR/staging/TOKEN/STEP.orbax-checkpoint-tmp/ (`lock.JobLock`),
  writes `commit_success.txt` last, and only then renames the directory to checkpoints/STEP/. A step is *committed*
  when `STEP/commit_success.txt` exists; readers (the trainer, the eval job) only ever look at committed steps, so
  none of them reads a half-written checkpoint.
* Every write into the workdir is fenced by its lock (`lock.WorkdirLock.fenced`): that rename (in a bucket, where
  Orbax writes STEP/ in place, the writing of its commit marker), each keep-N deletion (a rename of the step out of
  checkpoints/ into the staging directory, deleted from there), config.json (written in the staging directory,
  renamed into place) and each move to the quarantine. A trainer that lost its lock while it stood still (a paused
  VM) commits nothing when it continues: its unfinished save stays in its staging directory, which nothing reads
  and the next trainer sets aside.
* The trainer resumes from the newest *usable* checkpoint. One that was never committed (in checkpoints/, or left
  in an earlier trainer's staging directory), or cannot be read (a truncated or missing file), is reported by step
  and path and moved, never deleted, to WORKDIR/quarantine/
  for the user to inspect; the next older one is tried. Out of checkpoints/, it cannot collide with a later
  save of the same step, and Orbax's keep-N cleanup never counts it, so it cannot push out a good checkpoint.
* A checkpoint whose config or array layout does not fit the current config is fine: the config changed. It
  is refused (CheckpointError listing the differences) and left where it is.
* A save that fails (disk full, unwritable directory) raises CheckpointError: the run stops rather than go on
  without the checkpoints it was asked to keep, and the checkpoints already committed stay.
* Keep-N is bigjax's, not Orbax's: Orbax decides at `save(step)` which old steps to delete and deletes them in a
  background thread once the save is final, and whether that thread sees the save's error depends on which
  thread reads it first. Here Orbax deletes nothing; `delete_old_checkpoints` runs in the trainer's main thread
  after a save has committed, and counts only committed steps, so a save that fails deletes nothing. A step it
  deletes leaves checkpoints/ at once (renamed, or in a bucket its commit marker deleted first), so a reader never
  takes a half-deleted step for a checkpoint.
* A step directory that exists is never written over (Orbax's own save would delete it first).
* Only arrays (tensorstore) and JSON are read back, by Orbax's handlers; nothing in a workdir is unpickled or
  executed, whatever other files a checkpoint directory holds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import os
import re
import threading
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from bigjax import config as config_lib
from bigjax import errors, paths
from bigjax.errors import UserError
from bigjax.ops import metrics
from bigjax.run import lock

COMMIT_MARKER = "commit_success.txt"  # Orbax writes it into a step just before the rename that commits it
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # a step Orbax started writing and never committed
# The items holding arrays; the others are JSON. model_state is saved only when the model has one, and opt_state
# only when the optimizer has one (a quantized run has none): Orbax refuses an empty item, so the items of a state
# are array_items(state).
ARRAY_ITEMS = ("params", "opt_state", "model_state")
OPTIONAL_ITEMS = ("opt_state", "model_state")


def array_items(state) -> tuple[str, ...]:
    return tuple(item for item in ARRAY_ITEMS if item not in OPTIONAL_ITEMS or jax.tree.leaves(getattr(state, item)))


class CheckpointError(UserError):
    """A checkpoint cannot be saved, or none can be resumed from: a message for the user."""


@dataclasses.dataclass
class Restored:
    step: int
    state: Any  # the train state, laid out on the current mesh
    data_state: dict  # the data iterator's state at `step`
    counters: dict  # run-level counts that must survive a restart (e.g. {"nan_skips": 2})


# The functions below take a workdir the command has normalised once (paths.workdir: by train, workdir.Run,
# paths.check_new_output), as an epath.Path or a local path.


def checkpoint_dir(workdir) -> epath.Path:
    return epath.Path(workdir) / "checkpoints"


def quarantine_dir(workdir) -> epath.Path:
    """Where unusable checkpoints are moved for the user to inspect: bigjax never deletes them."""
    return epath.Path(workdir) / "quarantine"


def step_dir(workdir, step: int) -> epath.Path:
    return checkpoint_dir(workdir) / str(step)


def manager(
    workdir, read_only: bool = False, best_metric: str = "", best_mode: str = "max", fence: lock.JobLock | None = None
) -> ocp.CheckpointManager:
    """The Orbax manager of WORKDIR/checkpoints: read-only for readers, async for the trainer, whose commits are
    fenced by its lock (`fence`, see `fenced_steps`); it deletes nothing (see `delete_old_checkpoints`).

    `best_metric`: checkpoints saved with eval metrics keep them, ranked by it (early stopping);
    `mngr.best_step()` names the best.
    """
    if not read_only:
        try:
            with fence.fenced():
                checkpoint_dir(workdir).mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise CheckpointError(
                f"cannot create {checkpoint_dir(workdir)}: {describe(error)}; pass a --workdir that can be written"
            ) from error
    _register_array_handler()
    # max_to_keep=None: Orbax keeps every step. With best_fn it saves each step's metrics and ranks them.
    ranking = dict(best_fn=lambda saved: saved[best_metric], best_mode=best_mode) if best_metric else {}
    options = ocp.CheckpointManagerOptions(
        create=not read_only,
        read_only=read_only,
        enable_async_checkpointing=not read_only,
        # Readers need only the step numbers; not reading every step's metadata also means a step the trainer
        # deletes or sets aside while a reader starts up cannot fail the reader.
        lightweight_initialize=read_only,
        max_to_keep=None,
        # The step directory is made before save() returns: made in the background, a failure to make it left
        # Orbax's writers waiting for it for 300 s (its coordination timeout) after the error was reported.
        async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
        temporary_path_class=None if read_only else fenced_steps(workdir, fence),
        **ranking,
    )
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def fenced_steps(workdir, fence: lock.JobLock) -> type:
    """How Orbax writes and commits a step (its TemporaryPath class), with the commit fenced by the workdir lock.

    On a disk, a step is written in the holder's staging directory, `fence.staging`/STEP.orbax-checkpoint-tmp, and
    committed by Orbax's rename of it to checkpoints/STEP, made inside `fence.fenced()`: a trainer that has lost its
    lock leaves its save where it wrote it, which no reader looks at. In a bucket, where a directory cannot be
    renamed, Orbax writes checkpoints/STEP in place and commits it by writing STEP/commit_success.txt, inside
    `fence.fenced()` (there: a read of lock.json just before). The items inside a step are Orbax's own business.
    """
    checkpoints = os.fspath(checkpoint_dir(workdir))
    orbax_way = ocp.path.atomicity_defaults.get_default_temporary_path_class(checkpoint_dir(workdir))

    class FencedStep(orbax_way):
        @classmethod
        def from_final(cls, final_path, **options):
            if os.fspath(final_path.parent) != checkpoints:  # an item of a step: committed with the step
                return orbax_way.from_final(final_path, **options)
            if orbax_way is ocp.path.atomicity.AtomicRenameTemporaryPath:
                return cls(fence.staging / (final_path.name + TMP_SUFFIX), final_path, **options)
            return super().from_final(final_path, **options)

        async def finalize(self):
            with fence.fenced():
                await super().finalize()

    return FencedStep


def _register_array_handler() -> None:
    """On CPU, replica 0 writes each replicated array whole. Orbax's replica-parallel save splits the writing
    of replicated arrays across their replicas, which pays on accelerators but costs a slice op per array and
    replica on the CPU (a tiny model's save took 13 s instead of 0.2 s on 8 simulated devices)."""
    if jax.default_backend() == "cpu":
        handler = ocp.type_handlers.ArrayHandler(use_replica_parallel=False)
        absl_logger = logging.getLogger("absl")
        level = absl_logger.level
        absl_logger.setLevel(logging.ERROR)  # Orbax warns at every override, which is meant
        try:
            ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
        finally:
            absl_logger.setLevel(level)


def step_identity(path) -> object | None:
    """What changes when a step directory is replaced by another of the same name: its inode on a disk, the
    modification time of its commit marker in a bucket (which has no inodes); None if it is gone."""
    try:
        if paths.is_url(path):
            return (epath.Path(path) / COMMIT_MARKER).stat().mtime
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


def write_config(workdir, config, fence: lock.JobLock) -> None:
    """Write DIR/config.json (the eval job and `generate` read it), atomically and only while `fence`'s lock is held
    (`lock.JobLock.write_text`)."""
    if jax.process_index() != 0:
        return
    workdir = epath.Path(workdir)
    try:
        fence.write_text(workdir / config_lib.CONFIG_FILE, config_lib.to_json(config))
    except OSError as error:
        raise CheckpointError(
            f"cannot write {workdir / config_lib.CONFIG_FILE}: {error.strerror or error}; a trainer needs a workdir "
            "it can write (the checkpoints there are untouched)"
        ) from error


def committed_steps(workdir) -> list[int]:
    """The committed steps in WORKDIR/checkpoints, oldest first: the only ones anything reads."""
    directory = checkpoint_dir(workdir)
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and (p / COMMIT_MARKER).exists())


# --------------------------------------------------------------------------------------------------
# Saving


def retention(keep: int, best_metric: str = "", best_mode: str = "max"):
    """Which committed checkpoints stay: the newest `keep`, and with `best_metric` the best one too (Orbax's own
    policies, applied by `delete_old_checkpoints`)."""
    policies = ocp.checkpoint_managers
    latest = policies.LatestN(keep)
    if not best_metric:
        return latest
    best = policies.BestN(
        get_metric_fn=lambda saved: saved[best_metric],
        reverse=best_mode == "min",  # BestN keeps the last of the sorted steps
        n=1,
        keep_checkpoints_without_metrics=False,
    )
    return policies.AnyPreservationPolicy([latest, best])


@dataclasses.dataclass(frozen=True)
class Writer:
    """The trainer's side of WORKDIR/checkpoints: Orbax's async manager (which deletes nothing) and keep-N."""

    mngr: ocp.CheckpointManager
    keep: Any  # an Orbax preservation policy, from `retention`
    fence: lock.JobLock  # every commit and deletion is made only while it is held

    def save(self, step: int, state, data_state: dict, counters: dict, config, eval_metrics=None) -> None:
        """Start an async save of everything a resume needs (and the eval metrics early stopping ranks it by).

        The save before it is waited for first, and once it has committed, the checkpoints `keep` no longer
        wants are deleted. Raises CheckpointError if this or an earlier save failed.
        """
        mngr = self.mngr
        with _save_errors_reported(mngr):
            mngr.wait_until_finished()
            delete_old_checkpoints(mngr, self.keep, self.fence)
            refuse_to_write_over(mngr, step)
            arrays = {item: ocp.args.StandardSave(getattr(state, item)) for item in array_items(state)}
            json_items = dict(data=data_state, counters=counters, config=config.to_dict())
            items = {**arrays, **{name: ocp.args.JsonSave(value) for name, value in json_items.items()}}
            mngr.save(step, args=ocp.args.Composite(**items), metrics=eval_metrics)

    def raise_if_a_save_failed(self) -> None:
        """Without waiting: raise CheckpointError if a save that ran in the background has failed.

        Asked only once the save is over: Orbax's finalize thread decides by the same error whether the save
        committed, and reading the error clears it, so reading it earlier would hide it from that thread.
        """
        if not self.mngr.is_saving_in_progress():
            self.finish()

    def finish(self) -> None:
        """Wait for the save in flight to commit; raise CheckpointError if it failed."""
        with _save_errors_reported(self.mngr):
            self.mngr.wait_until_finished()

    def delete_old(self) -> None:
        """keep-N, once no save is in flight (see `delete_old_checkpoints`)."""
        with _save_errors_reported(self.mngr):
            delete_old_checkpoints(self.mngr, self.keep, self.fence)


@contextlib.contextmanager
def writing_new_workdir(out, flag: str = "--out"):
    """paths.writing_new_output for a new workdir: filled under its lock, as any run's writes are (process 0 holds
    it, checks and removes). Yields the job's lock (lock.JobLock), through which every write is fenced; a failure
    removes what was written, in the workdir and in the lock's staging directory."""
    fences = []

    @contextlib.contextmanager
    def locked(directory):
        with lock.held(directory, say=metrics.say) as fence:
            fences.append(fence)
            yield

    leader = jax.process_index() == 0
    kept = (lock.LOCK_FILE, lock.STAGING_DIR)  # the lock's own: its release removes them
    with paths.writing_new_output(out, flag, hold=locked, besides=kept, leader=leader):
        try:
            yield fences[0]
        except BaseException:
            staging = fences[0].staging
            if leader and staging.is_dir():  # what the failed command prepared there (the release removes the rest)
                with contextlib.suppress(OSError):
                    paths.remove_all_but(staging, ())
            raise


def save_only_checkpoint(workdir, state, data_state: dict, counters: dict, config, fence: lock.JobLock) -> None:
    """Save and commit the one checkpoint of a new workdir (`bigjax import`, `quantize`, `lora merge`), at its step.
    If it fails, nothing of it is still being written once this raises, so that what it wrote can be removed: Orbax
    waits for a save's threads only when its blocking part succeeded, and the items whose writes had started before
    another failed go on in threads of their own, which are joined here (Orbax has no call for that)."""
    saves = writer(workdir, keep=1, fence=fence)
    try:
        saves.save(int(state.step), state, data_state, counters, config)
        saves.finish()
    except BaseException:
        with contextlib.suppress(Exception):  # its error is the one raised already
            saves.mngr.close()
        for thread in threading.enumerate():
            if type(thread).__module__.startswith("orbax.") and thread is not threading.current_thread():
                with contextlib.suppress(Exception):  # Orbax's threads raise their error again at join
                    thread.join()
        raise
    saves.mngr.close()


def writer(workdir, keep: int, fence: lock.JobLock, best_metric: str = "", best_mode: str = "max") -> Writer:
    """The trainer's Writer of WORKDIR/checkpoints: keep the newest `keep`, and the best by `best_metric`; it commits
    and deletes only while `fence`'s lock is held."""
    mngr = manager(workdir, best_metric=best_metric, best_mode=best_mode, fence=fence)
    return Writer(mngr, retention(keep, best_metric, best_mode), fence)


@dataclasses.dataclass(frozen=True)
class _CheckpointInfo:  # what Orbax's preservation policies read of a checkpoint
    step: int
    time: datetime.datetime
    metrics: dict | None


def write_derived_run(out, state, config, note_file: str, note: dict, data_state: dict | None = None) -> None:
    """Write `out` (new or empty) as a run made from another one (`bigjax quantize`, `bigjax lora merge`): one
    committed checkpoint of `state` at its step (with `data_state`, the data's position, for a run that trains on),
    its config.json, and `note_file` saying where it came from (JSON), under the workdir lock like any run's writes; a
    failed write removes what was written."""
    with writing_new_workdir(out) as fence:
        save_only_checkpoint(out, state, data_state or {}, {}, config, fence)
        write_config(out, config, fence)
        if jax.process_index() == 0:
            with fence.fenced():
                (paths.workdir(out) / note_file).write_text(json.dumps(note, indent=2) + "\n")


def delete_old_checkpoints(mngr: ocp.CheckpointManager, keep, fence: lock.JobLock) -> None:
    """Delete the committed checkpoints that `keep` (a preservation policy) does not keep.

    Called only between saves, when none is in flight. Only committed steps count, and the newest of them is
    always kept, so a committed checkpoint is deleted only for a newer one that has committed too. Process 0
    decides and deletes; the others then read the directory again.
    """
    workdir = epath.Path(mngr.directory).parent
    if jax.process_index() == 0:
        steps = committed_steps(workdir)
        infos = [_CheckpointInfo(step, _EPOCH, _saved_metrics(mngr, step)) for step in steps]
        keeps = keep.should_preserve(infos, context=ocp.checkpoint_managers.PreservationContext()) if infos else []
        for step, kept in zip(steps[:-1], keeps[:-1], strict=True):
            if not kept:
                delete_checkpoint(workdir, step, fence)
    _sync("bigjax_delete_old_checkpoints")
    mngr.reload()  # forget the deleted steps (and what early stopping ranked them by)


def delete_checkpoint(workdir, step: int, fence: lock.JobLock) -> None:
    """Take committed step `step` out of checkpoints/ at once, while the lock is held, and then delete it.

    On a disk the step is renamed into the holder's staging directory and deleted there; in a bucket, where it
    cannot be renamed at once, its commit marker is deleted first (a kill in between leaves a step without one,
    set aside at the next start like any save that never finished)."""
    path = step_dir(workdir, step)
    if paths.is_url(workdir):
        with fence.fenced():
            (path / COMMIT_MARKER).unlink()
        path.rmtree()
        return
    deleted = fence.staging / f"{step}.deleted"
    deleted.parent.mkdir(parents=True, exist_ok=True)
    with fence.fenced():
        path.rename(deleted)
    deleted.rmtree()


_EPOCH = datetime.datetime.fromtimestamp(0, datetime.UTC)  # the policies bigjax uses do not read times


def _saved_metrics(mngr, step: int) -> dict | None:
    """The eval metrics a step was saved with (early stopping ranks by them); None if it has none."""
    if not (epath.Path(mngr.directory) / str(step) / "metrics").exists():
        return None
    return mngr.metadata(step).metrics


def refuse_to_write_over(mngr, step: int) -> None:
    """Orbax's save deletes a step directory that exists already; bigjax never lets it (a workdir lock keeps a
    second trainer out, and this is the last check before the write)."""
    path = epath.Path(mngr.directory) / str(step)
    if path.exists() or path.with_name(path.name + TMP_SUFFIX).exists():
        raise CheckpointError(
            f"checkpoint {step} exists already at {path}: another trainer wrote it; this one stops without "
            "touching it. Find the other trainer (see `lock.json` in the workdir) before running again"
        )


@contextlib.contextmanager
def _save_errors_reported(mngr):
    """Turns whatever Orbax or the filesystem raised while saving into one CheckpointError that says what is kept."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as error:
        workdir = epath.Path(mngr.directory).parent
        kept = committed_steps(workdir)  # every deletion is done: they happen between saves, in this thread
        resume = f"rerun the same command to resume from step {kept[-1]}" if kept else "rerun the same command"
        raise CheckpointError(
            f"saving a checkpoint in {checkpoint_dir(workdir)} failed: {describe(error)}\n"
            f"Training stopped rather than go on without the checkpoints it was asked to keep. Committed "
            f"checkpoints are kept (steps: {', '.join(map(str, kept)) or 'none'}); {remedy(error)}, then {resume}."
        ) from error


def remedy(error: BaseException) -> str:
    """What to do about a failed save, by the OS reason found in the error (errors.remedy)."""
    return errors.remedy(describe(error))


# --------------------------------------------------------------------------------------------------
# Restoring


def restore_newest_usable(mngr: ocp.CheckpointManager, workdir, target_state, config, fence) -> Restored | None:
    """The newest checkpoint that is committed, fits `config` and reads back whole; None if there is none.

    Unusable checkpoints on the way are reported and moved to WORKDIR/quarantine/ (see the module docstring).
    A checkpoint that fits another config raises CheckpointError: the user changed the config, not the disk.
    """
    set_aside_uncommitted(workdir, fence)
    restored = None
    for step in reversed(committed_steps(workdir)):
        restored = _restore_or_set_aside(mngr, workdir, step, target_state, config, fence)
        if restored is not None:
            break
    mngr.reload()  # forget what was set aside, so that keep-N cleanup counts only what is really there
    return restored


def _restore_or_set_aside(mngr, workdir, step: int, target_state, config, fence) -> Restored | None:
    path = step_dir(workdir, step)
    try:
        saved = saved_config(mngr, step)
        layout = layout_differences(path, target_state)
    except Exception as error:  # unreadable JSON or metadata: files every process reads alike
        set_aside(workdir, path, "unreadable", f"cannot be read: {describe(error)}", fence)
        return None
    refuse_if_incompatible(step, saved, config, layout)
    try:
        restored, why = restore_train_state(mngr, step, target_state), None
    except Exception as error:  # a truncated or missing array file
        restored, why = None, describe(error)
    if not _everywhere(restored is not None):
        set_aside(workdir, path, "unreadable", f"cannot be read: {why or 'another process could not read it'}", fence)
        return None
    return restored


def restore_train_state(mngr, step: int, target_state) -> Restored:
    """Everything saved at `step`, laid out as `target_state` (ShapeDtypeStructs with shardings) says."""
    items = {item: ocp.args.StandardRestore(getattr(target_state, item)) for item in array_items(target_state)}
    items["data"] = ocp.args.JsonRestore()
    has_counters = (epath.Path(mngr.directory) / str(step) / "counters").is_dir()  # not in older checkpoints
    if has_counters:
        items["counters"] = ocp.args.JsonRestore()
    restored = mngr.restore(step, args=ocp.args.Composite(**items))
    step_array = jax.device_put(np.int32(step), target_state.step.sharding)
    state = target_state.replace(step=step_array, **{item: restored[item] for item in array_items(target_state)})
    return Restored(step, state, restored["data"], restored["counters"] if has_counters else {})


def restore_variables(mngr, step: int, target_variables: dict) -> dict:
    """The model's variables alone, {"params": ..., other collections}, onto the target's shardings: for eval,
    generation and fine-tuning. Optimizer state and data state are not read."""
    state_target = dict(target_variables)
    params_target = state_target.pop("params")
    items = dict(params=ocp.args.StandardRestore(params_target))
    if state_target:
        items["model_state"] = ocp.args.StandardRestore(state_target)
    restored = mngr.restore(step, args=ocp.args.Composite(**items))
    return {"params": restored["params"], **(restored["model_state"] if state_target else {})}


def saved_config(mngr, step: int) -> ml_collections.ConfigDict:
    """The config a checkpoint was saved with, as saved (not checked against today's schema)."""
    return ml_collections.ConfigDict(saved_json(mngr, step, "config"))


def saved_json(mngr, step: int, item: str) -> dict:
    """A JSON item saved at `step` (config, data, counters), as saved."""
    return mngr.restore(step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))[item]


def saved_tree(mngr, step: int, item: str = "params") -> dict:
    """The tree of an array item saved at `step`, as metadata (shape, dtype): nothing is read but the index.
    {} if the checkpoint has no such item (model_state exists only for models with batch statistics)."""
    if not (epath.Path(mngr.directory) / str(step) / item).is_dir():
        return {}
    reader = ocp.CheckpointManager(
        mngr.directory,
        item_handlers={item: ocp.StandardCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(read_only=True),
    )
    return reader.item_metadata(step)[item].tree


def restore_subset(mngr, step: int, target: dict, item: str = "params") -> dict:
    """Only the arrays named in `target` (a sub-tree of the item saved, ShapeDtypeStructs with shardings),
    restored onto its shardings: fine-tuning loads a backbone and leaves the rest of a checkpoint unread."""
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    args = ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True)
    return mngr.restore(step, args=ocp.args.Composite(**{item: args}))[item]


def layout_differences(path: epath.Path, target_state, shown: int = 4) -> list[str]:
    """How the arrays saved at `path` differ from `target_state`'s (names, shapes, dtypes); [] if they fit.

    Read from Orbax's metadata, without touching the array data, so that a config change that alters the
    state (e.g. optim.clip 0 <-> 1 adds or removes optimizer state) is refused clearly instead of failing
    the restore and being mistaken for a corrupt checkpoint.
    """
    differences = []
    for item in ARRAY_ITEMS:
        # An item may be absent on either side: model_state exists only for models with BatchNorm statistics.
        saved = _saved_arrays(path / item)
        present = item in array_items(target_state)
        wanted = ocp.tree.to_flat_dict(getattr(target_state, item), sep=".") if present else {}
        missing = sorted(set(wanted) - set(saved))
        extra = sorted(set(saved) - set(wanted))
        changed = [
            f"{name} {tuple(saved[name].shape)} {saved[name].dtype} -> {tuple(wanted[name].shape)} {wanted[name].dtype}"
            for name in sorted(set(saved) & set(wanted))
            if tuple(saved[name].shape) != tuple(wanted[name].shape) or saved[name].dtype != wanted[name].dtype
        ]
        for what, names in (("not in the checkpoint", missing), ("only in the checkpoint", extra), ("", changed)):
            if names:
                more = f" (and {len(names) - shown} more)" if len(names) > shown else ""
                differences.append(f"{item}: {what + ': ' if what else ''}{', '.join(names[:shown])}{more}")
    return differences


def _saved_arrays(item_dir: epath.Path) -> dict:
    """{flat name: array metadata} of one saved item; {} if the checkpoint has no such item."""
    if item_dir.name in OPTIONAL_ITEMS and not item_dir.exists():
        return {}
    return ocp.tree.to_flat_dict(ocp.StandardCheckpointHandler().metadata(item_dir).tree, sep=".")


def refuse_if_incompatible(step: int, saved, config, layout: list[str]) -> None:
    """Raise CheckpointError if the state saved at `step` cannot continue under `config`; log harmless changes."""
    conflicts = config_lib.resume_conflicts(saved, config)
    changes = config_lib.harmless_changes(saved, config)
    if conflicts:
        raise CheckpointError(
            f"cannot resume from checkpoint {step}: the config changed in ways the checkpoint cannot follow:\n  "
            + "\n  ".join(conflicts)
            + "\nuse a new --workdir, or undo these changes"
        )
    if layout:
        raise CheckpointError(
            f"cannot resume from checkpoint {step}: its arrays do not fit the state this config builds:\n  "
            + "\n  ".join(layout)
            + "\nconfig changes since that checkpoint:\n  "
            + ("\n  ".join(changes) or "none")
            + "\nuse a new --workdir, or undo the change that alters the model or optimizer state"
        )
    for change in changes:
        metrics.say(f"resuming with a changed config: {change}")


# --------------------------------------------------------------------------------------------------
# Setting unusable checkpoints aside


def set_aside_uncommitted(workdir, fence: lock.JobLock) -> None:
    """Move every step Orbax began and never committed (killed mid-write, failed save, or left by a trainer that
    lost its lock: in checkpoints/ or in an earlier trainer's staging directory), and every step that has lost its
    commit marker, to the quarantine. What else earlier trainers left in their staging directories (a config not
    yet in place, a step keep-N was deleting) is deleted."""
    in_checkpoints = _listed(checkpoint_dir(workdir))
    others = [holder for holder in _listed(epath.Path(workdir) / lock.STAGING_DIR) if holder.name != fence.staging.name]
    in_staging = [path for holder in others for path in _listed(holder) if path.name.endswith(TMP_SUFFIX)]
    _sync("bigjax_listed_uncommitted")  # every process has listed them before process 0 moves any
    for path in in_checkpoints:
        if path.name.endswith(TMP_SUFFIX):
            set_aside(workdir, path, "uncommitted", "is a save that never finished (killed or failed mid-write)", fence)
        elif path.name.isdigit() and not (path / COMMIT_MARKER).exists():
            if paths.is_url(workdir):  # in a bucket Orbax writes STEP/ in place, and the marker commits it
                why = f"has no {COMMIT_MARKER}: a save that never finished"
                set_aside(workdir, path, "uncommitted", why, fence)
            else:  # on a disk only a committed step is ever renamed to STEP/: this one was committed once
                why = f"has lost its {COMMIT_MARKER} (deleted, or partly deleted)"
                set_aside(workdir, path, "unmarked", why, fence)
    for path in in_staging:
        why = "is a save that never finished (its trainer was killed, or lost its lock, mid-write)"
        set_aside(workdir, path, "uncommitted", why, fence)
    if jax.process_index() == 0:
        for holder in others:
            delete_staging(holder, fence)


def _listed(directory: epath.Path) -> list[epath.Path]:
    return sorted(directory.iterdir()) if directory.is_dir() else []


def delete_staging(holder: epath.Path, fence: lock.JobLock) -> None:
    """Delete an earlier trainer's staging directory: moved into this one's first (while the lock is held)."""
    deleted = fence.staging / f"{holder.name}.deleted"
    deleted.parent.mkdir(parents=True, exist_ok=True)
    with fence.fenced():
        holder.rename(deleted)
    deleted.rmtree()


def set_aside(workdir, path: epath.Path, kind: str, why: str, fence: lock.JobLock) -> None:
    """Report `path` and move it to WORKDIR/quarantine/STEP.KIND.TIME/, with the reason beside it (process 0)."""
    step = path.name.split(".")[0]
    if jax.process_index() == 0:
        destination = quarantine_dir(workdir) / f"{step}.{kind}.{datetime.datetime.now():%Y%m%dT%H%M%S.%f}"
        try:
            with fence.fenced():
                destination.parent.mkdir(parents=True, exist_ok=True)
                # The reason first: in a bucket, where folders exist only through the objects in them, this creates the
                # folder that the move needs.
                destination.with_name(destination.name + ".txt").write_text(f"checkpoint {step} at {path} {why}\n")
                path.rename(destination)
        except OSError as error:  # e.g. a file named quarantine
            reason = error.strerror or str(error)
            raise CheckpointError(
                f"cannot move checkpoint {step} at {path} into {destination.parent}: {reason}; "
                f"{errors.remedy(reason)}, then rerun (it {why})"
            ) from error
        metrics.say(f"checkpoint {step} at {path} {why}; moved to {destination} (nothing is deleted)")
    _sync(f"bigjax_set_aside_{step}_{kind}")


# Kinds of quarantined steps that had been committed: a workdir holding one of them had a run to resume.
ONCE_COMMITTED = ("unreadable", "unmarked")


def had_checkpoints(workdir) -> bool:
    """Whether a checkpoint was ever committed here (in checkpoints/, or since set aside as unreadable or as having
    lost its commit marker). A save that never finished does not count: nothing was lost with it."""
    quarantine = quarantine_dir(workdir)
    set_aside_committed = quarantine.is_dir() and any(
        f".{kind}." in p.name for p in quarantine.iterdir() for kind in ONCE_COMMITTED
    )
    return bool(committed_steps(workdir)) or set_aside_committed


# --------------------------------------------------------------------------------------------------
# Helpers


def describe(error: BaseException, limit: int = 600) -> str:
    """The first line of the error at the root of `error`'s chain, with its type, its middle cut if long.

    Orbax wraps tensorstore's errors in ones that print pages of spec; the root says what is wrong, and
    the reason comes last: `... Requested byte range [0, 3836) is not valid for value of size 100` (a
    truncated file), `... Failed to write 14309 bytes to file 17: File too large` (a full disk).
    """
    while error.__cause__ is not None:
        error = error.__cause__
    # Tensorstore appends its spec and source locations in brackets, sometimes on lines of their own; the
    # reason (`File too large`, `No space left on device`) may then sit on any line: keep all, minus those.
    text = re.sub(r"\s*\[(source locations|tensorstore_spec)=.*?\]\s*$", "", str(error), flags=re.M | re.S)
    text = " ".join(line.strip() for line in text.strip().splitlines() if line.strip())
    if len(text) > limit:
        text = text[: limit // 3] + " ... " + text[-2 * limit // 3 :]
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _everywhere(ok: bool) -> bool:
    """True only if `ok` on every process: all processes take the same branch after a collective restore."""
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.array(ok))))


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
