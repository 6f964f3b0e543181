"""Fault injection for the tests in this folder: kill real `bigjax train` processes, damage checkpoints, and
check that restarting loses nothing.

Each *attempt* starts `bigjax train` on experiments/tiny.py (log_every=1, a checkpoint every 3 steps) in the same
workdir and, if the plan says so, sends it SIGTERM or SIGKILL: either once it has logged a chosen step, or while
the async write of a checkpoint is in flight (the process is frozen with SIGSTOP first, and the signal sent only
if the checkpoint is still uncommitted, so "mid-write" is a fact, not a race). Attempts go on until one
finishes. `verify` then compares the run with an uninterrupted one.

metrics.jsonl gets rows appended by every attempt; the row that counts for a step is the *last* one written
for it (a step redone after a restore supersedes the row of the attempt that died). Every row, superseded or
not, must equal the uninterrupted run's, bitwise (the training rows: each attempt's `goodput/` row of timings
differs from run to run).

CI runs one seed (tests/faults/test_kill_restart.py; BIGJAX_KILL_SEEDS=0,1,2 runs more). By hand, for many
more cycles:

    .venv/bin/python tests/faults/harness.py --seeds 10 --kills 4
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[2]
TINY = str(REPO / "experiments" / "tiny.py")
TOTAL_STEPS = 30
CHECKPOINT_EVERY = 3
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # bigjax.run.checkpoint.TMP_SUFFIX, without importing jax here


@dataclasses.dataclass(frozen=True)
class Kill:
    signal: signal.Signals  # SIGTERM (a preemption: save, exit 0) or SIGKILL (nothing runs)
    at: str  # "step": once `step` is logged; "write": while a checkpoint's async write is in flight
    step: int = 0

    def __str__(self):
        return f"{self.signal.name}@{'write' if self.at == 'write' else f'step {self.step}'}"


@dataclasses.dataclass
class Attempt:
    kill: Kill | None  # the planned kill, or None for an attempt left to finish
    sent: bool  # whether the signal was sent (the process may have finished first)
    returncode: int
    stdout: str
    stderr: str
    rows: list[dict]  # metrics rows this attempt appended
    resumed_from: int | None  # "resumed from step N"; None: started from step 0
    stopped_at: int | None  # "stopped by SIGTERM at step N"
    interrupted_write: int | None  # the step whose uncommitted write the signal landed in
    committed_after: list[int]  # committed checkpoint steps once the process had exited
    uncommitted_after: list[int]  # steps left half-written once it had exited

    @property
    def last_logged(self) -> int | None:
        return self.rows[-1]["step"] if self.rows else None

    def __str__(self):
        what = str(self.kill) if self.sent else "ran to the end"
        return (
            f"{what:18s} rc={self.returncode:4d} from={self.resumed_from} last logged={self.last_logged} "
            f"interrupted write={self.interrupted_write} committed={self.committed_after} "
            f"uncommitted={self.uncommitted_after}"
        )


def environment(compile_cache: pathlib.Path | None = None) -> dict:
    """8 simulated CPU devices, like the tests; a persistent compilation cache makes each restart ~5s faster."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    env["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", env["XLA_FLAGS"])  # under pytest: conftest's, which compile faster
    if compile_cache is not None and "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # under pytest: the shared one
        env.update(JAX_COMPILATION_CACHE_DIR=str(compile_cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    return env


def train_command(workdir, total_steps: int = TOTAL_STEPS, *overrides: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "bigjax.cli",
        "train",
        "--config",
        f"{TINY}:steps={total_steps}",
        "--workdir",
        str(workdir),
        "--config.log_every=1",
        f"--config.checkpoint_every={CHECKPOINT_EVERY}",
        *overrides,
    ]


def plan_kills(seed: int, count: int, total_steps: int = TOTAL_STEPS) -> list[Kill]:
    """`count` kills; every four of them cover SIGTERM and SIGKILL, at a step and mid-write, in a seeded order."""
    rng = random.Random(seed)
    kinds = [(signal.SIGTERM, "step"), (signal.SIGKILL, "step"), (signal.SIGKILL, "write"), (signal.SIGTERM, "write")]
    chosen = []
    while len(chosen) < count:
        chosen += rng.sample(kinds, len(kinds))
    # Early enough that each attempt is interrupted well before the end of the run.
    return [Kill(sig, at, rng.randint(2, total_steps * 3 // 5)) for sig, at in chosen[:count]]


def run_until_finished(workdir, kills: list[Kill], env: dict, total_steps: int = TOTAL_STEPS) -> list[Attempt]:
    """One attempt per planned kill, then attempts without one until the run finishes (at most 3)."""
    attempts = []
    for kill in [*kills, None, None, None]:
        attempts.append(run_attempt(workdir, train_command(workdir, total_steps), kill, env))
        if attempts[-1].returncode == 0 and "finished at step" in attempts[-1].stdout:
            break
    return attempts


def run_attempt(workdir, command: list[str], kill: Kill | None, env: dict, timeout: float = 300) -> Attempt:
    workdir = pathlib.Path(workdir)
    metrics_file = workdir / "metrics.jsonl"
    offset = metrics_file.stat().st_size if metrics_file.exists() else 0
    sent, interrupted_write = False, None
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=err, text=True)
        deadline = time.monotonic() + timeout
        try:
            while process.poll() is None:
                if time.monotonic() > deadline:
                    raise AssertionError(f"attempt with {kill} did not end within {timeout}s")
                if kill is not None and not sent:
                    sent, interrupted_write = _maybe_signal(process, kill, workdir, rows_since(metrics_file, offset))
                time.sleep(0.005)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    return Attempt(
        kill=kill,
        sent=sent,
        returncode=process.returncode,
        stdout=stdout,
        stderr=stderr,
        rows=rows_since(metrics_file, offset),
        resumed_from=number_after("resumed from step ", stdout),
        stopped_at=number_after("stopped by SIGTERM at step ", stdout),
        interrupted_write=interrupted_write,
        committed_after=committed_steps(workdir),
        uncommitted_after=uncommitted_steps(workdir),
    )


def _maybe_signal(process, kill: Kill, workdir: pathlib.Path, rows: list[dict]) -> tuple[bool, int | None]:
    """Send the kill if its moment has come: (sent, step of the write it interrupted)."""
    logged = rows[-1]["step"] if rows else 0
    writing = max(uncommitted_steps(workdir), default=None)
    if kill.at == "step":
        if logged < kill.step:
            return False, None
        process.send_signal(kill.signal)
        return True, None
    # Mid-write: the loop has moved past the checkpoint's step (the blocking part of the save is over) while
    # its directory is still uncommitted. Freeze the process, look again, and only then send the signal.
    if writing is None or logged <= writing:
        return False, None
    process.send_signal(signal.SIGSTOP)
    try:
        still_writing = writing in uncommitted_steps(workdir)
        if still_writing:
            process.send_signal(kill.signal)
    finally:
        process.send_signal(signal.SIGCONT)
    return (True, writing) if still_writing else (False, None)


# --------------------------------------------------------------------------------------------------
# Stopped processes


def all_threads_stopped(pid: int) -> bool:
    """Whether every thread of process `pid` has stopped (SIGSTOP is delivered asynchronously: a thread may still
    write for a few milliseconds after it was sent)."""
    return all(thread_state(pid, tid) in ("T", "t", None) for tid in os.listdir(f"/proc/{pid}/task"))


def thread_state(pid: int, tid: str) -> str | None:
    try:
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:  # the thread ended
        return None


def snapshot(workdir, leave_out=lambda relative: False) -> dict:
    """Every file and directory under workdir (but those `leave_out` names), with what changes when it is written,
    replaced or deleted."""
    found = {}
    for root, dirs, files in os.walk(workdir):
        for name in dirs + files:
            path = os.path.join(root, name)
            relative = os.path.relpath(path, workdir)
            if not leave_out(relative):
                info = os.stat(path)
                found[relative] = (info.st_ino, info.st_size, info.st_mtime_ns)
    return found


# --------------------------------------------------------------------------------------------------
# Reading what a run left


def rows_since(metrics_file: pathlib.Path, offset: int = 0) -> list[dict]:
    """Complete rows appended to metrics.jsonl after byte `offset` (a line still being written is left out)."""
    if not metrics_file.exists():
        return []
    with open(metrics_file, "rb") as f:
        f.seek(offset)
        lines = f.read().decode().split("\n")[:-1]
    return [json.loads(line) for line in lines if line.strip()]


def last_row_per_step(workdir) -> dict[int, dict]:
    """The training row that counts for each step: the last one written for it."""
    return {row["step"]: row for row in rows_since(pathlib.Path(workdir) / "metrics.jsonl") if "loss" in row}


def committed_steps(workdir) -> list[int]:
    directory = pathlib.Path(workdir) / "checkpoints"
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and (p / "commit_success.txt").exists())


def uncommitted_steps(workdir) -> list[int]:
    """Steps Orbax began and has not committed: in a trainer's staging directory (or, left by an older bigjax, in
    checkpoints/)."""
    workdir = pathlib.Path(workdir)
    places = [workdir / "checkpoints", *workdir.glob("staging/*")]
    names = []
    for place in places:
        try:
            names += os.listdir(place)
        except FileNotFoundError:
            pass
    return sorted(int(name[: -len(TMP_SUFFIX)]) for name in names if name.endswith(TMP_SUFFIX))


def set_aside(workdir, kind: str) -> list[int]:
    """Steps bigjax moved to WORKDIR/quarantine as `kind` ("uncommitted" or "unreadable")."""
    directory = pathlib.Path(workdir) / "quarantine"
    if not directory.is_dir():
        return []
    return sorted(int(p.name.split(".")[0]) for p in directory.iterdir() if p.is_dir() and f".{kind}." in p.name)


def number_after(text: str, output: str) -> int | None:
    match = re.search(re.escape(text) + r"(\d+)", output)
    return int(match.group(1)) if match else None


def final_state(workdir, step: int = TOTAL_STEPS):
    """(params, opt_state) of the checkpoint at `step`, restored onto one device as numpy."""
    import jax

    from bigjax import config as config_lib
    from bigjax.run import checkpoint
    from bigjax.run.setup import make_setup

    config = config_lib.load(TINY, ["config.mesh.data=1"])  # the state's layout does not depend on the length
    mngr = checkpoint.manager(workdir, read_only=True)
    restored = checkpoint.restore_train_state(mngr, step, make_setup(config, jax.devices()[:1]).state_target())
    return jax.device_get((restored.state.params, restored.state.opt_state))


def same_arrays(a, b) -> bool:
    """Whether two pytrees of arrays are bitwise equal."""
    import jax
    import numpy as np

    return all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(np.array_equal(x, y)), a, b)))


