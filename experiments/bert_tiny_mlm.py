"""A tiny BERT pretrained by masked-LM on the bundled Shakespeare plays: byte-level, each speech an example
(several packed per row), on a CPU in minutes. Fine-tune it with experiments/finetune_genre.py.

    bigjax train --config experiments/bert_tiny_mlm.py --workdir runs/bert_tiny_mlm
    bigjax eval  --config experiments/bert_tiny_mlm.py --workdir runs/bert_tiny_mlm --once
    bigjax train --config experiments/bert_tiny_mlm.py:layers=6,d=256 --workdir runs/bert_small_mlm

15% of the bytes of every speech are chosen, 80% of those masked, 10% replaced, 10% kept; the model predicts
them from both sides. Accuracy is on the chosen bytes of the held-out tenth of every play.
"""

from bigjax.config import defaults, parse_arg


def get_config(arg=None):
    args = parse_arg(arg, layers=4, d=128, heads=4, seq=128, steps=1500, norm="pre")
    c = defaults(model="bert", task="masked_lm")
    c.seed = 0
    c.total_steps = args["steps"]
    c.batch_size = 32
    c.log_every = 50
    c.eval_every = 250
    c.eval_batches = 16
    c.checkpoint_every = 500
    c.keep_checkpoints = 2
    c.mesh.update(dict(data=-1, fsdp=1, tensor=1))

    c.model.update(
        dict(
            num_layers=args["layers"],
            d_model=args["d"],
            num_heads=args["heads"],
            max_len=args["seq"],
            vocab_size=260,  # the byte tokenizer: 256 bytes + pad, cls, mask, eos
            norm_position=args["norm"],  # pre-LN trains at a higher learning rate than BERT's post-LN
            type_vocab_size=0,
            dropout=0.0,  # 1500 steps see each speech a few times: no need yet
            scan_layers=False,  # on a CPU, unrolled layers step faster
        )
    )
    c.task.mask_rate = 0.15
    c.optim.update(dict(name="adamw", lr=2e-3, warmup_steps=100, schedule="cosine", weight_decay=0.01, clip=1.0))
    c.data.update(dict(source="shakespeare", tokenizer="byte", seq_len=args["seq"]))
    return c
