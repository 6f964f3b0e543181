"""`bigjax tokenizer train --config experiments/NAME.py --vocab-size N --out PATH.model|PATH.json`"""

from __future__ import annotations


def add(commands) -> None:
    p = commands.add_parser("tokenizer", help="train a tokenizer on the configured corpus")
    p.add_argument("action", choices=["train"])
    p.add_argument("--config", required=True, help="experiments/NAME.py[:ARG]")
    p.add_argument("--vocab-size", type=int, required=True, help="ids in the vocabulary, special tokens included")
    p.add_argument("--out", required=True, help="PATH.model (SentencePiece) or PATH.json (Hugging Face tokenizers)")
    p.set_defaults(run=run)


def run(args, overrides) -> int:
    from bigjax import config as config_lib
    from bigjax.data import prepare
    from bigjax.ops import metrics

    metrics.say(prepare.train_tokenizer(config_lib.load(args.config, overrides), args.vocab_size, args.out))
    return 0
