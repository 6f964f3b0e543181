"""Recovery time on a CPU: a run's start to its first step, cold, and resumed with and without the compilation cache.

    .venv/bin/python benchmarks/resume_time.py [--config experiments/shakespeare_char.py] [--rounds 3]

Each round, in a new workdir with a new (empty) compilation cache, one run in three `bigjax train` processes:

    cold               --stop-at-step 1: nothing compiled before
    resumed, no cache  --stop-at-step 2 --config.compilation_cache=off: what every resume cost before the cache
    resumed            --stop-at-step 3: loads what the cold start compiled

Measured for each: the wall time from starting the process to its first step's line (log_every=1: the line comes
once the step has run), and the CPU time of the whole process (user + system: one step and one checkpoint more than
the first step, the same for all three). The medians over the rounds, then each run's `goodput:` line. XLA's own
flags (no XLA_FLAGS), one CPU device. The CPU time is the steadier figure on a shared machine.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import statistics
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
RUNS = (
    ("cold", 1, []),
    ("resumed, no cache", 2, ["--config.compilation_cache=off"]),
    ("resumed", 3, []),
)


def run(config: str, workdir: pathlib.Path, cache: pathlib.Path, stop_at: int, extra: list[str], env: dict):
    """(seconds to the first step's line, CPU seconds of the process, its goodput line)."""
    command = [sys.executable, "-m", "bigjax.cli", "train", "--config", config, "--workdir", str(workdir)]
    command += ["--stop-at-step", str(stop_at), "--config.log_every=1", f"--config.compilation_cache={cache}", *extra]
    before = os.times()
    started = time.monotonic()
    with tempfile.TemporaryFile("w+") as stderr:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)
        first_step, lines = None, []
        for line in process.stdout:
            lines.append(line)
            if first_step is None and re.match(rf"step {stop_at}: ", line):
                first_step = time.monotonic() - started
        if process.wait() != 0 or first_step is None:
            stderr.seek(0)
            raise SystemExit(
                f"{' '.join(command)} failed ({process.returncode}):\n{''.join(lines)}{stderr.read()[-3000:]}"
            )
    after = os.times()
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    return first_step, cpu, next(line.strip() for line in lines if line.startswith("goodput:"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="experiments/shakespeare_char.py")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR")}
    env["JAX_PLATFORMS"] = "cpu"
    figures = {name: [] for name, _, _ in RUNS}
    goodput_lines = []
    with tempfile.TemporaryDirectory(prefix="bigjax-resume-time-") as root:
        for round_ in range(args.rounds):
            workdir, cache = pathlib.Path(root) / f"run{round_}", pathlib.Path(root) / f"cache{round_}"
            for name, stop_at, extra in RUNS:
                wall, cpu, goodput = run(args.config, workdir, cache, stop_at, extra, env)
                figures[name].append((wall, cpu))
                goodput_lines.append(f"round {round_ + 1}, {name}: {goodput}")
                print(f"round {round_ + 1}, {name}: first step after {wall:.1f}s, {cpu:.1f}s of CPU", flush=True)
    print(f"\n{args.config}, medians of {args.rounds} rounds:")
    cold_wall, cold_cpu = (statistics.median(x) for x in zip(*figures["cold"], strict=True))
    for name, _, _ in RUNS:
        wall, cpu = (statistics.median(x) for x in zip(*figures[name], strict=True))
        print(
            f"  {name:18s} first step after {wall:5.1f}s ({wall / cold_wall:4.0%} of cold), "
            f"process CPU {cpu:5.1f}s ({cpu / cold_cpu:4.0%})"
        )
    print("\n" + "\n".join(goodput_lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
