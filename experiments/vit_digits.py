"""A small ViT on scikit-learn's 8x8 digits (bundled): a CPU, a few minutes.

    bigjax train --config experiments/vit_digits.py --workdir runs/vit_digits
    bigjax eval  --config experiments/vit_digits.py --workdir runs/vit_digits --once
    bigjax train --config experiments/vit_digits.py:patch=4,pooling=gap --workdir runs/vit_digits_gap

2x2 patches (16 tokens of 4 pixels each) and a class token, 4 pre-LN layers of width 64; AdamW, dropout and
pad-and-crop augmentation, since 1500 training images are few for a Transformer.
"""

from bigjax.config import defaults, parse_arg


def get_config(arg=None):
    args = parse_arg(arg, steps=1500, batch=64, patch=2, layers=4, d=64, pooling="cls")
    c = defaults(model="vit", task="classification")
    c.seed = 0
    c.total_steps = args["steps"]
    c.batch_size = args["batch"]
    c.log_every = 100
    c.eval_every = 250
    c.eval_batches = 5  # 5 x 64 >= the 297 eval digits
    c.checkpoint_every = 500
    c.mesh.update(dict(data=-1, fsdp=1, tensor=1))

    c.task.update(dict(num_classes=10, label_smoothing=0.1))
    c.model.update(
        dict(
            patch_size=args["patch"],
            pooling=args["pooling"],
            position_embedding="learned",
            num_layers=args["layers"],
            d_model=args["d"],
            num_heads=4,
            mlp_dim=4 * args["d"],
            dropout=0.1,
            # On a CPU, scanning four small layers costs more than it saves (as for shakespeare_char).
            scan_layers=False,
        )
    )
    c.optim.update(dict(name="adamw", lr=2e-3, warmup_steps=100, schedule="cosine", weight_decay=0.05, clip=1.0))
    c.data.update(dict(source="digits", image_size=8, channels=1, crop_padding=1, random_flip=False))
    c.data.update(dict(image_mean=(0.5,), image_std=(0.5,)))  # digits scaled to 0..255, then to about [-1, 1]
    return c
