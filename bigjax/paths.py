"""Workdirs on a local or mounted disk, or in a bucket (`gs://bucket/run`): one path type for both.

Orbax and TensorStore write checkpoints to a bucket themselves; bigjax's own files in a workdir (config.json,
metrics, commit checks, the quarantine) go through `etils.epath`, which reads and writes both. Buckets need the
`[gcs]` extra (gcsfs) where TensorFlow is not installed.
"""

from __future__ import annotations

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
