"""Data layouts: tokenizer special ids, masked-LM and text-classification packing with segment ids and positions,
the bundled labelled sources, images (decode, resize, crop, flip, normalize), synthetic data for every layout, and
the eval split's padding."""

import numpy as np
import pytest

from bigjax.data import DataError, corpus, images, packing, pipeline, tokenized, tokenizers

BYTE = tokenizers.ByteTokenizer()


def tokenize(texts, labels=None):
    records = [{"text": t} for t in texts]
    if labels is not None:
        records = [{**r, "label": y} for r, y in zip(records, labels, strict=True)]
    return tokenized.tokenize(records, BYTE)


def pack(tokens, seq_len, classify=False, max_segments=0, seed=None):
    return packing.packed_dataset(
        tokens, seq_len, BYTE.special_ids, classify=classify, max_segments=max_segments, shuffle_seed=seed
    )


def test_byte_tokenizer_puts_its_special_tokens_after_the_bytes():
    assert BYTE.special_ids == {"pad": 256, "cls": 257, "mask": 258, "eos": 259}
    assert BYTE.vocab_size == 260
    assert BYTE.decode([104, 257, 105, 259]) == "hi"  # special ids are not text


def test_tokenized_records_end_with_eos_and_keep_their_labels():
    tokens = tokenize(["ab", "", "cde"], [2, 0, 1])
    np.testing.assert_array_equal(tokens.tokens, [97, 98, 259, 259, 99, 100, 101, 259])
    np.testing.assert_array_equal(tokens.record(2), [99, 100, 101])
    np.testing.assert_array_equal(tokens.lengths(), [2, 0, 3])
    np.testing.assert_array_equal(tokens.labels, [2, 0, 1])


def unpack(row):
    """{segment id: (tokens, positions)} of a packed row."""
    return {
        int(s): (row["tokens"][row["segment_ids"] == s], row["positions"][row["segment_ids"] == s])
        for s in np.unique(row["segment_ids"])
        if s
    }


def test_masked_lm_rows_pack_whole_records_as_segments_that_start_with_cls():
    texts = ["abc", "defgh", "ij", "klmnopqrstuvwxyz0123", "x"]
    rows = packing.packed_dataset(
        tokenize(texts), 10, BYTE.special_ids, classify=False, max_segments=0, shuffle_seed=None
    )
    seen = []
    for r in range(len(rows)):
        row = rows[r]
        assert set(row) == {"tokens", "segment_ids", "positions"}
        assert all(v.dtype == np.int32 and v.shape == (10,) for v in row.values())
        segments = unpack(row)
        assert list(segments) == list(range(1, len(segments) + 1))  # numbered 1, 2, 3... in order
        for ids, positions in segments.values():
            assert ids[0] == BYTE.special_ids["cls"]
            np.testing.assert_array_equal(positions, np.arange(len(ids)))
            seen.append(BYTE.decode(ids[1:]))
        pad = row["segment_ids"] == 0
        assert (row["tokens"][pad] == BYTE.special_ids["pad"]).all() and (row["positions"][pad] == 0).all()
    # Records stay whole unless longer than a row; the long one is cut into pieces of T-1 tokens after cls.
    assert seen == ["abc", "defgh", "ij", "klmnopqrs", "tuvwxyz01", "23", "x"]
    assert unpack(rows[0]).keys() == {1, 2}  # "abc" and "defgh" share the first row


def test_classification_rows_carry_one_label_per_segment():
    texts = ["aa", "bbb", "c", "dddd", "ee", "ffffffffffffffffffff"]
    labels = [0, 1, 2, 1, 0, 2]
    rows = packing.packed_dataset(
        tokenize(texts, labels), 8, BYTE.special_ids, classify=True, max_segments=2, shuffle_seed=None
    )
    found = []
    for r in range(len(rows)):
        row = rows[r]
        segments = unpack(row)
        assert len(segments) <= 2 and row["labels"].shape == (2,) and row["label_weights"].dtype == np.float32
        np.testing.assert_array_equal(row["label_weights"], np.arange(2) < len(segments))
        for k, (ids, _) in segments.items():
            found.append((BYTE.decode(ids[1:]), int(row["labels"][k - 1])))
    # Every record once, with its own label; the long one truncated to a row, never split.
    assert found == [("aa", 0), ("bbb", 1), ("c", 2), ("dddd", 1), ("ee", 0), ("fffffff", 2)]


def test_packing_is_a_fixed_function_of_the_seed():
    tokens = tokenize([f"record {i} " * (i % 5 + 1) for i in range(200)])
    make = lambda seed: packing.packed_dataset(
        tokens, 32, BYTE.special_ids, classify=False, max_segments=0, shuffle_seed=seed
    )
    a, b, c = make(3), make(3), make(4)
    np.testing.assert_array_equal(a[7]["tokens"], b[7]["tokens"])
    assert any((a[i]["tokens"] != c[i]["tokens"]).any() for i in range(5))


