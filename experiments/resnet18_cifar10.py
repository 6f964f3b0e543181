"""ResNet-18 on CIFAR-10 from TensorFlow Datasets, the CIFAR variant (a 3x3 stem, no max-pool). One GPU.

    pip install -e '.[tfds]'   # then let TFDS download and prepare cifar10 once
    bigjax train --config experiments/resnet18_cifar10.py --workdir runs/resnet18_cifar10
    bigjax train --config experiments/resnet18_cifar10.py:epochs=30 --workdir runs/resnet18_cifar10_short

The standard recipe: SGD with Nesterov momentum, lr 0.1 per 128 images, L2 weight decay 5e-4 on the convolution
and head kernels, cosine decay, pad-4-and-crop plus flips; about 95% test accuracy after 100 epochs. BatchNorm
statistics are those of the global batch (see bigjax.models.layers.BatchNorm). bfloat16 compute.
"""

from bigjax.config import defaults, parse_arg

TRAIN_IMAGES = 50_000


def get_config(arg=None):
    args = parse_arg(arg, epochs=100, batch=512)
    steps_per_epoch = TRAIN_IMAGES // args["batch"]
    c = defaults(model="resnet", task="classification")
    c.total_steps = args["epochs"] * steps_per_epoch
    c.batch_size = args["batch"]
    c.log_every = 100
    c.eval_every = 5 * steps_per_epoch
    c.eval_batches = -(-10_000 // args["batch"])  # the whole test split
    c.checkpoint_every = 10 * steps_per_epoch
    c.mesh.update(dict(data=-1, fsdp=1, tensor=1))

    c.task.update(dict(num_classes=10, label_smoothing=0.0))
    c.model.update(dict(depth=18, width=64, stem="cifar", normalization="batchnorm", dtype="bfloat16"))
    c.optim.update(
        dict(
            name="sgd",
            lr=0.1 * args["batch"] / 128,
            momentum=0.9,
            nesterov=True,
            weight_decay=5e-4,  # sgd: classic L2 on kernels, as in the papers
            warmup_steps=2 * steps_per_epoch,
            schedule="cosine",
            min_lr_ratio=0.0,
            clip=0.0,
        )
    )
    c.data.update(dict(source="tfds:cifar10", train_split="train", eval_split="test", image_size=32, channels=3))
    c.data.update(
        dict(crop_padding=4, random_flip=True, image_mean=(0.4914, 0.4822, 0.4465), image_std=(0.247, 0.243, 0.261))
    )
    return c
