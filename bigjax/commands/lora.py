"""`bigjax lora save --workdir DIR --out ADAPTERS [--step N]` (a LoRA run's adapters on their own) and
`bigjax lora merge --workdir DIR --out DIR2 [--step N]` (a float run with the adapters merged in)."""

from __future__ import annotations


def add(commands) -> None:
    p = commands.add_parser("lora", help="a LoRA run's adapters: saved on their own, or merged into its base weights")
    p.add_argument("action", choices=["save", "merge"], help="save: ADAPTERS/adapters.safetensors; merge: a float run")
    p.add_argument("--workdir", required=True, help="a LoRA or QLoRA run (read only)")
    p.add_argument(
        "--out",
        required=True,
        help="save: the adapters' directory; merge: the merged run's workdir (new or empty, both)",
    )
    p.add_argument("--step", type=int, default=None, help="a committed checkpoint step; default: the newest")
    p.set_defaults(run=run, overrides=False)


def run(args, overrides) -> int:
    from bigjax.compress import lora
    from bigjax.ops import metrics

    if args.action == "save":
        done = lora.save(args.workdir, args.out, args.step)
        metrics.say(
            f"saved the {len(done['names'])} trained parameters ({done['numbers']:,} numbers) of step {done['step']} "
            f"of {args.workdir} to {args.out}; a run starts from them with --config.lora.adapters={args.out}"
        )
    else:
        done = lora.merge(args.workdir, args.out, args.step)
        metrics.say(
            f"merged the adapters of {len(done['kernels'])} kernels of step {done['step']} of {args.workdir} into a "
            f"float run in {args.out}; evaluate it with `bigjax eval --workdir {args.out} --once`"
        )
    return 0
