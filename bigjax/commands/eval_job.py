"""`bigjax eval --config experiments/NAME.py --workdir DIR [--once] [--timeout SECONDS]`: a separate process."""

from __future__ import annotations


def add(commands) -> None:
    p = commands.add_parser("eval", help="evaluate DIR's checkpoints as they appear (a separate process)")
    p.add_argument("--config", help="experiments/NAME.py[:ARG]; default: DIR/config.json")
    p.add_argument("--workdir", required=True)
    p.add_argument("--once", action="store_true", help="evaluate the newest checkpoint and exit")
    p.add_argument("--timeout", type=float, default=3600.0, help="give up after this long without a new checkpoint")
    p.add_argument("--poll", type=float, default=2.0, help="seconds between looks for new checkpoints")
    p.set_defaults(run=run)


def run(args, overrides) -> int:
    from bigjax import config as config_lib
    from bigjax.ops import metrics
    from bigjax.run import evaluate
    from bigjax.run.workdir import Run

    if args.config:
        config = config_lib.load(args.config, overrides)
    else:
        config = Run(args.workdir).saved_config(overrides, alternative="; or pass --config")
    result = evaluate.run_eval_job(config, args.workdir, once=args.once, poll_seconds=args.poll, timeout=args.timeout)
    shown = "  ".join(f"{k}={v:.4f}" for k, v in result.items() if k != "step")
    metrics.say(f"validation at step {result['step']}: {shown}")
    return 0
