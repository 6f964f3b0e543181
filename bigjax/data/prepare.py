"""`bigjax data prepare` and `bigjax tokenizer train`: the one-off work before training.

bigjax data prepare --config experiments/X.py      download/prepare a TFDS dataset (as ArrayRecord) and
                                                   tokenize the train and eval splits into the cache
bigjax tokenizer train --config experiments/X.py --vocab-size 8000 --out tok.model (or tok.json)
"""

from __future__ import annotations

import time

from bigjax.data import sources, tokenized, tokenizers
from bigjax.data.errors import DataError
from bigjax.ops import metrics


def prepare(config) -> list[str]:
    """Prepare what training on `config` reads; returns one line per thing done."""
    done = []
    kind, arg = sources.parse_source(config.data.source)
    if kind == "synthetic":
        return ["synthetic data needs no preparation"]
    if kind == "tfds":
        from bigjax.data import tfds_source

        builder = tfds_source.make_builder(config, arg)
        if tfds_source.is_prepared(builder):
            done.append(f"tfds:{arg} is prepared in {builder.data_dir}")
        else:
            tfds_source.prepare(builder, arg)
            done.append(f"prepared tfds:{arg} as ArrayRecord in {builder.data_dir}")
    for which in ("train", "eval"):
        split = sources.open_split(config, which)
        if split.kind != "text":
            done.append(f"{which}: {split.description}: images are decoded as they are read; nothing to tokenize")
            continue
        tokenizer = tokenizers.make_tokenizer(config.data.tokenizer)
        started = time.perf_counter()
        path = tokenized.write_cache(config, split, tokenizer)
        meta = tokenized.load(path)
        seconds = time.perf_counter() - started
        done.append(
            f"{which}: tokenized {len(meta)} records into {len(meta.tokens):,} tokens in {seconds:.1f}s -> {path}"
        )
    return done


def train_tokenizer(config, vocab_size: int, out: str) -> str:
    """Train a tokenizer with the special tokens on the text of the configured train split."""
    split = sources.open_split(config, "train")
    if split.kind != "text":
        raise DataError(f"{config.data.source} holds images; a tokenizer trains on text")
    if vocab_size < 300:
        raise DataError(f"--vocab-size {vocab_size} is too small; give at least 300 (256 bytes and a few merges)")
    metrics.say(f"training a tokenizer of {vocab_size} ids on {split.description} ({len(split.records)} records)")
    texts = (split.records[i]["text"] for i in range(len(split.records)))
    tokenizers.train_tokenizer(texts, vocab_size, out)
    trained = tokenizers.make_tokenizer(out)
    return f"wrote {out}: {trained.vocab_size} ids, special tokens {trained.special_ids}"
