"""Transfer learning: the backbone of a bigjax ResNet-50 ImageNet run, frozen, with a new head for the 37 breeds
of Oxford-IIIT Pets (TensorFlow Datasets), stopped early when eval accuracy stops improving.

    bigjax train --config experiments/resnet50_imagenet.py --workdir runs/resnet50_imagenet      # first
    bigjax train --config experiments/resnet50_transfer.py:source=runs/resnet50_imagenet --workdir runs/r50_pets
    bigjax train --config experiments/resnet50_transfer.py:source=runs/resnet50_imagenet,step=50000 ...

`init_from` restores the ImageNet run's parameters (and BatchNorm statistics) except its 1000-class head onto
this run's mesh; the new 37-class head starts at zero. `freeze` keeps every parameter but the head bit-identical
(and gives it no optimizer state), and `freeze_batch_stats` keeps the backbone normalizing with its ImageNet
statistics, so it computes exactly the features it was trained to compute: a linear probe. Early stopping
watches the inline eval accuracy and keeps the best checkpoint.
"""

from bigjax.config import defaults, parse_arg


def get_config(arg=None):
    args = parse_arg(arg, source="runs/resnet50_imagenet", step=0, steps=3_000, batch=256)
    c = defaults(model="resnet", task="classification")
    c.total_steps = args["steps"]
    c.batch_size = args["batch"]
    c.log_every = 25
    c.eval_every = 50
    c.eval_batches = -(-3_669 // args["batch"])  # the whole test split
    c.checkpoint_every = 50
    c.mesh.update(dict(data=-1, fsdp=1, tensor=1))

    c.init_from.update(dict(workdir=args["source"], step=args["step"], include=".*", exclude="^head/"))
    c.freeze = "^(?!head/)"  # everything but the head
    c.early_stopping.update(dict(metric="accuracy", mode="max", patience=5))

    c.task.update(dict(num_classes=37, label_smoothing=0.0))
    # The backbone must be the one resnet50_imagenet trained: the same model keys, only the statistics frozen.
    c.model.update(
        dict(
            depth=50,
            width=64,
            stem="imagenet",
            normalization="batchnorm",
            freeze_batch_stats=True,
            dtype="bfloat16",
            scan_layers=True,
        )
    )
    c.optim.update(dict(name="adamw", lr=1e-3, warmup_steps=50, schedule="cosine", weight_decay=0.0, clip=1.0))
    c.data.update(
        dict(source="tfds:oxford_iiit_pet", train_split="train", eval_split="test", image_size=224, channels=3)
    )
    c.data.update(dict(random_flip=True, image_mean=(0.485, 0.456, 0.406), image_std=(0.229, 0.224, 0.225)))
    return c