def test_shakespeare_genre_labels_comedies_and_tragedies_without_speaker_names():
    texts, labels = corpus.shakespeare_genre("train", 0.1)
    assert set(labels) == {0, 1} and len(texts) == len(labels) > 10_000
    assert "Now, fair Hippolyta, our nuptial hour" in texts[0] and labels[0] == 0  # A Midsummer Night's Dream
    assert not any(t.startswith("MACBETH:") for t in texts)
    eval_texts, _ = corpus.shakespeare_genre("eval", 0.1)
    assert 0.05 < len(eval_texts) / len(texts) < 0.2  # the last tenth of every play


def test_digits_are_uint8_images_with_a_fixed_split():
    train_images, train_labels = corpus.digits("train")
    eval_images, eval_labels = corpus.digits("eval")
    assert train_images.shape == (1500, 8, 8, 1) and eval_images.shape == (297, 8, 8, 1)
    assert train_images.dtype == np.uint8 and train_images.max() == 255
    assert set(train_labels) == set(range(10)) and train_labels.dtype == np.int32


def test_image_decode_resize_and_normalize():
    rgb = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    assert images.decode(rgb, 3) is rgb
    assert images.decode(rgb, 1).shape == (4, 6, 1)
    grey = images.decode(rgb[..., 0], 3)
    np.testing.assert_array_equal(grey[..., 1], rgb[..., 0])
    assert images.resize(rgb, 8).shape == (8, 8, 3)
    x = images.normalize(np.full((2, 2, 3), 255, np.uint8), mean=(0.5,), std=(0.25,))
    np.testing.assert_allclose(x, 2.0)
    with pytest.raises(DataError, match="cannot decode an encoded image of 6 bytes"):
        images.decode(b"notpng", 3)


def test_augmentation_is_a_function_of_seed_and_example_index(tiny_config):
    config = tiny_config(
        "",
        "--config.task.name=classification",
        "--config.data.source=digits",
        "--config.data.image_size=8",
        "--config.data.channels=1",
        "--config.data.crop_padding=2",
        "--config.data.random_flip=True",
    )
    augment = images.ImageExamples(config, train=True)
    record = {"image": corpus.digits("train")[0][5], "label": 3}
    a, b = augment(17, record), augment(17, record)
    np.testing.assert_array_equal(a["image"], b["image"])
    assert a["image"].shape == (8, 8, 1) and a["image"].dtype == np.float32 and a["labels"] == 3
    assert len({augment(i, record)["image"].tobytes() for i in range(20)}) > 5  # crops and flips differ
    plain = images.ImageExamples(config, train=False)(17, record)  # eval: no augmentation
    np.testing.assert_allclose(plain["image"], images.normalize(record["image"], (0.5,), (0.5,)))


@pytest.mark.parametrize(
    "task,overrides,keys",
    [
        ("causal_lm", [], {"inputs": np.int32, "targets": np.int32, "weights": np.float32}),
        ("masked_lm", [], {"tokens": np.int32, "segment_ids": np.int32, "positions": np.int32}),
        (
            "classification",
            ["--config.task.num_classes=3"],
            {
                "tokens": np.int32,
                "segment_ids": np.int32,
                "positions": np.int32,
                "labels": np.int32,
                "label_weights": np.float32,
            },
        ),
    ],
)
def test_synthetic_batches_have_every_layout(tiny_config, task, overrides, keys):
    config = tiny_config("", "--config.data.source=synthetic", *overrides)
    config.task.name = task
    batch = next(pipeline.train_batches(config))
    assert {k: v.dtype.type for k, v in batch.items()} == keys
    assert batch[next(iter(keys))].shape == (8, 32)
    if task != "causal_lm":
        cls = batch["tokens"][batch["positions"] == 0]
        assert (cls == BYTE.special_ids["cls"]).all()
        assert (batch["segment_ids"][:, 0] == 1).all()


def test_synthetic_images(tiny_config):
    config = tiny_config(
        "",
        "--config.data.source=synthetic",
        "--config.task.name=classification",
        "--config.task.num_classes=10",
        "--config.data.image_size=16",
    )
    config.model.family = "resnet"  # any image family: the layout follows it
    batch = next(pipeline.train_batches(config))
    assert batch["image"].shape == (8, 16, 16, 3) and batch["image"].dtype == np.float32
    assert batch["labels"].shape == (8,) and batch["labels"].max() < 10


def test_eval_split_is_padded_with_zero_weight_rows_not_repeated(tiny_config):
    config = tiny_config(
        "",
        "--config.task.name=classification",
        "--config.data.source=digits",
        "--config.data.image_size=8",
        "--config.data.channels=1",
        "--config.task.num_classes=10",
        "--config.eval_batches=100",
        "--config.batch_size=64",
    )
    evals = pipeline.eval_data(config)
    assert len(evals.batches) == 5  # 297 eval digits -> 5 batches of 64, the last holding 41
    weights = np.concatenate([b["label_weights"] for b in evals.batches])
    assert weights.sum() == 297 and (weights[297:] == 0).all()


def test_vocabulary_smaller_than_the_tokenizer_is_refused(tiny_config):
    config = tiny_config("", "--config.model.vocab_size=256")
    with pytest.raises(DataError, match="config.model.vocab_size=256; set --config.model.vocab_size=260"):
        pipeline.train_batches(config)
