"""Transfer learning from a Hugging Face ViT: google/vit-base-patch16-224 (or any ViTForImageClassification /
ViTModel saved with save_pretrained) fine-tuned whole on the 37 breeds of Oxford-IIIT Pets (TensorFlow Datasets).

    bigjax train --config experiments/vit_transfer.py:hf=models/vit-base-patch16-224 --workdir runs/vit_pets

The model settings come from the directory's config.json (exact GELU, LayerNorm eps 1e-12 with torch's two-pass
variance), the pixel normalization from its preprocessor_config.json, and the weights, through
init_from.workdir=hf:PATH, all but the classifier: the new 37-class head starts at zero. The ViT paper's fine-tuning
recipe: SGD with momentum 0.9, no weight decay, clipping at 1, a short warmup and cosine decay, at the
pretraining resolution. Early stopping watches the eval accuracy and keeps the best checkpoint.

Until the directory exists (the default, models/vit-base-patch16-224, is not shipped), the config is built from
vit-base-patch16-224's own settings, so that it loads, plans and validates; training then asks for the weights.
"""

import pathlib

from bigjax.config import defaults, parse_arg

# google/vit-base-patch16-224's config.json, the fields bigjax reads.
VIT_B16 = dict(
    architectures=["ViTModel"],
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    image_size=224,
    patch_size=16,
    hidden_act="gelu",
    layer_norm_eps=1e-12,
)


def get_config(arg=None):
    args = parse_arg(arg, hf="models/vit-base-patch16-224", steps=2_000, batch=128)
    from bigjax.hf import config_from_hf, vit

    if (pathlib.Path(args["hf"]) / "config.json").is_file():
        imported = config_from_hf(args["hf"])
    else:
        imported = vit.bigjax_config(VIT_B16)
    c = defaults(model="vit", task="classification")
    c.total_steps = args["steps"]
    c.batch_size = args["batch"]
    c.log_every = 25
    c.eval_every = 100
    c.eval_batches = -(-3_669 // args["batch"])  # the whole test split
    c.checkpoint_every = 100
    c.mesh.update(dict(data=-1, fsdp=1, tensor=1))

    c.model = imported.model  # the pretrained ViT's settings: every parameter but the head loads by name
    c.init_from.update(dict(workdir=f"hf:{args['hf']}", include=".*", exclude="^head/"))
    c.early_stopping.update(dict(metric="accuracy", mode="max", patience=5))

    c.task.update(dict(num_classes=37, label_smoothing=0.0))
    c.optim.update(
        dict(name="sgd", lr=0.003, momentum=0.9, warmup_steps=100, schedule="cosine", weight_decay=0.0, clip=1.0)
    )
    d = imported.data  # the resolution, channels and normalization the model was pretrained with
    c.data.update(dict(source="tfds:oxford_iiit_pet", train_split="train", eval_split="test", random_flip=True))
    c.data.update(dict(image_size=d.image_size, channels=d.channels, image_mean=d.image_mean, image_std=d.image_std))
    return c
