"""A toy GPT for tests and quick checks: trains for a few steps in seconds.

bigjax train --config experiments/tiny.py --workdir /tmp/tiny
bigjax train --config experiments/tiny.py:llama=True --workdir /tmp/tiny-llama
"""

from bigjax.config import defaults, parse_arg


def get_config(arg=None):
    args = parse_arg(arg, llama=False, steps=8)
    c = defaults()
    c.total_steps = args["steps"]
    c.batch_size = 8
    c.log_every = 2
    c.checkpoint_every = 4
    c.eval_every = 0
    c.eval_batches = 2
    c.model.update(dict(num_layers=2, d_model=32, num_heads=4, max_len=32, vocab_size=260))
    if args["llama"]:
        c.model.update(
            dict(
                positions="rope",
                norm="rmsnorm",
                mlp="swiglu",
                num_kv_heads=2,
                use_bias=False,
                tie_embeddings=False,
                mlp_dim=64,
            )
        )
    c.optim.update(dict(lr=1e-3, warmup_steps=2))
    c.data.update(dict(seq_len=32))
    return c
