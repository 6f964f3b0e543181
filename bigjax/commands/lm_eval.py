"""`bigjax lm-eval --workdir DIR --tasks T1,T2 [--include-path DIR] [--num-fewshot N] [--limit N] [--batch-size N]
[--step N] [--out PATH.json]`"""

from __future__ import annotations


def add(commands) -> None:
    p = commands.add_parser(
        "lm-eval",
        help="score DIR's newest checkpoint on lm-evaluation-harness tasks, on the run's mesh",
        description="Score a causal LM run on EleutherAI lm-evaluation-harness tasks, in process, on the run's own "
        "mesh. Needs the optional extra: pip install 'bigjax[eval]'.",
    )
    p.add_argument("--workdir", required=True)
    p.add_argument("--tasks", required=True, help="T1,T2: lm-eval task names, or those of your YAMLs (--include-path)")
    p.add_argument("--include-path", default=None, help="a directory of task YAML files of your own")
    p.add_argument("--num-fewshot", type=int, default=None, help="examples in each prompt; default: the task's")
    p.add_argument("--limit", type=float, default=None, help="at most N documents a task (a fraction if below 1)")
    p.add_argument("--batch-size", type=int, default=16, help="rows scored in one step (rounded to the mesh)")
    p.add_argument("--step", type=int, default=None, help="a committed checkpoint step; default: the newest")
    p.add_argument("--out", default=None, help="a new file for lm-eval's results JSON (never overwritten)")
    p.set_defaults(run=run, overrides=False)


def run(args, overrides) -> int:
    from bigjax.eval import harness

    harness.require_lm_eval()
    out = harness.check_new_file(args.out) if args.out else None  # checked before anything is loaded
    if args.batch_size < 1:
        raise harness.HarnessError(f"--batch-size {args.batch_size}: use 1 or more")
    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
    tasks = [task for task in args.tasks.split(",") if task]
    results = harness.evaluate(
        args.workdir, tasks, args.include_path, args.num_fewshot, limit, args.batch_size, args.step
    )
    if results is None:  # a process other than 0 of a job: it followed process 0, which reports
        return 0
    print(harness.table(results))
    if out is not None:
        print(f"wrote {harness.write_results(results, out)}")
    return 0
