"""Mixtral 8x7B's shape (46.7B parameters, 12.9B active per token): 32 layers, d=4096, 32 heads with 8 key/value
heads, and in every layer 8 SwiGLU experts of width 14336 of which each token takes 2. For planning: it needs an
accelerator pod (its experts split over `expert`, the rest over fsdp).

    bigjax plan --config experiments/mixtral_8x7b.py --devices 64 --device-kind h100 --config.mesh.data=1 \
        --config.mesh.fsdp=8 --config.mesh.expert=8

Data: synthetic tokens of its vocabulary (32000).
"""

from bigjax.config import defaults, parse_arg


def get_config(arg=None):
    args = parse_arg(arg, batch=64, seq=4096, steps=100_000)
    c = defaults()
    c.total_steps = args["steps"]
    c.batch_size = args["batch"]
    c.mesh.update(dict(data=-1, fsdp=1, tensor=1, expert=1))
    c.model.update(
        dict(
            vocab_size=32000,
            max_len=args["seq"],
            num_layers=32,
            d_model=4096,
            num_heads=32,
            num_kv_heads=8,
            mlp_dim=14336,
            positions="rope",
            rope_theta=1_000_000.0,
            norm="rmsnorm",
            norm_eps=1e-5,
            mlp="swiglu",
            use_bias=False,
            tie_embeddings=False,
            dtype="bfloat16",
            attention="auto",
            remat="full",
        )
    )
    c.model.moe.update(dict(num_experts=8, experts_per_token=2, router_aux_loss=0.02, norm_topk_probs=True))
    c.optim.update(dict(name="adamw", lr=3e-4, warmup_steps=2000, weight_decay=0.1, clip=1.0))
    c.data.update(dict(source="synthetic", seq_len=args["seq"]))
    return c
