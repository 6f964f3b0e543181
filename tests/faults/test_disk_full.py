"""A checkpoint save that fails stops the run with a clear error; the checkpoints already committed remain.

"Disk full" is a file-size limit on the trainer process (RLIMIT_FSIZE): its checkpoint writes then fail with
EFBIG ("File too large") inside tensorstore, as they would with ENOSPC on a full disk. It works as root, where
a read-only directory would not stop writes, and needs no mount.
"""

import subprocess
import sys

import pytest
from conftest import REPO, TINY
from harness import committed_steps, environment, rows_since, set_aside

# The trainer, started with no file allowed to grow past 32 KiB: its metrics and config fit, checkpoint arrays
# do not. (A wrapper that sets the limit and execs, since preexec_fn would fork this multithreaded process.)
WITH_SMALL_FILES_ONLY = (
    "import os, resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (32 * 1024, 32 * 1024)); "
    "os.execv(sys.executable, [sys.executable, '-m', 'bigjax.cli', *sys.argv[1:]])"
)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return environment(tmp_path_factory.mktemp("compile-cache"))


def test_a_failed_save_stops_training_and_keeps_the_committed_checkpoints(cli, env, tmp_path):
    workdir = tmp_path / "run"
    args = ("train", "--config", TINY + ":steps=16", "--workdir", workdir, "--config.log_every=1")
    args += ("--config.keep_checkpoints=1",)  # keep-N must not delete step 4 for a step 8 that never commits
    cli(*args, "--stop-at-step", "4", env=env)

    command = [sys.executable, "-c", WITH_SMALL_FILES_ONLY, *map(str, args)]
    # No compilation cache for the limited process: its entries are larger than the limit, and a failed cache
    # write must not be what this test sees.
    limited = {key: value for key, value in env.items() if not key.startswith("JAX_COMPILATION_CACHE")}
    result = subprocess.run(command, cwd=REPO, env=limited, capture_output=True, text=True, timeout=600)

    assert result.returncode == 2, result.stderr[-3000:]
    stderr = "\n" + result.stderr  # the error line may be the first one
    error = stderr[stderr.index("\nerror: ") :]
    assert "saving a checkpoint in" in error and "File too large" in error, result.stderr[-5000:]
    assert "Committed checkpoints are kept (steps: 4)" in error and "resume from step 4" in error
    # It stopped at the latest when the next save came due (step 12), rather than train on unprotected.
    assert 8 <= rows_since(workdir / "metrics.jsonl")[-1]["step"] <= 12
    assert committed_steps(workdir) == [4]

    # With space again, the same command sets the half-written save aside and resumes from step 4.
    out = cli(*args, env=env).stdout
    assert "resumed from step 4" in out and "finished at step 16" in out
    assert set_aside(workdir, "uncommitted") == [8]


def test_a_workdir_that_cannot_be_created_is_a_clear_error(cli, tmp_path):
    (tmp_path / "a-file").write_text("not a directory")
    result = cli("train", "--config", TINY, "--workdir", tmp_path / "a-file" / "run", check=False)
    assert result.returncode == 2
    assert "error: cannot create" in result.stderr and "pass a --workdir that can be written" in result.stderr


def test_the_reason_of_a_failed_write_survives_however_tensorstore_lays_out_its_message():
    from bigjax.checkpoint import describe

    long_path = "/tmp/run/checkpoints/8.orbax-checkpoint-tmp/opt_state.orbax-checkpoint-tmp/" + "x" * 700
    one_line = ValueError(f'OUT_OF_RANGE: Error writing "a" in {long_path}: File too large [source locations=a.cc:1]')
    two_lines = ValueError(
        f'OUT_OF_RANGE: Error writing "a" in\n{long_path}:\nFile too large\n[source locations=\na.cc:1]'
    )
    for error in (one_line, two_lines):
        try:
            raise RuntimeError("orbax's wrapper") from error
        except RuntimeError as wrapped:
            text = describe(wrapped)
        assert text.startswith("ValueError: OUT_OF_RANGE") and text.endswith("File too large"), text
        assert len(text) < 650 and "source locations" not in text
