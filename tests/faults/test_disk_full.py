"""A checkpoint save that fails stops the run with a clear error; the checkpoints already committed remain.

"Disk full" is a file-size limit on the trainer process (RLIMIT_FSIZE): its checkpoint writes then fail with
EFBIG ("File too large") inside tensorstore, as they would with ENOSPC on a full disk. It works as root, where
a read-only directory would not stop writes, and needs no mount.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
from conftest import REPO, TINY, file_size_limit
from harness import committed_steps, environment, rows_since, set_aside

# The trainer, started with no file allowed to grow past 32 KiB: its metrics and config fit, checkpoint arrays
# do not. (A wrapper that sets the limit and execs, since preexec_fn would fork this multithreaded process.)
WITH_SMALL_FILES_ONLY = (
    "import os, resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (32 * 1024, 32 * 1024)); "
    "os.execv(sys.executable, [sys.executable, '-m', 'bigjax.cli', *sys.argv[1:]])"
)

# The same, with the bad ordering of issue 11 forced: Orbax's async-save thread, once it has recorded the save's
# error, waits until the trainer's main thread has asked about the save (by either of the manager's two ways)
# before it ends. Orbax's finalize thread decides by reading that error whether the save committed and whether
# keep-N may delete older steps; a main thread that read (and so cleared) the error first made it delete them.
WITH_SMALL_FILES_AND_THE_MAIN_THREAD_ASKING_FIRST = """
import resource, sys, threading
resource.setrlimit(resource.RLIMIT_FSIZE, (32 * 1024, 32 * 1024))
from orbax.checkpoint import checkpoint_manager
from orbax.checkpoint._src.checkpointers import async_checkpointer

asked = threading.Event()
thread_func = async_checkpointer._AsyncManager._thread_func

def thread_func_that_lets_the_main_thread_ask_first(self, *args, **kwargs):
    thread_func(self, *args, **kwargs)
    if self._exception is not None:
        asked.clear()
        asked.wait(120)

async_checkpointer._AsyncManager._thread_func = thread_func_that_lets_the_main_thread_ask_first
for name in ("check_for_errors", "is_saving_in_progress"):
    def asking(self, *args, _original=getattr(checkpoint_manager.CheckpointManager, name), **kwargs):
        try:
            return _original(self, *args, **kwargs)
        finally:
            if threading.current_thread() is threading.main_thread():
                asked.set()
    setattr(checkpoint_manager.CheckpointManager, name, asking)

from bigjax import cli
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return environment(tmp_path_factory.mktemp("compile-cache"))


def run_limited(wrapper: str, args, env, timeout=600) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", wrapper, *map(str, args)]
    # No compilation cache for the limited process: its entries are larger than the limit, and a failed cache
    # write must not be what this test sees.
    limited = {key: value for key, value in env.items() if not key.startswith("JAX_COMPILATION_CACHE")}
    return subprocess.run(command, cwd=REPO, env=limited, capture_output=True, text=True, timeout=timeout)


def the_error(result) -> str:
    """The `error:` line and what follows it on stderr."""
    stderr = "\n" + result.stderr  # the error line may be the first one
    assert "\nerror: " in stderr, result.stderr[-5000:]
    return stderr[stderr.index("\nerror: ") + 1 :]


def keeping_one(workdir) -> tuple:
    args = ("train", "--config", TINY + ":steps=16", "--workdir", workdir, "--config.log_every=1")
    return args + ("--config.keep_checkpoints=1",)  # keep-N must not delete step 4 for a step 8 that never commits


@pytest.fixture(scope="module")
def stopped_at_step_4(tmp_path_factory):
    """A run of `keeping_one` stopped at step 4 (a committed checkpoint), trained once, in this process (what is
    tested is the trainers started on it): each test below gets a copy."""
    from bigjax import config as config_lib
    from bigjax.run import train

    workdir = tmp_path_factory.mktemp("stopped") / "run"
    args = keeping_one(workdir)
    overrides = [arg.removeprefix("--") for arg in args[args.index("--workdir") + 2 :]]
    assert train.train(config_lib.load(args[args.index("--config") + 1], overrides), workdir, stop_at_step=4).step == 4
    return workdir