# --------------------------------------------------------------------------------------------------
# Damaging checkpoints


def array_files(step_dir, item):
    """The files tensorstore keeps an item's array data in (some may hold only superseded bytes)."""
    return sorted(p for p in (step_dir / item / "ocdbt.process_0" / "d").iterdir() if p.is_file())


# Each corruption returns a check that the damage is still there once the checkpoint has been moved aside.


def truncate_the_array_files(step_dir):
    sizes = {}
    for path in array_files(step_dir, "params"):
        sizes[path.relative_to(step_dir)] = path.stat().st_size // 2
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size // 2)
    return lambda moved: all((moved / relative).stat().st_size == size for relative, size in sizes.items())


def delete_the_array_files(step_dir):
    deleted = [path.relative_to(step_dir) for path in array_files(step_dir, "opt_state")]
    for relative in deleted:
        (step_dir / relative).unlink()
    return lambda moved: not any((moved / relative).exists() for relative in deleted)


# --------------------------------------------------------------------------------------------------
# The verdict


def verify(attempts: list[Attempt], workdir, reference, total_steps: int = TOTAL_STEPS) -> list[str]:
    """Everything that went wrong, as sentences; [] when the run lost nothing."""
    problems = []
    final = attempts[-1]
    if final.returncode != 0 or f"finished at step {total_steps}" not in final.stdout:
        problems.append(f"the last attempt did not finish (rc={final.returncode}): {final.stderr[-2000:]}")
    for previous, attempt in zip(attempts, attempts[1:], strict=False):
        expected = previous.committed_after[-1] if previous.committed_after else None
        if attempt.resumed_from != expected:
            problems.append(f"after {previous}: resumed from {attempt.resumed_from}, not the newest commit {expected}")
    for attempt in attempts:
        if not attempt.sent:
            continue
        if attempt.kill.signal == signal.SIGKILL and attempt.returncode != -signal.SIGKILL:
            problems.append(f"{attempt}: SIGKILL but rc={attempt.returncode}")
        if attempt.kill.signal == signal.SIGTERM:
            saved_where_it_stopped = (
                attempt.stopped_at == attempt.last_logged and attempt.stopped_at in attempt.committed_after
            )
            if attempt.returncode != 0 or not saved_where_it_stopped or attempt.uncommitted_after:
                problems.append(
                    f"{attempt}: SIGTERM must save the step it stopped at and exit 0: {attempt.stderr[-2000:]}"
                )

    # Half-written checkpoints were set aside (not deleted, not resumed from); nothing committed was unreadable.
    left_half_written = sorted(step for attempt in attempts for step in attempt.uncommitted_after)
    if set_aside(workdir, "uncommitted") != left_half_written:
        problems.append(
            f"set aside {set_aside(workdir, 'uncommitted')}, but {left_half_written} were left half-written"
        )
    if set_aside(workdir, "unreadable"):
        problems.append(f"committed checkpoints turned out unreadable: {set_aside(workdir, 'unreadable')}")

    # Losses: every row of every attempt, and the last row per step over the whole run, bitwise.
    expected_loss = {step: row["loss"] for step, row in last_row_per_step(reference).items()}
    for attempt in attempts:
        for row in (row for row in attempt.rows if "loss" in row):
            if row["loss"] != expected_loss.get(row["step"]):
                problems.append(
                    f"{attempt}: loss {row['loss']} at step {row['step']}, expected {expected_loss.get(row['step'])}"
                )
    counted = {step: row["loss"] for step, row in last_row_per_step(workdir).items()}
    if counted != expected_loss:
        problems.append("the last row per step differs from the uninterrupted run")

    # Final parameters and optimizer state, bitwise.
    if not problems and not same_arrays(final_state(workdir, total_steps), final_state(reference, total_steps)):
        problems.append("the final parameters or optimizer state differ from the uninterrupted run")
    return problems


