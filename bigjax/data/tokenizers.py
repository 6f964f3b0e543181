"""Tokenizers: byte-level, SentencePiece model files, Hugging Face `tokenizers` JSON files; training new ones.

Every tokenizer has `vocab_size` (special tokens included), `encode(text) -> int32 ids`, `encode_batch(texts)`,
`decode(ids)`, `special_ids` with at least "pad", "cls", "mask" and "eos", and `fingerprint` (what a tokenized
cache is keyed by). A vocabulary that lacks one of the special tokens gets it appended after its last id, so every
tokenizer can serve every task.

`config.data.tokenizer` names one: "byte", "sentencepiece:PATH" or "hf:PATH" (a PATH ending in .model or .json
says which by itself).
"""

from __future__ import annotations

import hashlib
import pathlib
import re

import numpy as np

from bigjax.data.errors import DataError

SPECIAL_TOKENS = ("pad", "cls", "mask", "eos")
# The spelling of each special token in a trained vocabulary (the first is what `train_tokenizer` adds).
SPECIAL_SPELLINGS = {
    "pad": ("[PAD]", "<pad>", "<|pad|>"),
    "cls": ("[CLS]", "<cls>", "<s>"),
    "mask": ("[MASK]", "<mask>"),
    "eos": ("[EOS]", "</s>", "<|endoftext|>", "<eos>"),
}


class ByteTokenizer:
    """Every UTF-8 byte is a token (ids 0..255); the special tokens follow (256..259)."""

    special_ids = {name: 256 + i for i, name in enumerate(SPECIAL_TOKENS)}
    vocab_size = 256 + len(SPECIAL_TOKENS)
    fingerprint = "byte"

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def encode_batch(self, texts) -> list[np.ndarray]:
        return [self.encode(text) for text in texts]

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class SentencePieceTokenizer:
    def __init__(self, path: pathlib.Path):
        import sentencepiece

        self.path = path
        try:
            self.model = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as error:
            raise DataError(f"{path} is not a SentencePiece model file ({error})") from None
        base = self.model.get_piece_size()
        found = {name: self._find(name) for name in SPECIAL_TOKENS}
        self.special_ids, self.vocab_size = _append_missing(found, base)
        self.base_vocab = base
        self.fingerprint = f"sentencepiece:{_file_digest(path)}"

    def _find(self, name: str) -> int | None:
        native = {"pad": self.model.pad_id(), "eos": self.model.eos_id()}.get(name, -1)
        if native >= 0:
            return native
        for spelling in SPECIAL_SPELLINGS[name]:
            i = self.model.piece_to_id(spelling)
            if i != self.model.unk_id() and self.model.id_to_piece(i) == spelling:
                return i
        return None

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.model.encode(text), dtype=np.int32)

    def encode_batch(self, texts) -> list[np.ndarray]:
        return [np.asarray(ids, dtype=np.int32) for ids in self.model.encode(list(texts))]

    def decode(self, ids) -> str:
        return self.model.decode([int(i) for i in ids if 0 <= int(i) < self.base_vocab])

    def token(self, i: int) -> str:
        return self.model.id_to_piece(i)

    def hf_tokenizer_json(self) -> str:
        """This model as a Hugging Face tokenizer.json that encodes and decodes as SentencePiece does (proven on whole
        plays by tests/test_hf.py): the model's own unigram or BPE pieces and scores, its normalizer (the precompiled
        NFKC map, extra spaces removed, the dummy prefix) and its byte fallback; user-defined pieces kept whole, the
        control pieces (bos, eos, pad) special tokens that decoding drops. The construction of transformers'
        SpmConverter.build_tokenizer_from_spm_proto (its legacy form), without transformers."""
        import tokenizers
        from sentencepiece import sentencepiece_model_pb2
        from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

        proto = sentencepiece_model_pb2.ModelProto.FromString(self.model.serialized_model_proto())
        trainer, spec, pieces = proto.trainer_spec, proto.normalizer_spec, proto.pieces
        user_defined = [p.piece for p in pieces if p.type == p.USER_DEFINED]
        if trainer.model_type == trainer.UNIGRAM:
            model = models.Unigram([(p.piece, p.score) for p in pieces], trainer.unk_id, trainer.byte_fallback)
        elif trainer.model_type == trainer.BPE:
            model = models.BPE(
                {p.piece: i for i, p in enumerate(pieces)},
                _sentencepiece_merges(pieces),
                unk_token=pieces[trainer.unk_id].piece,
                fuse_unk=True,
                byte_fallback=trainer.byte_fallback,
                ignore_merges=bool(user_defined),
            )
        else:
            kind = trainer.ModelType.Name(trainer.model_type).lower()
            raise DataError(
                f"{self.path} is a SentencePiece {kind} model: only unigram and BPE models have a Hugging Face form"
            )
        tokenizer = tokenizers.Tokenizer(model)

        steps = [normalizers.Precompiled(spec.precompiled_charsmap)] if spec.precompiled_charsmap else []
        if spec.remove_extra_whitespaces:  # spaces only: SentencePiece leaves newlines alone
            steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
        if spec.escape_whitespaces:
            steps.append(normalizers.Replace(" ", "▁"))
        if spec.add_dummy_prefix:  # Metaspace adds no prefix to a text that starts with "▁"; SentencePiece does
            steps.append(normalizers.Replace(Regex(r"\A▁"), "▁▁"))
        tokenizer.normalizer = normalizers.Sequence(steps)
        splits = []
        if spec.add_dummy_prefix:
            splits.append(pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=False))
        if user_defined:  # emitted whole, never merged
            pattern = "|".join(re.escape(piece) for piece in sorted(user_defined, key=len, reverse=True))
            splits.append(pre_tokenizers.Split(Regex(pattern), behavior="isolated"))
        if splits:
            tokenizer.pre_tokenizer = pre_tokenizers.Sequence(splits)

        steps = [decoders.Replace("▁", " ")] + ([decoders.ByteFallback()] if trainer.byte_fallback else [])
        if spec.add_dummy_prefix:  # the prefix off the text's start only: fused first, as Strip works per token
            steps += [decoders.Fuse(), decoders.Strip(content=" ", left=1)]
        elif trainer.byte_fallback:
            steps.append(decoders.Fuse())
        tokenizer.decoder = decoders.Sequence(steps)
        control = [p.piece for p in pieces if p.type == p.CONTROL]
        tokenizer.add_special_tokens([AddedToken(piece, special=True, normalized=False) for piece in control])
        return tokenizer.to_str()


