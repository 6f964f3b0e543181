"""Sentiment of IMDB movie reviews (TFDS imdb_reviews: 25k train, 25k test, positive/negative), fine-tuning the
BERT-base of experiments/bert_base_mlm.py. For a GPU or TPU.

    bigjax train --config experiments/imdb_finetune.py --workdir runs/imdb
    bigjax train --config experiments/imdb_finetune.py:init=gs://bucket/runs/bert_base_mlm --workdir runs/imdb
    bigjax train --config experiments/imdb_finetune.py:init=none --workdir runs/imdb_scratch    # no pretraining
    bigjax train --config experiments/imdb_finetune.py:hf=models/bert-base-uncased --workdir runs/imdb_hf

`hf=PATH` fine-tunes a Hugging Face BERT directory instead (bert-base-uncased saved with save_pretrained, or any
BertForMaskedLM / BertModel / BertForSequenceClassification): its model settings, its WordPiece tokenizer.json
and, through init_from.workdir=hf:PATH, its weights (all but the classifier; a BertForMaskedLM has no pooler, which
then starts fresh).

BERT's fine-tuning recipe: Adam at 2e-5, 10% warmup then linear decay, batch 32, dropout 0.1, a few epochs;
reviews cut to 512 tokens (one per row; shorter ones packed up to 2 per row). The new head starts at zero,
everything else comes from the pretraining run's newest checkpoint; training stops when test accuracy has not
improved for 5 evaluations, and the best checkpoint is kept.
"""

from pathlib import Path

from bigjax import config as config_lib
from bigjax.config import defaults, parse_arg

PRETRAINING = Path(__file__).parent / "bert_base_mlm.py"


def get_config(arg=None):
    args = parse_arg(arg, init="runs/bert_base_mlm", hf="", epochs=3, batch=32, seq=512)
    pretraining = from_hf(args["hf"]) if args["hf"] else config_lib.load_experiment(str(PRETRAINING))
    steps = args["epochs"] * 25_000 // args["batch"]

    c = defaults(model="bert", task="classification")
    c.total_steps = steps
    c.batch_size = args["batch"]
    c.log_every = 50
    c.eval_every = 200
    c.eval_batches = 25_000 // args["batch"]  # the whole test split
    c.checkpoint_every = 0  # early stopping saves at every evaluation
    c.keep_checkpoints = 1
    c.mesh.update(dict(data=-1, fsdp=1, tensor=1))

    c.model = pretraining.model  # the same model, so every backbone parameter loads by name
    c.task.update(dict(num_classes=2, label_smoothing=0.0))
    c.data.update(
        dict(
            source="tfds:imdb_reviews",
            train_split="train",
            eval_split="test",
            text_field="text",
            label_field="label",
            tokenizer=pretraining.data.tokenizer,
            seq_len=args["seq"],
            max_segments=2,
        )
    )
    c.init_from.workdir = "" if args["init"] == "none" else args["init"]
    if args["hf"]:
        c.init_from.update(dict(workdir=f"hf:{args['hf']}", exclude="^classifier/"))
    c.early_stopping.update(dict(metric="accuracy", mode="max", patience=5))
    c.optim.update(
        dict(
            name="adamw",
            lr=2e-5,
            warmup_steps=steps // 10,
            schedule="linear",
            min_lr_ratio=0.0,
            b2=0.999,
            eps=1e-6,
            weight_decay=0.01,
            clip=1.0,
        )
    )
    return c


def from_hf(path: str):
    """The model and tokenizer of a Hugging Face BERT directory, as a pretraining run's config would give them."""
    from bigjax import hf
    from bigjax.data import make_tokenizer

    config = hf.config_from_hf(path)
    config.data.tokenizer = f"hf:{Path(path) / 'tokenizer.json'}"
    # Special tokens a WordPiece vocabulary lacks (bigjax's eos) get ids after its last: rows for them too.
    config.model.vocab_size = max(config.model.vocab_size, make_tokenizer(config.data.tokenizer).vocab_size)
    return config
