"""The small CNN of the Flax MNIST tutorial on scikit-learn's 8x8 digits (bundled): a CPU, about two minutes.

    bigjax train --config experiments/cnn_digits.py --workdir runs/cnn_digits
    bigjax eval  --config experiments/cnn_digits.py --workdir runs/cnn_digits --once
    bigjax train --config experiments/cnn_digits.py:norm=batchnorm --workdir runs/cnn_digits_bn

1500 digits train, the last 297 evaluate (every eval sees all of them). Convolutions (32, 64 channels, each
followed by a 2x2 average pool: 8x8 -> 4x4 -> 2x2), Dense 256, head; Adam, light pad-and-crop augmentation.
"""

from bigjax.config import defaults, parse_arg


def get_config(arg=None):
    args = parse_arg(arg, steps=1500, batch=64, norm="none")
    c = defaults(model="cnn", task="classification")
    c.seed = 0
    c.total_steps = args["steps"]
    c.batch_size = args["batch"]
    c.log_every = 50
    c.eval_every = 100
    c.eval_batches = 5  # 5 x 64 >= the 297 eval digits
    c.checkpoint_every = 200
    c.mesh.update(dict(data=-1, fsdp=1, tensor=1))

    c.task.update(dict(num_classes=10, label_smoothing=0.0))
    c.model.update(dict(features=(32, 64), hidden_dim=256, dropout=0.0, normalization=args["norm"], norm_groups=8))
    c.optim.update(dict(name="adamw", lr=3e-3, warmup_steps=50, schedule="cosine", weight_decay=0.01, clip=1.0))
    c.data.update(dict(source="digits", image_size=8, channels=1, crop_padding=1, random_flip=False))
    c.data.update(dict(image_mean=(0.5,), image_std=(0.5,)))  # digits scaled to 0..255, then to about [-1, 1]
    return c