def _sentencepiece_merges(pieces) -> list[tuple[str, str]]:
    """A SentencePiece BPE model's merges, which it does not store: every split of a normal piece into two normal
    pieces, the pieces of higher score first (SentencePiece merges by score)."""
    normal = {p.piece: (p.score, i) for i, p in enumerate(pieces) if p.type == p.NORMAL}
    ranked = sorted(
        (-score, i, piece[:k], piece[k:])
        for piece, (score, i) in normal.items()
        for k in range(1, len(piece))
        if piece[:k] in normal and piece[k:] in normal
    )
    return [(left, right) for _, _, left, right in ranked]


class HuggingFaceTokenizer:
    def __init__(self, path: pathlib.Path):
        import tokenizers

        self.path = path
        try:
            self.tokenizer = tokenizers.Tokenizer.from_file(str(path))
        except Exception as error:  # the Rust side raises a bare Exception for a malformed file
            raise DataError(f"{path} is not a Hugging Face tokenizers JSON file ({error})") from None
        base = self.tokenizer.get_vocab_size(with_added_tokens=True)
        found = {name: self._find(name) for name in SPECIAL_TOKENS}
        self.special_ids, self.vocab_size = _append_missing(found, base)
        self.base_vocab = base
        self.fingerprint = f"hf:{_file_digest(path)}"

    def _find(self, name: str) -> int | None:
        for spelling in SPECIAL_SPELLINGS[name]:
            i = self.tokenizer.token_to_id(spelling)
            if i is not None:
                return i
        return None

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def encode_batch(self, texts) -> list[np.ndarray]:
        encodings = self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int32) for e in encodings]

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids if 0 <= int(i) < self.base_vocab])

    def token(self, i: int) -> str:
        return self.tokenizer.id_to_token(i)


