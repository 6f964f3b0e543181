"""BERT-base (110M: 12 layers, d=768, 12 heads, post-LN, token types) pretrained by masked-LM on English
Wikipedia from TFDS. For a GPU or TPU; fine-tune it with experiments/imdb_finetune.py.

    bigjax tokenizer train --config experiments/bert_base_mlm.py --vocab-size 30522 --out tokenizers/wiki_30k.json
    bigjax data prepare --config experiments/bert_base_mlm.py          # tokenize once
    bigjax train --config experiments/bert_base_mlm.py --workdir runs/bert_base_mlm
    bigjax train --config experiments/bert_base_mlm.py:seq=512,batch=32 --workdir runs/bert_base_mlm_512

BERT's recipe: batch 256 x 128 tokens, 1M steps, Adam (b2=0.999, eps=1e-6) at 1e-4 with 10k warmup steps and
linear decay, weight decay 0.01, dropout 0.1; 15% of tokens chosen, 80/10/10. Each Wikipedia article is an
example (cut into pieces of seq tokens), several short ones packed per row. bf16 compute, cuDNN attention.
"""

from bigjax.config import defaults, parse_arg


def get_config(arg=None):
    args = parse_arg(arg, seq=128, batch=256, steps=1_000_000, tokenizer="hf:tokenizers/wiki_30k.json")
    c = defaults(model="bert", task="masked_lm")
    c.total_steps = args["steps"]
    c.batch_size = args["batch"]
    c.log_every = 100
    c.checkpoint_every = 10_000
    c.keep_checkpoints = 3
    c.eval_every = 10_000
    c.eval_batches = 50
    c.mesh.update(dict(data=-1, fsdp=1, tensor=1))
    c.model.update(
        dict(
            vocab_size=30522,  # padded to 30592
            max_len=512,
            num_layers=12,
            d_model=768,
            num_heads=12,
            mlp_dim=3072,
            positions="learned",
            norm="layernorm",
            norm_eps=1e-12,
            norm_position="post",
            type_vocab_size=2,
            mlp="gelu",
            use_bias=True,
            tie_embeddings=True,
            dropout=0.1,
            dtype="bfloat16",
            attention="auto",
            scan_layers=True,
            remat="none",
            init_std=0.02,
        )
    )
    c.task.mask_rate = 0.15
    c.optim.update(
        dict(
            name="adamw",
            lr=1e-4,
            warmup_steps=10_000,
            schedule="linear",
            min_lr_ratio=0.0,
            b1=0.9,
            b2=0.999,
            eps=1e-6,
            weight_decay=0.01,
            clip=1.0,
        )
    )
    c.data.update(
        dict(
            source="tfds:wikipedia/20230601.en",
            train_split="train[:99%]",
            eval_split="train[99%:]",
            text_field="text",
            tokenizer=args["tokenizer"],
            seq_len=args["seq"],
        )
    )
    return c
