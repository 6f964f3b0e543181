"""Workdirs on a local or mounted disk, or in a bucket (`gs://bucket/run`): one path type for both.

Orbax and TensorStore write checkpoints to a bucket themselves; bigjax's own files in a workdir (config.json,
metrics, commit checks, the quarantine) go through `etils.epath`, which reads and writes both. Buckets need the
`[gcs]` extra (gcsfs) where TensorFlow is not installed.
"""

from __future__ import annotations

import contextlib
import os

from etils import epath

from bigjax.errors import UserError


def workdir(path) -> epath.Path:
    """`path` as an epath.Path: absolute when local, as given when a URL."""
    if not os.fspath(path):  # epath.Path("") is the current directory: never written into by accident
        raise UserError("the workdir is an empty path (''); name a directory, or '.' for the current one")
    path = epath.Path(path)
    return path if is_url(path) else path.absolute()


def is_url(path) -> bool:
    """Whether `path` names a bucket (gs://, s3://, ...) rather than a local or mounted directory."""
    return "://" in os.fspath(path)


# --------------------------------------------------------------------------------------------------
# Outputs: the directories a command writes anew (`import --workdir`, `export`/`quantize`/`lora` `--out`)


class OutputError(UserError):
    """An output that would overwrite something, or whose writing failed: a message for the user."""


def check_new_output(out, flag: str = "--out", besides=()) -> epath.Path:
    """`out` as a path, if a command may write a new directory there: nothing there yet, or an empty directory
    (`besides` aside: the lock file of the writer checking). Nothing a user made is ever overwritten or added to."""
    out = workdir(out)
    there = [out] if is_url(out) else [out, *out.parents]
    existing = next((path for path in there if path.exists()), None)
    if existing is not None and not existing.is_dir():
        what = "is a file" if existing == out else f"cannot be a directory: {existing} is a file"
        raise OutputError(f"{flag} {out} {what}; name a new or empty directory")
    if existing == out and any(entry.name not in besides for entry in out.iterdir()):
        raise OutputError(
            f"{flag} {out} is not empty; name a new or empty directory (bigjax never writes beside or over files "
            "already there)"
        )
    return out


@contextlib.contextmanager
def writing_new_output(out, flag: str = "--out", hold=None, besides=(), leader: bool = True):
    """Create `out` (checked new or empty) for the body to fill. If the body fails, what it wrote is removed, and
    the directories made for it, so that a failed command leaves nothing behind; an OSError (a full disk) is then
    one OutputError. `hold(out)` (the workdir lock, whose file is `besides`) is entered once `out` exists, and `out`
    checked again under it: a writer that filled it meanwhile is refused there, before anything is removed. In a
    job of several processes that all enter this, one `leader` checks under the hold and removes (the others would
    see its first writes)."""
    out = check_new_output(out, flag)
    made = [] if is_url(out) else [path for path in (out, *out.parents) if not path.exists()]  # deepest first
    try:
        out.mkdir(parents=True, exist_ok=True)
        with hold(out) if hold else contextlib.nullcontext():
            if leader:
                check_new_output(out, flag, besides)
            try:
                yield out
            except BaseException as failure:
                if leader:
                    try:
                        remove_all_but(out, besides)
                    except OSError as leftover:
                        raise OutputError(
                            f"writing {out} failed ({failure}), and removing what was written failed too "
                            f"({leftover.strerror or leftover}): remove {out} by hand"
                        ) from failure
                raise
    except BaseException as error:
        if leader:
            for directory in made:  # only while empty (os.rmdir refuses others): never what another writer put there
                with contextlib.suppress(OSError):
                    os.rmdir(directory)
        if isinstance(error, OSError):
            raise OutputError(
                f"writing {out} failed: {error.strerror or error}; nothing was left there. Free space on that disk "
                f"or make it writable, or name another {flag}"
            ) from error
        raise


def remove_all_but(directory: epath.Path, kept) -> None:
    for entry in directory.iterdir():
        if entry.name in kept:
            continue
        if entry.is_dir():
            entry.rmtree()
        else:
            entry.unlink()
