"""Data: the bundled corpus, the byte tokenizer, packing, per-host slices, and resumable order."""

import numpy as np

from bigjax.data import corpus, pipeline, tokenizers


def test_corpus_has_all_plays_as_plain_text():
    plays = corpus.shakespeare_plays()
    assert len(plays) == 38
    macbeth = plays["tragedies/macbeth"]
    assert "MACBETH:\nSo foul and fair a day I have not seen." in macbeth
    assert "**" not in macbeth and "#" not in macbeth


def test_train_and_eval_splits_partition_every_play():
    train = corpus.shakespeare_split("train", 0.1)
    evals = corpus.shakespeare_split("eval", 0.1)
    total = sum(len(t) for t in corpus.shakespeare_plays().values())
    assert abs(len(train) + len(evals) - total) <= 2 * 38  # only the joining newlines differ
    assert 0.08 < len(evals) / total < 0.12
    assert "Thisbe" in evals  # the end of A Midsummer Night's Dream is held out


def test_byte_tokenizer_round_trips_unicode():
    tok = tokenizers.ByteTokenizer()
    text = "O Romeo—wherefore art thou?"
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and ids.max() < tok.vocab_size
    assert tok.decode(ids) == text


def test_windows_are_packed_with_shifted_targets():
    tokens = np.arange(100, dtype=np.int32)
    ds = pipeline.window_dataset(tokens, seq_len=10)
    assert len(ds) == 9
    ex = ds[3]
    np.testing.assert_array_equal(ex["inputs"], np.arange(30, 40))
    np.testing.assert_array_equal(ex["targets"], np.arange(31, 41))


def test_hosts_read_disjoint_slices_of_the_same_global_batch():
    examples = pipeline.window_dataset(np.arange(10_000, dtype=np.int32), 8).shuffle(seed=1).repeat()
    whole = pipeline.HostBatches(examples, global_batch=8, process_index=0, process_count=1)
    halves = [pipeline.HostBatches(examples, 8, p, 2) for p in range(2)]
    for step in range(3):
        glued = np.concatenate([h.batch_at(step)["inputs"] for h in halves])
        np.testing.assert_array_equal(glued, whole.batch_at(step)["inputs"])


def test_iterator_state_resumes_the_exact_sequence():
    examples = pipeline.window_dataset(np.arange(5_000, dtype=np.int32), 8).shuffle(seed=0).repeat()
    straight = pipeline.HostBatches(examples, 4, 0, 1)
    expected = [next(straight)["inputs"] for _ in range(6)]
    first = pipeline.HostBatches(examples, 4, 0, 1)
    [next(first) for _ in range(3)]
    resumed = pipeline.HostBatches(examples, 4, 0, 1)
    resumed.set_state(first.get_state())
    for want in expected[3:]:
        np.testing.assert_array_equal(next(resumed)["inputs"], want)


def test_epochs_are_reshuffled_and_cover_every_window():
    examples = pipeline.window_dataset(np.arange(401, dtype=np.int32), 4).shuffle(seed=0).repeat()
    first_epoch = [int(examples[i]["inputs"][0]) for i in range(100)]
    second_epoch = [int(examples[i]["inputs"][0]) for i in range(100, 200)]
    assert sorted(first_epoch) == sorted(second_epoch) == list(range(0, 400, 4))
    assert first_epoch != second_epoch


def test_synthetic_data_is_a_function_of_seed_and_index(tiny_config):
    config = tiny_config("", "--config.model.vocab_size=50304", "--config.data.source=synthetic")
    a = pipeline.synthetic_dataset(config, seed=0)
    b = pipeline.synthetic_dataset(config, seed=0)
    np.testing.assert_array_equal(a[123]["inputs"], b[123]["inputs"])
    assert a[123]["inputs"].max() < 50304
