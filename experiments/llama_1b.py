"""A Llama-style 1.1B model (TinyLlama's shape): 22 layers, d=2048, 32 heads with 4 key/value heads (GQA),
SwiGLU, RoPE, RMSNorm, untied embeddings, T=2048. For one 80 GB GPU (full remat of each block), or FSDP.

    bigjax train --config experiments/llama_1b.py --workdir /tmp/llama1b
    bigjax train --config experiments/llama_1b.py --workdir /tmp/llama1b --config.mesh.data=1 --config.mesh.fsdp=-1

Data: synthetic tokens (vocabulary 32000, Llama 2's size) until the data issue brings tokenizers and corpora.
"""

from bigjax.config import defaults, parse_arg


def get_config(arg=None):
    args = parse_arg(arg, batch=8, seq=2048, steps=100_000, remat="full")
    c = defaults()
    c.total_steps = args["steps"]
    c.batch_size = args["batch"]
    c.log_every = 20
    c.checkpoint_every = 1000
    c.eval_every = 0
    c.mesh.update(dict(data=-1, fsdp=1, tensor=1))
    c.model.update(
        dict(
            vocab_size=32000,
            vocab_multiple=128,
            max_len=args["seq"],
            num_layers=22,
            d_model=2048,
            num_heads=32,
            num_kv_heads=4,
            mlp_dim=5632,
            positions="rope",
            rope_theta=10_000.0,
            norm="rmsnorm",
            norm_eps=1e-5,
            mlp="swiglu",
            use_bias=False,
            tie_embeddings=False,
            dtype="bfloat16",
            attention="auto",
            scan_layers=True,
            remat=args["remat"],
        )
    )
    c.optim.update(
        dict(
            name="adamw",
            lr=3e-4,
            warmup_steps=2000,
            schedule="cosine",
            min_lr_ratio=0.1,
            weight_decay=0.1,
            b2=0.95,
            clip=1.0,
        )
    )
    c.data.update(dict(source="synthetic", seq_len=args["seq"]))
    return c
