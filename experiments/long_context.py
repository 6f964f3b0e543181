"""Long context: the sequence split over the mesh axis `context` (docs/parallelism.md, "Long context").

A small Llama at T=16384 on the bundled Shakespeare, its sequence over 8 devices (ring attention, zig-zag order): one
layer of width 32, 2 query heads on 1 key/value head, 4 steps; trains on 8 simulated CPU devices in about 4 minutes
(measured on a 2-core machine shared with other jobs, load average 7-9: compiled in 17.5 s, steps of 44-50 s
(`step_time` in the log), loss 5.958 -> 5.815 over the 4 steps, 246 s from start to the last checkpoint), and on
one GPU node as it is. Its shape is set by `layers`, `width` and `heads` (key/value heads: half of them); the
former default, `layers=2,width=64,heads=4` (benchmarks/context_memory.py's model), took 230 s a step on that
machine: 4 x the attention work (layers x heads), about 5 x the time.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
        bigjax train --config experiments/long_context.py --workdir /tmp/long
    bigjax train --config experiments/long_context.py:strategy=all_gather --workdir /tmp/long-gather

Llama-3-8B's shape at T=131072 on 8 H100s, for `bigjax plan` (its weights and optimizer state split over the
context devices too, as FSDP splits them: the rule embed -> fsdp, context): fits with context=8, and not with
context=1, where each device holds a whole sequence of 131072 tokens even with the weights split over fsdp=8.

    bigjax plan --config experiments/long_context.py:size=8b --devices 8 --device-kind h100
    bigjax plan --config experiments/long_context.py:size=8b,context=1 --devices 8 --device-kind h100
"""

from bigjax.config import DEFAULT_SHARDING_RULES, defaults, parse_arg


def get_config(arg=None):
    args = parse_arg(arg, size="small", context=8, strategy="ring", steps=4, seq=0, layers=1, width=32, heads=2)
    c = small_llama(args) if args["size"] == "small" else llama3_8b(args)
    c.model.context_parallel = args["strategy"]
    if args["context"] > 1:
        c.mesh.update(dict(data=1, fsdp=1, tensor=1, context=args["context"]))
    else:  # no sequence split: the weights over fsdp instead, and a batch it divides
        c.mesh.update(dict(data=1, fsdp=-1, tensor=1, context=1))
        c.batch_size = max(c.batch_size, 8)
    # The weights' embed axis over fsdp and context: the context devices share the weights and optimizer state
    # (their gradients are summed over the sequence's shards anyway), as MaxText's FSDP over its context axis does.
    c.sharding_rules = tuple(
        ("embed", ("fsdp", "context")) if name == "embed" else (name, axes) for name, axes in DEFAULT_SHARDING_RULES
    )
    return c


def small_llama(args):
    seq = args["seq"] or 16384
    c = defaults()
    c.total_steps = args["steps"]
    c.batch_size = 1
    c.log_every = 1
    c.checkpoint_every = 0
    c.eval_every = 0
    c.model.update(
        dict(
            vocab_size=260,  # bytes and the specials
            max_len=seq,
            num_layers=args["layers"],
            d_model=args["width"],
            num_heads=args["heads"],
            num_kv_heads=args["heads"] // 2,  # grouped-query attention, as Llama's
            mlp_dim=128,
            positions="rope",
            norm="rmsnorm",
            mlp="swiglu",
            use_bias=False,
            tie_embeddings=False,
        )
    )
    c.optim.update(dict(lr=3e-3, warmup_steps=2))
    c.data.update(dict(source="shakespeare", tokenizer="byte", seq_len=seq))
    return c


def llama3_8b(args):
    seq = args["seq"] or 131072
    c = defaults()
    c.total_steps = 100_000
    c.batch_size = 1  # one sequence of 131072 tokens a step
    c.model.update(
        dict(
            vocab_size=128256,
            vocab_multiple=128,
            max_len=seq,
            num_layers=32,
            d_model=4096,
            num_heads=32,
            num_kv_heads=8,
            mlp_dim=14336,
            positions="rope",
            rope_theta=500_000.0,
            rope_scaling=dict(
                type="llama3", factor=8.0, original_max_len=8192, low_freq_factor=1.0, high_freq_factor=4.0
            ),
            norm="rmsnorm",
            norm_eps=1e-5,
            mlp="swiglu",
            use_bias=False,
            tie_embeddings=False,
            dtype="bfloat16",
            attention="auto",
            scan_layers=True,
            remat="full",
        )
    )
    c.task.loss_chunk = 4096  # never the [131072, 128256] logits at once
    c.optim.update(dict(lr=3e-4, warmup_steps=2000))
    c.data.update(dict(source="synthetic", seq_len=seq))
    return c
