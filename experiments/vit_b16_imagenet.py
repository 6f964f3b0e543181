"""ViT-B/16 on ImageNet-1k from TensorFlow Datasets: 86M parameters, 196 patches of 16x16 and no class token.

    pip install -e '.[tfds]'   # ImageNet must be downloaded by hand and prepared by TFDS (see its catalog)
    bigjax train --config experiments/vit_b16_imagenet.py --workdir runs/vit_b16 \
        --config.data.data_dir=/data/tensorflow_datasets
    bigjax train --config experiments/vit_b16_imagenet.py --workdir runs/vit_b16 --config.mesh.data=1 \
        --config.mesh.fsdp=-1                                    # FSDP: parameters and moments split 8 ways

big_vision's "better plain ViT baseline" choices: global average pooling, fixed 2-D sin-cos positions, AdamW
(b2 0.999) at lr 1e-3 for batch 1024 with 10k warmup steps and cosine decay, decoupled weight decay 1e-4 per
step (0.1 x lr), clipping at 1, 90 epochs, bfloat16 compute with cuDNN flash attention on GPUs. Without their
RandAugment and Mixup (the data pipeline has crops and flips), dropout 0.1 and label smoothing stand in as
regularizers; expect the low-to-mid 70s top-1 rather than their 76.5%.
"""

from bigjax.config import defaults, parse_arg

TRAIN_IMAGES = 1_281_167


def get_config(arg=None):
    args = parse_arg(arg, epochs=90, batch=1024, remat="none")
    steps_per_epoch = TRAIN_IMAGES // args["batch"]
    c = defaults(model="vit", task="classification")
    c.total_steps = args["epochs"] * steps_per_epoch
    c.batch_size = args["batch"]
    c.log_every = 100
    c.eval_every = 2 * steps_per_epoch
    c.eval_batches = -(-50_000 // args["batch"])
    c.checkpoint_every = steps_per_epoch
    c.mesh.update(dict(data=-1, fsdp=1, tensor=1))

    c.task.update(dict(num_classes=1000, label_smoothing=0.1))
    c.model.update(
        dict(
            patch_size=16,
            pooling="gap",
            position_embedding="sincos2d",
            num_layers=12,
            d_model=768,
            num_heads=12,
            mlp_dim=3072,
            norm="layernorm",
            norm_eps=1e-6,
            mlp="gelu",
            dropout=0.1,
            dtype="bfloat16",
            attention="auto",
            scan_layers=True,
            remat=args["remat"],
        )
    )
    c.optim.update(
        dict(
            name="adamw",
            lr=1e-3,
            b1=0.9,
            b2=0.999,
            weight_decay=0.1,  # decoupled: lr x 0.1 = 1e-4 of each kernel per step at the peak
            warmup_steps=10_000,
            schedule="cosine",
            min_lr_ratio=0.0,
            clip=1.0,
        )
    )
    c.data.update(
        dict(source="tfds:imagenet2012", train_split="train", eval_split="validation", image_size=224, channels=3)
    )
    c.data.update(dict(crop_padding=16, random_flip=True, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5)))
    return c
