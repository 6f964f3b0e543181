"""`bigjax quantize --workdir DIR --out DIR2 [--bits 8|4] [--mode weight_only|dynamic] [--sub-channel N] [--step N]`"""

from __future__ import annotations

from bigjax.config import CHOICES


def add(commands) -> None:
    p = commands.add_parser(
        "quantize",
        help="a checkpoint of DIR -> a new workdir of int8/int4 weights that eval, generate and bench run",
    )
    p.add_argument("--workdir", required=True, help="a trained run (read only)")
    p.add_argument("--out", required=True, help="the quantized run's workdir to write (new or empty)")
    p.add_argument(
        "--bits",
        type=int,
        choices=[bits for bits in CHOICES["quant.bits"] if bits],  # 0 is a float run's
        default=None,
        help="8: per-channel scales; 4: sub-channel (default: what a QAT run trained for, else 8)",
    )
    p.add_argument(
        "--mode",
        choices=CHOICES["quant.mode"],
        default=None,
        help="dynamic: the activations are quantized to int8 at run time too (default: a QAT run's, else weight_only)",
    )
    p.add_argument(
        "--sub-channel", type=int, default=None, help="--bits 4: input channels per scale (default config.quant's)"
    )
    p.add_argument("--step", type=int, default=None, help="a committed checkpoint step; default: the newest")
    p.set_defaults(run=run, overrides=False)


def run(args, overrides) -> int:
    from bigjax.compress import quantize
    from bigjax.ops import metrics

    done = quantize.quantize(args.workdir, args.out, args.bits, args.mode, args.sub_channel, args.step)
    metrics.say(
        f"quantized step {done['step']} of {args.workdir} to int{done['bits']} ({done['mode']}): "
        f"{len(done['kernels'])} kernels as integers, the rest float; written to {args.out}. "
        f"Evaluate it with `bigjax eval --workdir {args.out} --once`"
    )
    return 0
