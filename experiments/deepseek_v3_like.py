"""DeepSeek-V3's MoE layout (671B parameters, ~37B active per token) on bigjax's attention: 61 layers, d=7168, the
first 3 dense (width 18432), then 256 routed experts of width 2048 of which each token takes 8, plus one shared
expert. Unlike DeepSeek-V3: grouped-query attention (128 heads of 128, 8 key/value heads) instead of multi-head
latent attention, softmax top-k routing instead of sigmoid with bias balancing, no multi-token prediction. For
planning the sharding of a model of that size.

    bigjax plan --config experiments/deepseek_v3_like.py --devices 256 --device-kind h100 --config.mesh.data=1 \
        --config.mesh.fsdp=8 --config.mesh.expert=32
"""

from bigjax.config import defaults, parse_arg


def get_config(arg=None):
    args = parse_arg(arg, batch=256, seq=4096, steps=100_000)
    c = defaults()
    c.total_steps = args["steps"]
    c.batch_size = args["batch"]
    c.mesh.update(dict(data=-1, fsdp=1, tensor=1, expert=1))
    c.model.update(
        dict(
            vocab_size=129280,
            max_len=args["seq"],
            num_layers=61,
            d_model=7168,
            num_heads=128,
            num_kv_heads=8,
            head_dim=128,
            mlp_dim=18432,
            positions="rope",
            norm="rmsnorm",
            norm_eps=1e-6,
            mlp="swiglu",
            use_bias=False,
            tie_embeddings=False,
            dtype="bfloat16",
            attention="auto",
            remat="full",
        )
    )
    c.model.moe.update(
        dict(
            num_experts=256,
            experts_per_token=8,
            expert_mlp_dim=2048,
            num_shared_experts=1,
            first_dense_layers=3,
            router_aux_loss=0.0001,
            norm_topk_probs=True,
        )
    )
    c.optim.update(dict(name="adamw", lr=2.2e-4, warmup_steps=2000, weight_decay=0.1, clip=1.0))
    c.data.update(dict(source="synthetic", seq_len=args["seq"]))
    return c
