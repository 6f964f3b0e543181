"""The CLI's commands, one module each: `add(commands)` adds its parser (with `run` as its default) and `run(args,
overrides)` does it, importing what it needs only then (so that `bigjax --help` and a bad argument need no JAX).
A new command is one module here and one line in COMMANDS; `bigjax.cli` only parses and dispatches."""

from __future__ import annotations

from bigjax.commands import (
    bench,
    data,
    eval_job,
    export,
    generate,
    import_hf,
    lm_eval,
    lora,
    plan,
    plot,
    quantize,
    tokenizer,
    train,
)

COMMANDS = (train, eval_job, generate, lm_eval, import_hf, export, quantize, lora, data, tokenizer, plan, bench, plot)
