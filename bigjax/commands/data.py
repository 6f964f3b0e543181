"""`bigjax data prepare --config experiments/NAME.py [--config.a.b=VALUE ...]`: TFDS download, tokenized cache."""

from __future__ import annotations


def add(commands) -> None:
    p = commands.add_parser("data", help="prepare the configured data: TFDS download, tokenized cache")
    p.add_argument("action", choices=["prepare"])
    p.add_argument("--config", required=True, help="experiments/NAME.py[:ARG]")
    p.set_defaults(run=run)


def run(args, overrides) -> int:
    from bigjax import config as config_lib
    from bigjax.data import prepare
    from bigjax.ops import metrics

    for line in prepare.prepare(config_lib.load(args.config, overrides)):
        metrics.say(line)
    return 0
