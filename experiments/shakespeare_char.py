"""The default experiment: a small GPT on the bundled Shakespeare plays, byte-level, on a CPU in minutes.

    make train
    bigjax train --config experiments/shakespeare_char.py --workdir runs/shakespeare_char
    bigjax train --config experiments/shakespeare_char.py:layers=6,d=256 --workdir runs/bigger
    bigjax eval  --config experiments/shakespeare_char.py --workdir runs/shakespeare_char

Reaches about 2.5 bits per character on the held-out tenth of every play in ~4 minutes on 2 CPU cores.
"""

from bigjax.config import defaults, parse_arg


def get_config(arg=None):
    args = parse_arg(arg, layers=2, d=128, heads=4, seq=128, steps=800)
    c = defaults()
    c.seed = 0
    c.total_steps = args["steps"]
    c.batch_size = 32
    c.log_every = 50
    c.eval_every = 200
    c.eval_batches = 16
    c.checkpoint_every = 200
    c.keep_checkpoints = 3
    c.mesh.update(dict(data=-1, fsdp=1, tensor=1))

    c.model.update(
        dict(
            num_layers=args["layers"],
            d_model=args["d"],
            num_heads=args["heads"],
            max_len=args["seq"],
            vocab_size=260,  # the byte tokenizer: 256 bytes + 4 special tokens
            # On a CPU, scanning two layers costs more than it saves (measured: 0.43 s vs 0.29 s a step).
            scan_layers=False,
        )
    )
    c.optim.update(dict(name="adamw", lr=5e-3, warmup_steps=50, schedule="cosine", weight_decay=0.1, clip=1.0))
    c.data.update(dict(source="shakespeare", tokenizer="byte", seq_len=args["seq"]))
    return c
