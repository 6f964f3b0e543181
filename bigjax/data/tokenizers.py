"""Tokenizers. Byte-level needs no vocabulary file: every UTF-8 byte is a token, and the special tokens follow."""

from __future__ import annotations

import numpy as np

SPECIAL_TOKENS = ("pad", "cls", "mask", "eos")


class ByteTokenizer:
    """Every UTF-8 byte is a token (ids 0..255); the special tokens follow (256..259)."""

    special_ids = {name: 256 + i for i, name in enumerate(SPECIAL_TOKENS)}
    vocab_size = 256 + len(SPECIAL_TOKENS)

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


def make_tokenizer(name: str):
    if name == "byte":
        return ByteTokenizer()
    raise ValueError(f"unknown tokenizer {name!r}; available: byte")
