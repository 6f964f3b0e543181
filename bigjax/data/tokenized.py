"""Tokenized text, in memory or from the cache that `bigjax data prepare` writes.

A split's text records are tokenized once into one flat array where every record's ids are followed by the eos
token, plus the offsets where each record starts (and the labels, if the records have them). Causal LM reads the
flat array as one stream; the packed layouts read each record without its eos.

The cache is a directory per (source split, tokenizer) under config.data.cache_dir:

    tokens.bin     the flat ids, uint16 when the vocabulary fits, else uint32 (read as a memmap)
    offsets.npy    int64 [records + 1]
    labels.npy     int32 [records] (labelled sources only)
    meta.json      what it holds: the source and split, the tokenizer, counts of records, tokens, bytes, chars

Training finds it by the same key and memory-maps it: the text is neither re-read nor re-tokenized, and a host
touches only the pages of the windows it reads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import shutil

import numpy as np

from bigjax.data.errors import DataError
from bigjax.ops import metrics

CACHE_VERSION = 1
CHUNK = 4096  # records tokenized per call: big enough for the tokenizers' batch encoders


@dataclasses.dataclass(frozen=True)
class Tokenized:
    tokens: np.ndarray  # every record's ids, each followed by eos
    offsets: np.ndarray  # int64 [n + 1]: record i is tokens[offsets[i] : offsets[i + 1]], its eos included
    labels: np.ndarray | None  # int32 [n]
    num_bytes: int  # UTF-8 bytes and characters of the text: for bits per byte and per character
    num_chars: int
    num_classes: int | None = None

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def record(self, i: int) -> np.ndarray:
        """Record i's ids without its eos, as int32."""
        return np.asarray(self.tokens[self.offsets[i] : self.offsets[i + 1] - 1], dtype=np.int32)

    def lengths(self) -> np.ndarray:
        """Tokens of every record, eos not counted."""
        return np.diff(self.offsets) - 1

    def stats(self) -> dict:
        tokens = max(len(self.tokens), 1)
        return {"bytes_per_token": self.num_bytes / tokens, "chars_per_token": self.num_chars / tokens}


def cache_root(config) -> pathlib.Path:
    return pathlib.Path(config.data.cache_dir or "~/.cache/bigjax/tokenized").expanduser()


def cache_path(config, split, tokenizer) -> pathlib.Path:
    key = hashlib.sha256(f"{split.fingerprint}|{tokenizer.fingerprint}|v{CACHE_VERSION}".encode()).hexdigest()[:20]
    name = "".join(c if c.isalnum() else "_" for c in config.data.source.split(":")[-1])[-40:]
    return cache_root(config) / f"{name}-{key}"


def load_or_tokenize(config, split, tokenizer) -> Tokenized:
    """The split's tokens: from its cache if `bigjax data prepare` wrote one, else tokenized now, in memory."""
    path = cache_path(config, split, tokenizer)
    if (path / "meta.json").exists():
        metrics.say(f"data: reading the tokenized cache {path}")
        return load(path)
    if len(split.records) > 100_000:
        metrics.say(
            f"data: tokenizing {len(split.records)} records in memory; `bigjax data prepare --config ...` "
            "tokenizes them once into a cache that every later run reads instead"
        )
    return tokenize(split.records, tokenizer, split.num_classes)


def load(path: pathlib.Path) -> Tokenized:
    meta = json.loads((path / "meta.json").read_text())
    tokens = np.memmap(path / "tokens.bin", dtype=meta["dtype"], mode="r", shape=(meta["tokens"],))
    offsets = np.load(path / "offsets.npy")
    labels = np.load(path / "labels.npy") if meta["labelled"] else None
    return Tokenized(tokens, offsets, labels, meta["bytes"], meta["chars"], meta["classes"])


def tokenize(records, tokenizer, num_classes: int | None = None) -> Tokenized:
    """Tokenize every record in memory (int32)."""
    chunks, lengths, labels, counts = [], [], [], [0, 0]
    for ids, chunk_labels in _tokenized_chunks(records, tokenizer, counts):
        chunks.append(ids)
        lengths += [len(x) for x in ids]
        labels += chunk_labels
    tokens = np.concatenate([x for chunk in chunks for x in chunk]) if chunks else np.zeros(0, np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return Tokenized(tokens, offsets, _labels_or_none(labels, len(lengths)), counts[0], counts[1], num_classes)


def write_cache(config, split, tokenizer) -> pathlib.Path:
    """Tokenize a split into its cache directory (streaming: the text is never all in memory)."""
    path = cache_path(config, split, tokenizer)
    temporary = path.with_name(f"{path.name}.incomplete-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    lengths, labels, counts = [], [], [0, 0]
    with open(temporary / "tokens.bin", "wb") as out:
        for ids, chunk_labels in _tokenized_chunks(split.records, tokenizer, counts):
            for x in ids:
                out.write(x.astype(dtype).tobytes())
            lengths += [len(x) for x in ids]
            labels += chunk_labels
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    np.save(temporary / "offsets.npy", offsets)
    labels = _labels_or_none(labels, len(lengths))
    if labels is not None:
        np.save(temporary / "labels.npy", labels)
    meta = dict(
        source=config.data.source,
        split=split.fingerprint,
        description=split.description,
        tokenizer=tokenizer.fingerprint,
        dtype=np.dtype(dtype).name,
        records=len(lengths),
        tokens=int(offsets[-1]),
        bytes=counts[0],
        chars=counts[1],
        labelled=labels is not None,
        classes=split.num_classes,
    )
    (temporary / "meta.json").write_text(json.dumps(meta, indent=2))
    shutil.rmtree(path, ignore_errors=True)
    os.replace(temporary, path)  # readers see a complete cache or none
    return path


def _tokenized_chunks(records, tokenizer, counts: list):
    """Yield ([ids + eos per record], [label per record]) for chunks of records; count bytes and characters."""
    eos = np.asarray([tokenizer.special_ids["eos"]], np.int32)
    for start in range(0, len(records), CHUNK):
        chunk = [records[i] for i in range(start, min(start + CHUNK, len(records)))]
        texts = [r["text"] for r in chunk]
        counts[0] += sum(len(t.encode("utf-8")) for t in texts)
        counts[1] += sum(len(t) for t in texts)
        ids = [np.concatenate([x, eos]) for x in tokenizer.encode_batch(texts)]
        yield ids, [r.get("label", -1) for r in chunk]


def _labels_or_none(labels: list, n: int):
    if n and all(label == -1 for label in labels):
        return None
    if any(label == -1 for label in labels):
        raise DataError("some records have a label and some do not; label every record or none")
    return np.asarray(labels, np.int32)
