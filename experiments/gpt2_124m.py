"""GPT-2 small (124M): 12 layers, d=768, 12 heads, T=1024, vocabulary padded to 50304. For one GPU.

    bigjax train --config experiments/gpt2_124m.py:tokenizer=gpt2/tokenizer.json --workdir /tmp/gpt2
    bigjax train --config experiments/gpt2_124m.py:tokenizer=gpt2/tokenizer.json,data=parquet:fineweb/*.parquet ...
    bigjax train --config experiments/gpt2_124m.py:batch=12 --workdir /tmp/gpt2-b12      # synthetic tokens
    bigjax train --config experiments/gpt2_124m.py --workdir /tmp/gpt2 --config.optim.grad_accum=20

Data: with `tokenizer=PATH` (GPT-2's own tokenizer.json, e.g. from the Hugging Face `gpt2` model directory),
real text tokenized by it: `data=` names any bigjax source, the bundled plays by default. Without a tokenizer,
synthetic tokens: the benchmark workload (`make bench`), whose step, shardings and speed are those of the real
thing. A batch of 24 x 1024 fits one 80 GB GPU without remat; grad_accum=20 gives GPT-2's ~0.5M tokens per update.
"""

from bigjax.config import defaults, parse_arg


def get_config(arg=None):
    args = parse_arg(arg, batch=24, seq=1024, steps=100_000, tokenizer="", data="shakespeare")
    c = defaults()
    c.total_steps = args["steps"]
    c.batch_size = args["batch"]
    c.log_every = 50
    c.checkpoint_every = 2000
    c.eval_every = 0
    c.eval_batches = 20
    c.mesh.update(dict(data=-1, fsdp=1, tensor=1))
    c.model.update(
        dict(
            vocab_size=50257,
            vocab_multiple=128,  # 50257 -> 50304: matmuls in multiples of 128 run faster
            max_len=args["seq"],
            num_layers=12,
            d_model=768,
            num_heads=12,
            positions="learned",
            norm="layernorm",
            mlp="gelu",
            use_bias=True,
            tie_embeddings=True,
            dtype="bfloat16",
            attention="auto",  # cuDNN flash attention on a GPU
            scan_layers=True,
            remat="none",
        )
    )
    c.optim.update(
        dict(
            name="adamw",
            lr=6e-4,
            warmup_steps=2000,
            schedule="cosine",
            min_lr_ratio=0.1,
            weight_decay=0.1,
            b2=0.95,
            clip=1.0,
        )
    )
    c.data.seq_len = args["seq"]
    if args["tokenizer"]:
        c.data.update(dict(source=args["data"], tokenizer=f"hf:{args['tokenizer']}"))
    else:
        c.data.source = "synthetic"
    return c
