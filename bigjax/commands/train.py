"""`bigjax train --config experiments/NAME.py[:ARG] --workdir DIR [--config.a.b=VALUE ...] [--fresh]`"""

from __future__ import annotations


def add(commands) -> None:
    p = commands.add_parser("train", help="train an experiment; resumes from DIR's newest checkpoint")
    p.add_argument("--config", required=True, help="experiments/NAME.py[:ARG], or a workdir's config.json")
    p.add_argument("--workdir", required=True)
    p.add_argument("--stop-at-step", type=int, default=None, help="save and stop at this step (resume later)")
    p.add_argument(
        "--fresh",
        action="store_true",
        help="start again from step 0 in a workdir whose checkpoints are all unusable (they stay in DIR/quarantine)",
    )
    p.set_defaults(run=run)


def run(args, overrides) -> int:
    from bigjax import config as config_lib
    from bigjax.ops import metrics
    from bigjax.run import train
    from bigjax.run.workdir import Run

    config = config_lib.load(args.config, overrides)
    summary = train.train(config, args.workdir, args.stop_at_step, args.fresh, started=args.started)
    metrics.say(f"{summary.status} at step {summary.step}; checkpoints in {Run(args.workdir).checkpoints}")
    return 0
