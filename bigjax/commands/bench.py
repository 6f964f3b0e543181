"""`bigjax bench --config experiments/NAME.py[:ARG] [--steps N] [--warmup N] [--windows W] [--json PATH] [--eval]`"""

from __future__ import annotations


def add(commands) -> None:
    p = commands.add_parser("bench", help="time the train step on synthetic data: tokens/s, MFU, memory")
    p.add_argument("--config", required=True, help="experiments/NAME.py[:ARG]")
    p.add_argument("--steps", type=int, default=100, help="timed steps, after the warm-up")
    p.add_argument("--warmup", type=int, default=10, help="steps run and waited for before timing")
    p.add_argument("--windows", type=int, default=5, help="the timed steps in this many windows, one sync each")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.add_argument(
        "--eval", action="store_true", help="time the eval step (forward only); a quantized config always is"
    )
    p.set_defaults(run=run)


def run(args, overrides) -> int:
    from bigjax import bench
    from bigjax import config as config_lib
    from bigjax.ops import metrics

    config = config_lib.load(args.config, overrides)
    result = bench.bench(config, args.steps, args.warmup, args.windows, args.config, overrides, eval_step=args.eval)
    metrics.say(bench.format_report(result))
    if args.json:
        bench.write_json(result, args.json)
        metrics.say(f"wrote {args.json}")
    return 0
