"""`bigjax export --workdir DIR --out OUT [--step N] [--format hf|onnx|stablehlo] [--platforms cpu,cuda]`"""

from __future__ import annotations

from bigjax import families


def add(commands) -> None:
    p = commands.add_parser(
        "export", help="a checkpoint of DIR -> a Hugging Face directory, an ONNX model or StableHLO decode functions"
    )
    p.add_argument("--out", required=True, help="the directory to write (new or empty)")
    p.add_argument(
        "--format",
        choices=families.EXPORT_FORMATS,
        default="hf",
        help=families.export_help(),
    )
    p.add_argument(
        "--platforms",
        default="cpu,cuda",
        help="stablehlo: the platforms the functions are lowered for (cpu, cuda, rocm, tpu), comma-separated",
    )
    p.add_argument("--max-shard-size", default="5GB", help="split the weights into files of at most this (e.g. 2GB)")
    p.add_argument("--workdir", required=True)
    p.add_argument("--step", type=int, default=None, help="a committed checkpoint step; default: the newest")
    p.set_defaults(run=run, overrides=False)


def run(args, overrides) -> int:
    from bigjax.ops import metrics

    if args.format == "hf":
        from bigjax import hf

        step = hf.export(args.workdir, args.out, args.step, max_shard_size=args.max_shard_size)
    else:
        from bigjax import deploy

        platforms = tuple(p.strip() for p in args.platforms.split(",") if p.strip())
        step = deploy.export(args.workdir, args.out, args.format, args.step, platforms=platforms)
    metrics.say(f"exported step {step} of {args.workdir} to {args.out}")
    return 0
