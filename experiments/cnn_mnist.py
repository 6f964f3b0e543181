"""The Flax MNIST tutorial, bigjax style: its CNN on MNIST from TensorFlow Datasets. One GPU (or a CPU, slowly).

    pip install -e '.[tfds]'   # then let TFDS download and prepare mnist once (it has network access)
    bigjax train --config experiments/cnn_mnist.py --workdir runs/cnn_mnist
    bigjax eval  --config experiments/cnn_mnist.py --workdir runs/cnn_mnist --once

The tutorial trains 10 epochs of batch 32 with SGD (lr 0.1, momentum 0.9) and reaches about 99% test accuracy;
this is the same network and optimizer at batch 128 for ~10 epochs (4,700 steps of 60,000 images).
"""

from bigjax.config import defaults, parse_arg


def get_config(arg=None):
    args = parse_arg(arg, steps=4_700, batch=128)
    c = defaults(model="cnn", task="classification")
    c.total_steps = args["steps"]
    c.batch_size = args["batch"]
    c.log_every = 100
    c.eval_every = 500
    c.eval_batches = 79  # 79 x 128 >= the 10,000 test images
    c.checkpoint_every = 1000
    c.mesh.update(dict(data=-1, fsdp=1, tensor=1))

    c.task.update(dict(num_classes=10))
    c.model.update(dict(features=(32, 64), hidden_dim=256, normalization="none"))
    c.optim.update(
        dict(name="sgd", lr=0.1, momentum=0.9, warmup_steps=100, schedule="cosine", weight_decay=0.0, clip=0.0)
    )
    c.data.update(dict(source="tfds:mnist", train_split="train", eval_split="test", image_size=28, channels=1))
    c.data.update(dict(image_mean=(0.1307,), image_std=(0.3081,)))
    return c
