"""Local files named by a pattern, and a fingerprint of them: for bigjax.data.sources and
bigjax.data.parquet_source alike, in a module of its own so that neither imports the other."""

from __future__ import annotations

import glob
import hashlib
import os
import pathlib

from bigjax.data.errors import DataError


def expand_paths(pattern: str, what: str, suffixes: tuple[str, ...] = ()) -> list[pathlib.Path]:
    """A file, every file under a directory, or a glob -> the files, sorted; a clear error when there are none."""
    path = pathlib.Path(pattern).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = [p for p in sorted(path.rglob("*")) if p.is_file() and not p.name.startswith(".")]
    elif glob.has_magic(pattern):
        files = [pathlib.Path(p) for p in sorted(glob.glob(os.path.expanduser(pattern), recursive=True))]
        files = [p for p in files if p.is_file()]
    else:
        raise DataError(f"{what} {pattern}: no such file or directory (config.data.source)")
    if suffixes:
        files = [p for p in files if p.suffix.lower() in suffixes]
    if not files:
        raise DataError(f"{what} {pattern}: no files found (config.data.source)")
    return files


def files_fingerprint(files: list[pathlib.Path]) -> str:
    """Changes when any file is added, removed, resized or rewritten."""
    digest = hashlib.sha256()
    for f in files:
        stat = f.stat()
        digest.update(f"{f.absolute()}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]
