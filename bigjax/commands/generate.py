"""`bigjax generate --workdir DIR --prompt TEXT [--prompt TEXT ...] [--prompts-file F] [--temperature T] [--top-k K]
[--top-p P] [--stop S ...] [--max-new-tokens N] [--seed S] [--step N]`"""

from __future__ import annotations


def add(commands) -> None:
    p = commands.add_parser(
        "generate",
        help="sample text from DIR's newest committed checkpoint (KV cache)",
        description="Sample text from DIR's newest committed checkpoint (KV cache). With no prompt at all: one "
        "unconditional sample, starting from eos (the token that ends every training record).",
    )
    p.add_argument("--workdir", required=True)
    p.add_argument(
        "--prompt", action="append", default=[], help="a prompt; repeat it for a batch of prompts (none: unconditional)"
    )
    p.add_argument(
        "--prompts-file", default=None, help='more prompts: one a line, or in a .jsonl file one {"prompt": TEXT} a line'
    )
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=40, help="keep the K most likely tokens; 0 = no limit")
    p.add_argument("--top-p", type=float, default=1.0, help="keep the most likely tokens up to mass P; 1 = no limit")
    p.add_argument(
        "--stop",
        action="extend",
        nargs="+",
        default=[],
        metavar="S",
        help="end a completion where its text contains S (left out of it); e.g. --stop $'\\n\\n'",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step", type=int, default=None, help="a committed checkpoint step; default: the newest")
    p.set_defaults(run=run, overrides=False)


def run(args, overrides) -> int:
    from bigjax import generate

    # Settings and prompts are checked before the checkpoint is read.
    sampling = generate.Sampling(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        stop=tuple(args.stop),
        seed=args.seed,
    )
    prompts = generate.read_prompts(args.prompt, args.prompts_file)
    completions = generate.load(args.workdir, args.step).complete(prompts, sampling)
    for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        if len(prompts) > 1:
            print(f"----- {i + 1} of {len(prompts)} -----")
        print(prompt + completion)
    return 0
