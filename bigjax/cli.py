"""`bigjax train|eval|generate`: the command line.

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
import os
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
    # Import's --workdir is its output, checked empty and removed again if the import fails: not there.
    logs.send_library_logs_to_file(None if args.command == "import" else getattr(args, "workdir", None), args.command)

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
    parser = argparse.ArgumentParser(prog="bigjax", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("train", help="train an experiment; resumes from DIR's newest checkpoint")
    p.add_argument("--config", required=True, help="experiments/NAME.py[:ARG], or a workdir's config.json")
    p.add_argument("--workdir", required=True)
    p.add_argument("--stop-at-step", type=int, default=None, help="save and stop at this step (resume later)")
    p.add_argument(
        "--fresh",
        action="store_true",
        help="start again from step 0 in a workdir whose checkpoints are all unusable (they stay in DIR/quarantine)",
    )
    p.set_defaults(run=run_train)

    p = commands.add_parser("eval", help="evaluate DIR's checkpoints as they appear (a separate process)")
    p.add_argument("--config", help="experiments/NAME.py[:ARG]; default: DIR/config.json")
    p.add_argument("--workdir", required=True)
    p.add_argument("--once", action="store_true", help="evaluate the newest checkpoint and exit")
    p.add_argument("--timeout", type=float, default=3600.0, help="give up after this long without a new checkpoint")
    p.add_argument("--poll", type=float, default=2.0, help="seconds between looks for new checkpoints")
    p.set_defaults(run=run_eval)

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
    p.set_defaults(run=run_generate)

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
    p.set_defaults(run=run_lm_eval)

    p = commands.add_parser("import", help="a Hugging Face model directory -> a bigjax workdir at step 0")
    p.add_argument("--hf", required=True, help="a directory with config.json and model.safetensors (or shards)")
    p.add_argument("--workdir", required=True, help="the run's workdir to write (new or empty)")
    p.set_defaults(run=run_import)

    p = commands.add_parser(
        "export", help="a checkpoint of DIR -> a Hugging Face directory, an ONNX model or StableHLO decode functions"
    )
    p.add_argument("--out", required=True, help="the directory to write (new or empty)")
    p.add_argument(
        "--format",
        choices=["hf", "onnx", "stablehlo"],
        default="hf",
        help="hf: config.json + safetensors (transformers); onnx: the forward pass for onnxruntime (GPT causal LM, "
        "cnn/resnet/vit classifiers); stablehlo: jax.export of a GPT's prefill and KV-cache decode step",
    )
    p.add_argument(
        "--platforms",
        default="cpu,cuda",
        help="stablehlo: the platforms the functions are lowered for (cpu, cuda, rocm, tpu), comma-separated",
    )
    p.add_argument("--max-shard-size", default="5GB", help="split the weights into files of at most this (e.g. 2GB)")
    p.add_argument("--workdir", required=True)
    p.add_argument("--step", type=int, default=None, help="a committed checkpoint step; default: the newest")
    p.set_defaults(run=run_export)

    p = commands.add_parser(
        "quantize",
        help="a checkpoint of DIR -> a new workdir of int8/int4 weights that eval, generate and bench run",
    )
    p.add_argument("--workdir", required=True, help="a trained run (read only)")
    p.add_argument("--out", required=True, help="the quantized run's workdir to write (new or empty)")
    p.add_argument(
        "--bits",
        type=int,
        choices=[8, 4],
        default=None,
        help="8: per-channel scales; 4: sub-channel (default: what a QAT run trained for, else 8)",
    )
    p.add_argument(
        "--mode",
        choices=["weight_only", "dynamic"],
        default=None,
        help="dynamic: the activations are quantized to int8 at run time too (default: a QAT run's, else weight_only)",
    )
    p.add_argument(
        "--sub-channel", type=int, default=None, help="--bits 4: input channels per scale (default config.quant's)"
    )
    p.add_argument("--step", type=int, default=None, help="a committed checkpoint step; default: the newest")
    p.set_defaults(run=run_quantize)

    p = commands.add_parser("lora", help="a LoRA run's adapters: saved on their own, or merged into its base weights")
    p.add_argument("action", choices=["save", "merge"], help="save: ADAPTERS/adapters.safetensors; merge: a float run")
    p.add_argument("--workdir", required=True, help="a LoRA or QLoRA run (read only)")
    p.add_argument(
        "--out",
        required=True,
        help="save: the adapters' directory; merge: the merged run's workdir (new or empty, both)",
    )
    p.add_argument("--step", type=int, default=None, help="a committed checkpoint step; default: the newest")
    p.set_defaults(run=run_lora)

    p = commands.add_parser("data", help="prepare the configured data: TFDS download, tokenized cache")
    p.add_argument("action", choices=["prepare"])
    p.add_argument("--config", required=True, help="experiments/NAME.py[:ARG]")
    p.set_defaults(run=run_data)

    p = commands.add_parser("tokenizer", help="train a tokenizer on the configured corpus")
    p.add_argument("action", choices=["train"])
    p.add_argument("--config", required=True, help="experiments/NAME.py[:ARG]")
    p.add_argument("--vocab-size", type=int, required=True, help="ids in the vocabulary, special tokens included")
    p.add_argument("--out", required=True, help="PATH.model (SentencePiece) or PATH.json (Hugging Face tokenizers)")
    p.set_defaults(run=run_tokenizer)

    p = commands.add_parser("plan", help="per-device memory and FLOPs of an experiment's train step, before launch")
    p.add_argument("--config", required=True, help="experiments/NAME.py[:ARG]")
    p.add_argument("--devices", type=int, default=None, help="how many devices (default: those present)")
    p.add_argument("--device-kind", default=None, help="plan for devices not present here: h100, a100, v5e, v5p, ...")
    p.add_argument("--measure", action="store_true", help="also run 3 steps here and report the memory really used")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    p.set_defaults(run=run_plan)

    p = commands.add_parser("bench", help="time the train step on synthetic data: tokens/s, MFU, memory")
    p.add_argument("--config", required=True, help="experiments/NAME.py[:ARG]")
    p.add_argument("--steps", type=int, default=100, help="timed steps, after the warm-up")
    p.add_argument("--warmup", type=int, default=10, help="steps run and waited for before timing")
    p.add_argument("--windows", type=int, default=5, help="the timed steps in this many windows, one sync each")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.add_argument(
        "--eval", action="store_true", help="time the eval step (forward only); a quantized config always is"
    )
    p.set_defaults(run=run_bench)

    p = commands.add_parser("plot", help="a PNG of the train and eval curves of one or more runs")
    # dest "workdirs": main sends library logs to args.workdir, a single directory.
    p.add_argument("--workdir", dest="workdirs", nargs="+", required=True, metavar="DIR", help="one or more runs")
    p.add_argument("--out", default=None, help="PATH.png; default: DIR/plot.png for one run, ./runs.png for several")
    p.set_defaults(run=run_plot)

    args, rest = parser.parse_known_args(argv)
    overrides = _config_overrides(rest, parser)
    if overrides and args.command in ("generate", "plot", "export", "quantize", "lora"):
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


def run_train(args, overrides) -> int:
    from bigjax import config as config_lib
    from bigjax.ops import metrics
    from bigjax.run import train

    config = config_lib.load(args.config, overrides)
    summary = train.train(config, args.workdir, args.stop_at_step, args.fresh, started=args.started)
    metrics.say(f"{summary.status} at step {summary.step}; checkpoints in {os.path.join(args.workdir, 'checkpoints')}")
    return 0


def run_eval(args, overrides) -> int:
    from bigjax import config as config_lib
    from bigjax.ops import metrics
    from bigjax.run import evaluate

    if args.config:
        config = config_lib.load(args.config, overrides)
    else:
        config = config_lib.load_saved(args.workdir, overrides, alternative="; or pass --config")
    result = evaluate.run_eval_job(config, args.workdir, once=args.once, poll_seconds=args.poll, timeout=args.timeout)
    shown = "  ".join(f"{k}={v:.4f}" for k, v in result.items() if k != "step")
    metrics.say(f"validation at step {result['step']}: {shown}")
    return 0


def run_import(args, overrides) -> int:
    from bigjax import hf
    from bigjax.ops import metrics

    count = hf.import_hf(args.hf, args.workdir, overrides)
    metrics.say(
        f"imported {args.hf} ({count / 1e6:.2f}M parameters) into {args.workdir} at step 0; "
        f"continue with `bigjax train --config {os.path.join(args.workdir, 'config.json')} --workdir {args.workdir}`"
    )
    return 0


def run_export(args, overrides) -> int:
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


def run_quantize(args, overrides) -> int:
    from bigjax.compress import quantize
    from bigjax.ops import metrics

    done = quantize.quantize(args.workdir, args.out, args.bits, args.mode, args.sub_channel, args.step)
    metrics.say(
        f"quantized step {done['step']} of {args.workdir} to int{done['bits']} ({done['mode']}): "
        f"{len(done['kernels'])} kernels as integers, the rest float; written to {args.out}. "
        f"Evaluate it with `bigjax eval --workdir {args.out} --once`"
    )
    return 0


def run_lora(args, overrides) -> int:
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


def run_data(args, overrides) -> int:
    from bigjax import config as config_lib
    from bigjax.data import prepare
    from bigjax.ops import metrics

    for line in prepare.prepare(config_lib.load(args.config, overrides)):
        metrics.say(line)
    return 0


def run_tokenizer(args, overrides) -> int:
    from bigjax import config as config_lib
    from bigjax.data import prepare
    from bigjax.ops import metrics

    metrics.say(prepare.train_tokenizer(config_lib.load(args.config, overrides), args.vocab_size, args.out))
    return 0


def run_plan(args, overrides) -> int:
    from bigjax import config as config_lib
    from bigjax import plan

    config = config_lib.load(args.config, overrides)
    report = plan.make_plan(config, args.devices, args.device_kind, measure=args.measure)
    print(plan.to_json(report) if args.json else plan.format_plan(report, args.config))
    return 0


def run_bench(args, overrides) -> int:
    from bigjax import bench
    from bigjax import config as config_lib
    from bigjax.ops import metrics

    config = config_lib.load(args.config, overrides)
    result = bench.bench(config, args.steps, args.warmup, args.windows, args.config, overrides, eval_step=args.eval)
    metrics.say(bench.format_report(result))
    if args.json:
        bench.write_json(result, args.json)
        metrics.say(f"wrote {args.json}")
    return 0


def run_generate(args, overrides) -> int:
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


def run_lm_eval(args, overrides) -> int:
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


def run_plot(args, overrides) -> int:
    from bigjax.ops import plot

    print(f"wrote {plot.plot(args.workdirs, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