def copy_of_stopped(stopped_at_step_4, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(stopped_at_step_4, workdir)
    return workdir


@pytest.mark.parametrize(
    "wrapper", [WITH_SMALL_FILES_ONLY, WITH_SMALL_FILES_AND_THE_MAIN_THREAD_ASKING_FIRST], ids=["plain", "asked-first"]
)
def test_a_failed_save_stops_training_and_keeps_the_committed_checkpoints(
    cli_in_process, env, tmp_path, wrapper, stopped_at_step_4
):
    workdir = copy_of_stopped(stopped_at_step_4, tmp_path)
    args = keeping_one(workdir)

    result = run_limited(wrapper, args, env)

    assert result.returncode == 2, result.stderr[-3000:]
    error = the_error(result)
    assert "saving a checkpoint in" in error and "File too large" in error, result.stderr[-5000:]
    assert "Committed checkpoints are kept (steps: 4)" in error and "resume from step 4" in error
    assert "free disk space" in error  # the OS reason seen (EFBIG) decides the advice
    # One error, and where its details are: Orbax's tracebacks went to the workdir's log file, not the console.
    assert "Traceback" not in result.stderr and error.splitlines()[-1].startswith("details: ")
    assert "File too large" in pathlib.Path(error.splitlines()[-1].removeprefix("details: ")).read_text()
    # It stopped at the latest when the next save came due (step 12), rather than train on unprotected.
    assert 8 <= rows_since(workdir / "metrics.jsonl")[-1]["step"] <= 12
    assert committed_steps(workdir) == [4]

    # With space again, the same command (through cli.main in this process) sets the half-written save aside and
    # resumes from step 4.
    out = cli_in_process(*args).stdout
    assert "resumed from step 4" in out and "finished at step 16" in out
    assert set_aside(workdir, "uncommitted") == [8]
    assert committed_steps(workdir) == [16]  # keep-N, once a newer step has committed


# A save that cannot make its step directory (an unwritable checkpoints/, as a non-root user would see it):
# the directory's creation is refused for step 8.
WITH_STEP_8_UNWRITABLE = """
import errno, os, sys
from orbax.checkpoint._src.path import atomicity

create = atomicity.AtomicRenameTemporaryPath.create

async def create_refused_for_step_8(self, *args, **kwargs):
    if os.path.basename(str(self.get_final())) == "8":
        raise PermissionError(errno.EACCES, "Permission denied", str(self.get()))
    return await create(self, *args, **kwargs)

atomicity.AtomicRenameTemporaryPath.create = create_refused_for_step_8
from bigjax import cli
sys.exit(cli.main(sys.argv[1:]))
"""


# A really full disk (ENOSPC), where everything the trainer writes fails alike, not only files past a size: a tmpfs
# of 4 MiB, mounted in a mount namespace of its own (a user namespace too, so no root is needed), holding a copy of
# the run and a filler that leaves 64 KiB free (metrics fit, a checkpoint does not). What the trainer left is copied
# out before the namespace, and the tmpfs with it, goes.
ON_A_FULL_DISK = """
import os, shutil, subprocess, sys
mount_point, run, left = sys.argv[1:4]
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", mount_point], check=True)
shutil.copytree(run, os.path.join(mount_point, "run"))
disk = os.statvfs(mount_point)
with open(os.path.join(mount_point, "filler"), "wb") as f:
    f.write(bytes(disk.f_bavail * disk.f_frsize - 64 * 1024))
trainer = subprocess.run([sys.executable, "-m", "bigjax.cli", *sys.argv[4:]])
shutil.copytree(os.path.join(mount_point, "run"), left, ignore=shutil.ignore_patterns("lock.json"))
sys.exit(trainer.returncode)
"""


def test_a_save_on_a_full_disk_is_one_error_line_however_many_writers_fail(env, tmp_path, stopped_at_step_4):
    mount_point, left = tmp_path / "disk", tmp_path / "left"
    mount_point.mkdir()
    args = keeping_one(mount_point / "run")
    namespace = ["unshare", "--user", "--map-root-user", "--mount"]
    command = [*namespace, sys.executable, "-c", ON_A_FULL_DISK, mount_point, stopped_at_step_4, left, *args]
    result = subprocess.run(list(map(str, command)), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)

    assert result.returncode == 2, result.stderr[-5000:]
    error = the_error(result)
    assert "saving a checkpoint in" in error and "No space left on device" in error, result.stderr[-5000:]
    assert "free disk space" in error and "resume from step 4" in error
    # The TensorBoard and metrics writers' flushes fail too as the run stops: they must not hide the error line.
    assert "Traceback" not in result.stderr and error.splitlines()[-1].startswith("details: "), result.stderr[-5000:]
    assert committed_steps(left) == [4]


def test_a_failed_metrics_write_is_one_error_and_the_rerun_sets_its_cut_off_row_aside(tmp_path, capsys):
    from bigjax.ops import metrics

    path = tmp_path / "metrics.jsonl"
    first, second, third = (json.dumps({"step": step, "loss": 5.0 - step}) + "\n" for step in (1, 2, 3))
    writer = metrics.JsonLines(path)
    writer.write(first)
    with file_size_limit(len(first) + 10):
        with pytest.raises(metrics.MetricsError, match=f"cannot write {path}: File too large; free disk space"):
            writer.write(second)  # 10 bytes of it are written
    writer.close()
    assert path.read_text() == first + second[:10]

    # The rerun's writer moves the cut-off row aside (never deleted) and appends on a line of its own.
    again = metrics.JsonLines(path)
    again.write(third)
    again.close()
    assert path.read_text() == first + third
    [aside] = tmp_path.glob("metrics.jsonl.cut-off.*")
    assert aside.read_text() == second[:10]
    assert f"{path} ended in a cut-off line" in capsys.readouterr().out


def test_a_save_that_cannot_make_its_directory_stops_at_once_with_the_os_reason(env, tmp_path, stopped_at_step_4):
    workdir = copy_of_stopped(stopped_at_step_4, tmp_path)
    args = keeping_one(workdir)

    # Orbax's writers used to wait 300 s (its coordination timeout) for the directory after the error was shown.
    result = run_limited(WITH_STEP_8_UNWRITABLE, args, env, timeout=120)

    assert result.returncode == 2, result.stderr[-3000:]
    error = the_error(result)
    assert "PermissionError: [Errno 13] Permission denied" in error and "make the directory writable" in error
    assert "Traceback" not in result.stderr
    assert committed_steps(workdir) == [4]


def unprivileged(command: list) -> list:
    """`command` run as a user without root's right to write anywhere: a user namespace where this process is
    nobody, so a directory's permission bits hold for it (they do for any user but root already)."""
    return ["unshare", "--user", "--map-user=65534", "--map-group=65534", *command] if os.geteuid() == 0 else command


def test_a_read_only_workdir_with_checkpoints_is_one_error_and_left_as_it_was(env, tmp_path, stopped_at_step_4):
    workdir = copy_of_stopped(stopped_at_step_4, tmp_path)
    args = keeping_one(workdir)
    workdir.chmod(0o555)
    before = sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*"))
    try:
        command = unprivileged([sys.executable, "-m", "bigjax.cli", *map(str, args)])
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    finally:
        workdir.chmod(0o755)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.startswith(f"error: cannot lock {workdir}/lock.json: Permission denied"), result.stderr
    assert "a trainer needs a workdir it can write" in result.stderr and "Traceback" not in result.stderr
    assert sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*")) == before
    assert committed_steps(workdir) == [4]


def test_a_workdir_that_cannot_be_created_is_a_clear_error(cli_in_process, tmp_path):
    (tmp_path / "a-file").write_text("not a directory")
    result = cli_in_process("train", "--config", TINY, "--workdir", tmp_path / "a-file" / "run", check=False)
    assert result.returncode == 2
    assert "error: cannot create" in result.stderr and "pass a --workdir that can be written" in result.stderr


def test_the_reason_of_a_failed_write_survives_however_tensorstore_lays_out_its_message():
    from bigjax.run.checkpoint import describe

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


def test_the_advice_for_a_failed_save_follows_the_os_reason_not_a_guess():
    from bigjax.run.checkpoint import remedy

    assert remedy(OSError(28, "No space left on device")) == "free disk space"
    assert remedy(OSError(30, "Read-only file system")) == "make the directory writable"
    assert remedy(ValueError("Destination /w/checkpoints/8 already exists.")) == "fix the cause above"
