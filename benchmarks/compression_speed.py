"""Eval-step throughput of several runs as ratios to the first (the float32 run), measured in one process.

    python benchmarks/compression_speed.py --json OUT.json RUNS/float RUNS/int8 RUNS/int4 ...

Each workdir's saved config.json is timed by `bigjax.bench.bench(..., eval_step=True)` (the forward pass and loss of
`bigjax eval`, on synthetic batches of the run's shapes; a quantized workdir runs its integer weights), the runs
alternated, `--rounds` times (default 2); a run's figure is the median of its rounds' examples/s and its ratio
that over the first run's median. Used by benchmarks/compression.sh; not part of `make test`.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics

from bigjax import bench
from bigjax import config as config_lib


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdirs", nargs="+", help="the first is the reference (float32)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--windows", type=int, default=5)
    parser.add_argument("--json", help="write the figures here too")
    args = parser.parse_args()

    rates: dict[str, list[float]] = {workdir: [] for workdir in args.workdirs}
    for _ in range(args.rounds):
        for workdir in args.workdirs:
            config = config_lib.load(str(pathlib.Path(workdir) / "config.json"))
            result = bench.bench(config, args.steps, args.warmup, args.windows, workdir, eval_step=True)
            rates[workdir].append(result["examples_per_second"])

    reference = statistics.median(rates[args.workdirs[0]])
    rows = []
    for workdir, values in rates.items():
        median = statistics.median(values)
        rows.append(dict(workdir=workdir, examples_per_second=values, median=median, ratio=median / reference))
        print(
            f"{pathlib.Path(workdir).name:24s} eval examples/s {median:10.1f}  ratio {median / reference:.2f}  "
            f"(rounds: {', '.join(f'{v:.1f}' for v in values)})"
        )
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