def _append_missing(found: dict, base_vocab: int) -> tuple[dict, int]:
    """Give every special token that the vocabulary lacks a new id after its last one."""
    special, size = {}, base_vocab
    for name in SPECIAL_TOKENS:
        if found[name] is None:
            special[name], size = size, size + 1
        else:
            special[name] = found[name]
    return special, size


def _file_digest(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def parse_spec(spec: str) -> tuple[str, str]:
    """ "byte" | "sentencepiece:PATH" | "hf:PATH" | PATH.model | PATH.json -> (kind, path)."""
    kind, sep, path = spec.partition(":")
    if sep and kind in ("sentencepiece", "hf"):
        return kind, path
    if spec == "byte":
        return "byte", ""
    if spec.endswith(".model"):
        return "sentencepiece", spec
    if spec.endswith(".json"):
        return "hf", spec
    raise DataError(
        f"config.data.tokenizer={spec!r} is not a tokenizer; use 'byte', 'sentencepiece:PATH' (a .model file) or "
        "'hf:PATH' (a tokenizers .json file); `bigjax tokenizer train` makes either"
    )


def make_tokenizer(spec: str):
    """The tokenizer config.data.tokenizer names."""
    kind, path = parse_spec(spec)
    if kind == "byte":
        return ByteTokenizer()
    file = pathlib.Path(path).expanduser()
    if not file.is_file():
        raise DataError(
            f"tokenizer file {file} (config.data.tokenizer) not found; train one with `bigjax tokenizer train`"
        )
    return SentencePieceTokenizer(file) if kind == "sentencepiece" else HuggingFaceTokenizer(file)


def check_vocab(model_vocab_size: int, tokenizer, spec: str) -> None:
    """The model's embedding must have a row for every id the tokenizer can produce."""
    if model_vocab_size < tokenizer.vocab_size:
        raise DataError(
            f"the tokenizer {spec!r} has {tokenizer.vocab_size} ids (special tokens included) but "
            f"config.model.vocab_size={model_vocab_size}; set --config.model.vocab_size={tokenizer.vocab_size} "
            "(the model pads it up to a multiple of model.vocab_multiple)"
        )


def train_tokenizer(texts, vocab_size: int, out: str) -> None:
    """Train a tokenizer on an iterable of texts and write it to `out`: a SentencePiece unigram model for a
    .model path, a byte-level BPE `tokenizers` JSON for a .json path; both with the special tokens."""
    kind, path = parse_spec(out)
    out_path = pathlib.Path(path).expanduser()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "sentencepiece":
        _train_sentencepiece(texts, vocab_size, out_path)
    elif kind == "hf":
        _train_hf_bpe(texts, vocab_size, out_path)
    else:
        raise DataError(f"--out {out!r}: name a .model (SentencePiece) or .json (Hugging Face tokenizers) file")


def _train_sentencepiece(texts, vocab_size: int, out_path: pathlib.Path) -> None:
    import sentencepiece

    if out_path.suffix != ".model":
        raise DataError(f"--out {out_path}: a SentencePiece model file must end in .model")
    lines = (line for text in texts for line in text.splitlines() if line.strip())
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=lines,
            model_prefix=str(out_path.with_suffix("")),
            vocab_size=vocab_size,
            model_type="unigram",
            character_coverage=1.0,
            byte_fallback=True,  # no text is ever out of vocabulary
            pad_id=3,
            user_defined_symbols=["[CLS]", "[MASK]"],
            minloglevel=2,
        )
    except RuntimeError as error:
        raise DataError(f"SentencePiece could not train a vocabulary of {vocab_size}: {error}") from None


def _train_hf_bpe(texts, vocab_size: int, out_path: pathlib.Path) -> None:
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    special = [SPECIAL_SPELLINGS[name][0] for name in SPECIAL_TOKENS]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte: no text is out of vocabulary
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.save(str(out_path))
