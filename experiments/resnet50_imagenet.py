"""ResNet-50 (v1.5) on ImageNet-1k from TensorFlow Datasets, data-parallel over every device of the mesh.

    pip install -e '.[tfds]'   # ImageNet must be downloaded by hand and prepared by TFDS (see its catalog)
    bigjax train --config experiments/resnet50_imagenet.py --workdir runs/resnet50_imagenet \
        --config.data.data_dir=/data/tensorflow_datasets
    bigjax train --config experiments/resnet50_imagenet.py:batch=256,epochs=30 --workdir runs/r50_short

Goyal et al.'s recipe: SGD + Nesterov, lr 0.1 per 256 images with 5 warmup epochs, weight decay 1e-4 on
kernels (not on BatchNorm), the last BatchNorm of each block starting at 0, label smoothing 0.1, cosine decay,
90 epochs, bfloat16 compute. The data pipeline's augmentation is resize-to-224 plus pad-and-crop and flips,
weaker than Inception crops: expect about 75% top-1, a point below the best published recipes.
`experiments/resnet50_transfer.py` fine-tunes a new head on this run's checkpoints.
"""

from bigjax.config import defaults, parse_arg

TRAIN_IMAGES = 1_281_167


def get_config(arg=None):
    args = parse_arg(arg, epochs=90, batch=1024)
    steps_per_epoch = TRAIN_IMAGES // args["batch"]
    c = defaults(model="resnet", task="classification")
    c.total_steps = args["epochs"] * steps_per_epoch
    c.batch_size = args["batch"]
    c.log_every = 100
    c.eval_every = 2 * steps_per_epoch
    c.eval_batches = -(-50_000 // args["batch"])  # the whole validation split
    c.checkpoint_every = steps_per_epoch
    c.mesh.update(dict(data=-1, fsdp=1, tensor=1))

    c.task.update(dict(num_classes=1000, label_smoothing=0.1))
    c.model.update(
        dict(
            depth=50,
            width=64,
            stem="imagenet",
            normalization="batchnorm",
            bn_momentum=0.9,
            zero_init_residual=True,
            dtype="bfloat16",
            scan_layers=True,
            remat="none",
        )
    )
    c.optim.update(
        dict(
            name="sgd",
            lr=0.1 * args["batch"] / 256,
            momentum=0.9,
            nesterov=True,
            weight_decay=1e-4,
            warmup_steps=5 * steps_per_epoch,
            schedule="cosine",
            min_lr_ratio=0.0,
            clip=0.0,
        )
    )
    c.data.update(
        dict(source="tfds:imagenet2012", train_split="train", eval_split="validation", image_size=224, channels=3)
    )
    c.data.update(
        dict(crop_padding=16, random_flip=True, image_mean=(0.485, 0.456, 0.406), image_std=(0.229, 0.224, 0.225))
    )
    return c
