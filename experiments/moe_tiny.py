"""A small Llama-style mixture of experts on the bundled Shakespeare plays, byte-level, on a CPU in minutes: 4 layers,
the first dense, then 8 experts of which each token takes 2, and one shared expert (DeepSeek's layout in miniature).

    bigjax train --config experiments/moe_tiny.py --workdir runs/moe_tiny
    bigjax train --config experiments/moe_tiny.py --workdir runs/moe_tiny_ep4 --config.mesh.expert=4
    bigjax train --config experiments/moe_tiny.py:dense=True --workdir runs/moe_tiny_dense

`dense=True` is the dense model of equal active FLOPs per token: each MoE layer's MLP replaced by one as wide as the
2 picked experts and the shared one together (the router's few FLOPs aside).
"""

from bigjax.config import defaults, parse_arg


def get_config(arg=None):
    args = parse_arg(arg, steps=400, d=64, experts=8, top_k=2, expert_dim=64, dense=False)
    c = defaults()
    c.total_steps = args["steps"]
    c.batch_size = 16
    c.log_every = 50
    c.eval_every = 200
    c.eval_batches = 8
    c.checkpoint_every = 200
    c.mesh.update(dict(data=-1, fsdp=1, tensor=1, expert=1))
    c.model.update(
        dict(
            num_layers=4,
            d_model=args["d"],
            num_heads=4,
            num_kv_heads=2,
            max_len=128,
            vocab_size=260,  # the byte tokenizer
            positions="rope",
            norm="rmsnorm",
            mlp="swiglu",
            mlp_dim=(args["top_k"] + 1) * args["expert_dim"],  # the dense layers: as wide as a token's 3 experts
            use_bias=False,
            tie_embeddings=False,
        )
    )
    if not args["dense"]:
        c.model.moe.update(
            dict(
                num_experts=args["experts"],
                experts_per_token=args["top_k"],
                expert_mlp_dim=args["expert_dim"],
                num_shared_experts=1,
                first_dense_layers=1,
                router_aux_loss=0.01,
                router_z_loss=0.001,
            )
        )
    c.optim.update(dict(name="adamw", lr=3e-3, warmup_steps=40, schedule="cosine", weight_decay=0.1, clip=1.0))
    c.data.update(dict(source="shakespeare", tokenizer="byte", seq_len=128))
    return c
