"""`bigjax plot --workdir DIR [DIR ...] [--out PATH.png]`: the train and eval curves of one or more runs."""

from __future__ import annotations


def add(commands) -> None:
    p = commands.add_parser("plot", help="a PNG of the train and eval curves of one or more runs")
    # dest "workdirs": main sends library logs to args.workdir, a single directory.
    p.add_argument("--workdir", dest="workdirs", nargs="+", required=True, metavar="DIR", help="one or more runs")
    p.add_argument("--out", default=None, help="PATH.png; default: DIR/plot.png for one run, ./runs.png for several")
    p.set_defaults(run=run, overrides=False)


def run(args, overrides) -> int:
    from bigjax.ops import plot

    print(f"wrote {plot.plot(args.workdirs, args.out)}")
    return 0
