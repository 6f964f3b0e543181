"""`bigjax train|eval|generate|...`: the command line.

Each command is a module of bigjax/commands (its parser and what it runs); this one parses, dispatches, and turns a
UserError into one `error:` line.

    bigjax train --config experiments/NAME.py[:ARG] --workdir DIR [--config.a.b=VALUE ...] [--fresh]
    bigjax eval --config experiments/NAME.py --workdir DIR [--once] [--timeout SECONDS]
    bigjax generate --workdir DIR --prompt TEXT [--prompt TEXT ...] [--prompts-file F] [--temperature T] [--top-k K]
                    [--top-p P] [--stop S ...] [--max-new-tokens N] [--seed S] [--step N]
    bigjax lm-eval --workdir DIR --tasks T1,T2 [--include-path DIR] [--num-fewshot N] [--limit N] [--batch-size N]
                   [--step N] [--out PATH.json]
    bigjax import --hf HF_DIR --workdir DIR [--config.a.b=VALUE ...]
    bigjax export --workdir DIR --out OUT [--step N] [--format hf|onnx|stablehlo] [--platforms cpu,cuda]
    bigjax quantize --workdir DIR --out DIR2 [--bits 8|4] [--mode weight_only|dynamic] [--sub-channel N] [--step N]
    bigjax lora save --workdir DIR --out ADAPTERS [--step N]       (a LoRA run's adapters on their own)
    bigjax lora merge --workdir DIR --out DIR2 [--step N]          (a float run with the adapters merged in)
    bigjax data prepare --config experiments/NAME.py [--config.a.b=VALUE ...]
    bigjax tokenizer train --config experiments/NAME.py --vocab-size N --out PATH.model|PATH.json
    bigjax plan --config experiments/NAME.py[:ARG] [--devices N] [--device-kind h100] [--config.a.b=VALUE ...]
    bigjax bench --config experiments/NAME.py[:ARG] [--steps N] [--warmup N] [--windows W] [--json PATH] [--config...]
    bigjax plot --workdir DIR [DIR ...] [--out PATH.png]

User errors (a bad config, a refused resume, a missing workdir) print one `error:` line and exit 2.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback


def main(argv=None) -> int:
    started = time.monotonic()  # a run's account of its wall time (bigjax.run.goodput) starts here, before JAX loads
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    args.started = started
    if args.command == "train":
        from bigjax.run import signals

        signals.catch()  # before JAX is imported: SIGTERM or Ctrl-C during start-up stops cleanly too
    # Imported after parsing so that `--help` is instant and errors in arguments need no JAX.
    from absl import logging as absl_logging

    from bigjax.ops import logs

    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax's info chatter would drown even the log file
    # Library tracebacks (a failed save, a damaged checkpoint) go to a log file; the console gets bigjax's one line.
    workdir = getattr(args, "workdir", None) if getattr(args, "logs_in_workdir", True) else None
    logs.send_library_logs_to_file(workdir, args.command)

    from bigjax.errors import UserError
    from bigjax.ops import xla_flags  # imports no jax: XLA reads XLA_FLAGS once, when its backend starts

    try:
        xla_flags.apply_gpu_defaults()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    from bigjax.parallel import distributed

    try:
        distributed.initialize_if_multiprocess()  # before anything touches a device
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    try:
        return args.run(args, overrides)
    except (UserError, FileNotFoundError) as error:
        where = f" ({distributed.describe()})" if distributed.describe() else ""
        print(f"error{where}: {error}", file=sys.stderr)
        _point_to_details()
        return 2
    except KeyboardInterrupt:
        print("interrupted: stopped at once; checkpoints already committed are kept", file=sys.stderr)
        _point_to_details()
        return 130
    except Exception as error:
        if not distributed.describe():
            raise
        # In a job of many processes, say which one crashed: the logs of all of them are often read together.
        traceback.print_exc()
        print(f"error ({distributed.describe()}): {type(error).__name__}: {error}", file=sys.stderr)
        return 1


def _point_to_details() -> None:
    from bigjax.ops import logs

    if logs.details():
        print(f"details: {logs.details()}", file=sys.stderr)


def parse_args(argv):
    from bigjax.commands import COMMANDS

    parser = argparse.ArgumentParser(prog="bigjax", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add(commands)
    args, rest = parser.parse_known_args(argv)
    overrides = _config_overrides(rest, parser)
    if overrides and not getattr(args, "overrides", True):
        parser.error(f"{args.command} takes no --config.* overrides")
    return args, overrides


def _config_overrides(rest, parser) -> list[str]:
    """`--config.a.b=v` and `--config.a.b v` -> ["config.a.b=v", ...]; anything else is an error."""
    overrides, i = [], 0
    while i < len(rest):
        arg = rest[i]
        if not arg.startswith("--config."):
            parser.error(f"unrecognized argument {arg!r}")
        if "=" in arg:
            overrides.append(arg[2:])
        elif i + 1 < len(rest):
            overrides.append(f"{arg[2:]}={rest[i + 1]}")
            i += 1
        else:
            parser.error(f"{arg} needs a value")
        i += 1
    return overrides


if __name__ == "__main__":
    sys.exit(main())
