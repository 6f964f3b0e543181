"""`bigjax plan --config experiments/NAME.py[:ARG] [--devices N] [--device-kind h100] [--config.a.b=VALUE ...]`"""

from __future__ import annotations


def add(commands) -> None:
    p = commands.add_parser("plan", help="per-device memory and FLOPs of an experiment's train step, before launch")
    p.add_argument("--config", required=True, help="experiments/NAME.py[:ARG]")
    p.add_argument("--devices", type=int, default=None, help="how many devices (default: those present)")
    p.add_argument("--device-kind", default=None, help="plan for devices not present here: h100, a100, v5e, v5p, ...")
    p.add_argument("--measure", action="store_true", help="also run 3 steps here and report the memory really used")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    p.set_defaults(run=run)


def run(args, overrides) -> int:
    from bigjax import config as config_lib
    from bigjax import plan

    config = config_lib.load(args.config, overrides)
    report = plan.make_plan(config, args.devices, args.device_kind, measure=args.measure)
    print(plan.to_json(report) if args.json else plan.format_plan(report, args.config))
    return 0
