"""`bigjax import --hf HF_DIR --workdir DIR [--config.a.b=VALUE ...]`: a Hugging Face model as a run at step 0."""

from __future__ import annotations


def add(commands) -> None:
    p = commands.add_parser("import", help="a Hugging Face model directory -> a bigjax workdir at step 0")
    p.add_argument("--hf", required=True, help="a directory with config.json and model.safetensors (or shards)")
    p.add_argument("--workdir", required=True, help="the run's workdir to write (new or empty)")
    # Its --workdir is its output, checked empty and removed again if the import fails: no library logs there.
    p.set_defaults(run=run, logs_in_workdir=False)


def run(args, overrides) -> int:
    from bigjax import hf
    from bigjax.ops import metrics
    from bigjax.run.workdir import Run

    count = hf.import_hf(args.hf, args.workdir, overrides)
    metrics.say(
        f"imported {args.hf} ({count / 1e6:.2f}M parameters) into {args.workdir} at step 0; "
        f"continue with `bigjax train --config {Run(args.workdir).config_file} --workdir {args.workdir}`"
    )
    return 0