def run_reference(workdir, env: dict, total_steps: int = TOTAL_STEPS) -> None:
    attempt = run_attempt(workdir, train_command(workdir, total_steps), None, env)
    assert attempt.returncode == 0, attempt.stderr[-3000:]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=10, help="runs, with seeds 0..N-1")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--kills", type=int, default=4, help="kills per run")
    parser.add_argument("--keep", action="store_true", help="keep the workdirs")
    args = parser.parse_args()
    from absl import logging

    logging.set_verbosity(logging.ERROR)  # Orbax's notes about read-only managers, when the final states are read

    root = pathlib.Path(tempfile.mkdtemp(prefix="bigjax-kill-harness-"))
    env = environment(root / "compile-cache")
    run_reference(root / "reference", env)
    cycles, failures, kill_steps = 0, 0, []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        workdir = root / f"seed{seed}"
        attempts = run_until_finished(workdir, plan_kills(seed, args.kills), env)
        problems = verify(attempts, workdir, root / "reference")
        sent = [a for a in attempts if a.sent]
        cycles += len(sent)
        kill_steps += [(str(a.kill), a.last_logged, a.interrupted_write) for a in sent]
        failures += bool(problems)
        print(f"seed {seed}: {len(sent)} kills, {len(attempts)} attempts: {'FAILED' if problems else 'identical'}")
        for attempt in attempts:
            print("   ", attempt)
        for problem in problems:
            print("    PROBLEM:", problem)
    print(f"\n{cycles} kill/restart cycles over {args.seeds} runs of {TOTAL_STEPS} steps; {failures} runs failed")
    print("kills (what, last step logged, write interrupted):", kill_steps)
    if not args.keep:
        shutil.rmtree(root)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
