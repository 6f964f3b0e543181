"""Sources, tokenizers and the tokenized cache, on small local files made by the tests and the bundled data:
plain text, JSONL, Parquet and datasets' save_to_disk directories (written with pyarrow), image folders, TFDS (a
local dataset built from the bundled corpus, read through tfds.data_source; and the TFRecord path through
TensorFlow), SentencePiece and Hugging Face tokenizers, and every bad input with its one clear error."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from bigjax.data import (
    DataError,
    corpus,
    parquet_source,
    pipeline,
    prepare,
    sources,
    tfds_builders,
    tfds_source,
    tokenized,
    tokenizers,
)

PARAGRAPHS = [f"Paragraph {i}: " + "the quick brown fox jumps over the lazy dog. " * (1 + i % 4) for i in range(60)]


@pytest.fixture
def text_dir(tmp_path):
    folder = tmp_path / "text"
    folder.mkdir()
    for f in range(3):
        (folder / f"part{f}.txt").write_text("\n\n".join(PARAGRAPHS[f * 20 : (f + 1) * 20]) + "\n")
    return folder


@pytest.fixture
def play_file(tmp_path):
    path = tmp_path / "macbeth.txt"
    path.write_text(corpus.shakespeare_plays()["tragedies/macbeth"])
    return path


@pytest.fixture
def jsonl_file(tmp_path):
    path = tmp_path / "reviews.jsonl"
    rows = [{"body": p, "sentiment": ["neg", "pos", "mixed"][i % 3], "id": i} for i, p in enumerate(PARAGRAPHS)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture
def image_dir(tmp_path):
    """Three classes of 10 digit images each, as PNG files of varying size."""
    root = tmp_path / "images"
    images, labels = corpus.digits("train")
    for name, digit in (("one", 1), ("seven", 7), ("zero", 0)):
        folder = root / name
        folder.mkdir(parents=True)
        for k, i in enumerate(np.flatnonzero(labels == digit)[:10]):
            Image.fromarray(images[i][..., 0]).resize((8 + k, 8 + k)).save(folder / f"{k:02d}.png")
    return root


@pytest.fixture
def parquet_dir(tmp_path):
    """The paragraphs as two Parquet files of 40 and 20 rows, in row groups of 16 rows, with string labels."""
    folder = tmp_path / "parquet"
    folder.mkdir()
    labels = [["neg", "pos", "mixed"][i % 3] for i in range(len(PARAGRAPHS))]
    for name, rows in (("part-0.parquet", slice(0, 40)), ("part-1.parquet", slice(40, 60))):
        table = pa.table({"id": list(range(60))[rows], "body": PARAGRAPHS[rows], "sentiment": labels[rows]})
        pq.write_table(table, folder / name, row_group_size=16)
    (folder / "README.md").write_text("not data")  # a directory source reads only the .parquet files
    return folder


def write_saved_dataset(folder, columns: dict, files: int = 2, class_names=None):
    """What datasets' `Dataset.save_to_disk(folder)` writes, made with pyarrow alone: Arrow IPC stream files
    data-0000i-of-0000N.arrow (schema metadata as datasets writes it), dataset_info.json and state.json."""
    folder.mkdir(parents=True)
    features = {name: {"dtype": "string", "_type": "Value"} for name in columns}
    if class_names:
        features["label"] = {"names": class_names, "_type": "ClassLabel"}
    metadata = {"huggingface": json.dumps({"info": {"features": features}})}
    table = pa.table(columns).replace_schema_metadata(metadata)
    rows = len(next(iter(columns.values())))
    names = []
    for i in range(files):
        names.append(f"data-{i:05d}-of-{files:05d}.arrow")
        part = table.slice(i * rows // files, (i + 1) * rows // files - i * rows // files)
        with pa.OSFile(str(folder / names[-1]), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            for batch in part.to_batches(max_chunksize=7):
                writer.write_batch(batch)
    (folder / "dataset_info.json").write_text(json.dumps({"features": features}))
    state = {"_data_files": [{"filename": n} for n in names], "_fingerprint": "0", "_split": None}
    (folder / "state.json").write_text(json.dumps(state))
    return folder


def write_dataset_dict(root, splits: dict, class_names=None):
    """What `DatasetDict.save_to_disk(root)` writes: dataset_dict.json and one saved Dataset per split."""
    for name, columns in splits.items():
        write_saved_dataset(root / name, columns, class_names=class_names)
    (root / "dataset_dict.json").write_text(json.dumps({"splits": list(splits)}))
    return root


def config_for(tiny_config, source, *overrides, task="causal_lm"):
    config = tiny_config("", f"--config.data.source={source}", *overrides)
    config.task.name = task
    return config


# --------------------------------------------------------------------------------------------------
# Local files


@pytest.mark.parametrize("form", ["file", "directory", "glob"])
def test_text_files_by_file_directory_or_glob(tiny_config, text_dir, form):
    pattern = {"file": text_dir / "part0.txt", "directory": text_dir, "glob": text_dir / "part[01].txt"}[form]
    config = config_for(tiny_config, f"text:{pattern}")
    train, evals = sources.open_split(config, "train"), sources.open_split(config, "eval")
    assert len(train.records) == {"file": 1, "directory": 3, "glob": 2}[form]  # one record per file
    whole = (text_dir / "part0.txt").read_text()
    assert train.records[0]["text"] + evals.records[0]["text"] == whole  # the last tenth of each file is eval
    assert 0.05 < len(evals.records[0]["text"]) / len(whole) < 0.2
    batch = next(pipeline.train_batches(config))
    assert batch["inputs"].shape == (8, 32) and batch["inputs"].max() <= 259


def test_text_files_give_paragraphs_to_packed_layouts(tiny_config, text_dir):
    config = config_for(tiny_config, f"text:{text_dir}", task="masked_lm")
    records = sources.open_split(config, "train").records
    assert records[0]["text"] == PARAGRAPHS[0] and len(records) > 50
    config.data.text_records = "line"
    assert len(sources.open_split(config, "train").records) == len(records)  # one paragraph per line here


def test_jsonl_with_a_chosen_text_field_and_string_labels(tiny_config, jsonl_file):
    config = config_for(
        tiny_config,
        f"jsonl:{jsonl_file}",
        "--config.data.text_field=body",
        "--config.data.label_field=sentiment",
        "--config.task.num_classes=3",
        task="classification",
    )
    train = sources.open_split(config, "train")
    assert train.num_classes == 3 and len(train.records) == 54  # the last tenth of the records is eval
    assert train.records[1] == {"text": PARAGRAPHS[1], "label": 2}  # sorted names: mixed, neg, pos
    batch = next(pipeline.train_batches(config))
    assert batch["labels"].shape == (8, 8) and set(batch["labels"][batch["label_weights"] > 0]) <= {0, 1, 2}


def test_image_folder_labels_classes_by_sorted_name(tiny_config, image_dir):
    config = config_for(
        tiny_config,
        f"imagefolder:{image_dir}",
        "--config.data.image_size=8",
        "--config.data.channels=1",
        "--config.task.num_classes=3",
        task="classification",
    )
    train, evals = sources.open_split(config, "train"), sources.open_split(config, "eval")
    assert len(train.records) == 27 and len(evals.records) == 3 and train.num_classes == 3
    assert train.records[0]["image"].endswith("one/00.png") and train.records[0]["label"] == 0
    batch = next(pipeline.train_batches(config))
    assert batch["image"].shape == (8, 8, 8, 1) and batch["image"].dtype == np.float32
    assert set(batch["labels"]) <= {0, 1, 2}


def test_image_folder_with_train_and_val_subfolders(tiny_config, image_dir, tmp_path):
    root = tmp_path / "split"
    (root / "train").mkdir(parents=True)
    image_dir.rename(root / "train" / "classes")
    (root / "train" / "classes").rename(root / "train_tmp")
    (root / "train").rmdir()
    (root / "train_tmp").rename(root / "train")
    (root / "val" / "one").mkdir(parents=True)
    (root / "train" / "one" / "09.png").rename(root / "val" / "one" / "09.png")
    config = config_for(tiny_config, f"imagefolder:{root}", "--config.data.image_size=8", task="classification")
    assert len(sources.open_split(config, "train").records) == 29
    assert [r["label"] for r in sources.open_split(config, "eval").records] == [0]


# --------------------------------------------------------------------------------------------------
# Parquet and datasets' save_to_disk (Arrow)


@pytest.mark.parametrize("form", ["file", "directory", "glob"])
def test_parquet_by_file_directory_or_glob_with_chosen_columns(tiny_config, parquet_dir, form, monkeypatch):
    pattern = {"file": parquet_dir / "part-0.parquet", "directory": parquet_dir, "glob": parquet_dir / "part-*"}[form]
    rows = 40 if form == "file" else 60
    overrides = ["--config.data.text_field=body", "--config.data.label_field=sentiment", "--config.task.num_classes=3"]
    config = config_for(tiny_config, f"parquet:{pattern}", *overrides, task="classification")
    config.data.text_records = "document"
    train, evals = sources.open_split(config, "train"), sources.open_split(config, "eval")
    reads = []
    read_row_group = parquet_source._read_row_group
    monkeypatch.setattr(parquet_source, "_read_row_group", lambda *a: reads.append(a) or read_row_group(*a))
    cut = int(rows * 0.9)  # the last tenth of the rows is eval
    assert len(train.records) == cut and len(evals.records) == rows - cut
    assert train.num_classes == 3
    names = sorted({"neg", "pos", "mixed"})
    expected = [{"text": PARAGRAPHS[i], "label": names.index(["neg", "pos", "mixed"][i % 3])} for i in range(rows)]
    assert list(train.records) + list(evals.records) == expected
    # Reading the records in order reads each row group of the text column once per split (row groups of 16 rows:
    # 3 in the first file, 2 in the second), and the one the train/eval cut falls in once for each split.
    text_reads = [r for r in reads if r[2] == "body"]
    groups = 3 if form == "file" else 5
    assert len(set(text_reads)) == groups and len(text_reads) == groups + 1
    batch = next(pipeline.train_batches(config))
    assert batch["labels"].shape == (8, 8) and set(batch["labels"][batch["label_weights"] > 0]) <= {0, 1, 2}


def test_parquet_for_causal_lm_and_its_cache(tiny_config, parquet_dir, tmp_path, monkeypatch):
    overrides = ["--config.data.text_field=body", f"--config.data.cache_dir={tmp_path / 'cache'}"]
    config = config_for(tiny_config, f"parquet:{parquet_dir}", *overrides)
    in_memory = next(pipeline.train_batches(config))["inputs"]
    assert in_memory.shape == (8, 32)
    text = bytes(np.concatenate([r[r < 256] for r in in_memory]).astype(np.uint8)).decode("utf-8", "replace")
    assert "the quick brown fox" in text
    assert "train: tokenized 54 records" in prepare.prepare(config)[0]
    # Another eval_fraction cuts the rows elsewhere: the old cut's cache, whose train part now holds evaluation
    # rows, is not read; the train split is tokenized anew from the new cut.
    recut = config_for(tiny_config, f"parquet:{parquet_dir}", *overrides, "--config.data.eval_fraction=0.5")
    assert len(tokenized.load_or_tokenize(recut, sources.open_split(recut, "train"), tokenizers.ByteTokenizer())) == 30

    def fail(*args, **kwargs):
        raise AssertionError("the Parquet files were read again")

    monkeypatch.setattr(parquet_source, "parquet_chunks", fail)
    np.testing.assert_array_equal(next(pipeline.train_batches(config))["inputs"], in_memory)
    # Another text column is other data: another cache key.
    other = config_for(tiny_config, f"parquet:{parquet_dir}", "--config.data.text_field=sentiment")
    assert sources.open_split(other, "train").fingerprint != sources.open_split(config, "train").fingerprint


def test_arrow_save_to_disk_dataset(tiny_config, tmp_path):
    labels = [i % 2 for i in range(60)]
    folder = write_saved_dataset(tmp_path / "saved", {"text": PARAGRAPHS, "label": labels}, class_names=["a", "b", "c"])
    config = config_for(tiny_config, f"arrow:{folder}", "--config.task.num_classes=3", task="classification")
    config.data.text_records = "document"
    train, evals = sources.open_split(config, "train"), sources.open_split(config, "eval")
    assert "2 Arrow file(s)" in train.description
    assert [r["text"] for r in train.records] == PARAGRAPHS[:54]
    assert [r["label"] for r in evals.records] == labels[54:]
    assert train.num_classes == 3  # the ClassLabel's names, though label 2 never occurs
    recut = config_for(tiny_config, f"arrow:{folder}", "--config.data.eval_fraction=0.5", task="classification")
    recut.data.text_records = "document"
    assert sources.open_split(recut, "train").fingerprint != train.fingerprint  # the key of its tokenized cache
    assert next(pipeline.train_batches(config))["labels"].shape == (8, 8)
    # The rows come in the order state.json lists the files, not in the order of their names.
    state = json.loads((folder / "state.json").read_text())
    state["_data_files"].reverse()
    (folder / "state.json").write_text(json.dumps(state))
    assert sources.open_split(config, "train").records[0]["text"] == PARAGRAPHS[30]
    with pytest.raises(DataError, match=r"saved is a directory written by datasets' save_to_disk .*arrow:"):
        sources.open_split(config_for(tiny_config, f"parquet:{folder}"), "train")


def test_arrow_dataset_dict_maps_train_and_eval_splits(tiny_config, tmp_path):
    def columns(lo, hi):
        return {"text": PARAGRAPHS[lo:hi], "label": [["x", "y", "z"][i % 3] for i in range(lo, hi)]}

    root = write_dataset_dict(tmp_path / "dict", {"train": columns(0, 40), "test": columns(40, 50)})
    config = config_for(tiny_config, f"arrow:{root}", "--config.task.num_classes=3", task="classification")
    config.data.text_records = "document"
    train, evals = sources.open_split(config, "train"), sources.open_split(config, "eval")
    assert [r["text"] for r in train.records] == PARAGRAPHS[:40]  # the whole train split
    assert [r["text"] for r in evals.records] == PARAGRAPHS[40:50]  # "" = its test split
    assert evals.where.startswith("the eval split (test) of arrow:")
    assert [r["label"] for r in evals.records] == [i % 3 for i in range(40, 50)]

    # Only string labels of another split: numbered over both, so "y" is 1 in either.
    only = write_dataset_dict(
        tmp_path / "other", {"train": {"text": ["a", "b"], "label": ["y", "y"]}, "test": columns(0, 3)}
    )
    config.data.source = f"arrow:{only}"
    assert [r["label"] for r in sources.open_split(config, "train").records] == [1, 1]

    config.data.source = f"arrow:{root}"
    config.data.eval_split = "train"
    assert len(sources.open_split(config, "eval").records) == 40
    config.data.eval_split = "validation"
    with pytest.raises(DataError, match=r"config.data.eval_split='validation': .* has the splits train, test"):
        sources.open_split(config, "eval")

    no_eval = write_dataset_dict(tmp_path / "train_only", {"train": columns(0, 40)})
    config = config_for(tiny_config, f"arrow:{no_eval}", "--config.task.num_classes=3", task="classification")
    config.data.text_records = "document"
    train, evals = sources.open_split(config, "train"), sources.open_split(config, "eval")
    assert [r["text"] for r in train.records] + [r["text"] for r in evals.records] == PARAGRAPHS[:40]
    assert len(evals.records) == 4 and train.fingerprint != evals.fingerprint


def test_bad_parquet_and_arrow_input(tiny_config, parquet_dir, tmp_path):
    def records(source, *overrides):
        return sources.open_split(config_for(tiny_config, source, *overrides), "train").records

    with pytest.raises(DataError, match=r"part-0.parquet has no column 'text' .*its columns are id, body, sentiment"):
        records(f"parquet:{parquet_dir}")
    with pytest.raises(DataError, match=r"the column 'id' .* holds int64, not text"):
        records(f"parquet:{parquet_dir}", "--config.data.text_field=id")
    with pytest.raises(DataError, match=f"Parquet source {tmp_path}/nope: no such file or directory"):
        records(f"parquet:{tmp_path}/nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no parquet here")
    with pytest.raises(DataError, match=f"Parquet source {tmp_path}/empty: no files found"):
        records(f"parquet:{tmp_path}/empty")
    with pytest.raises(DataError, match=r"notes.txt is not a Parquet file .*leave it out of"):
        records(f"parquet:{tmp_path}/empty/notes.txt")
    with pytest.raises(DataError, match=r"notes.txt is not an Arrow IPC file"):
        records(f"arrow:{tmp_path}/empty/notes.txt")
    with pytest.raises(DataError, match=r"no .arrow files found"):
        records(f"arrow:{tmp_path}/empty")

    floats = tmp_path / "floats.parquet"
    pq.write_table(pa.table({"text": ["a", "b"], "label": [0.0, 1.5]}), floats)
    with pytest.raises(DataError, match=r"the column 'label' .* holds double values, not class labels"):
        records(f"parquet:{floats}")
    nulls = tmp_path / "nulls.parquet"
    pq.write_table(pa.table({"text": ["a", "b", "c"], "label": [0, None, 1]}), nulls)
    with pytest.raises(DataError, match=r"nulls.parquet: 1 row\(s\) have no label"):
        records(f"parquet:{nulls}")
    negative = tmp_path / "negative.parquet"
    pq.write_table(pa.table({"text": ["a", "b"], "label": [0, -1]}), negative)
    with pytest.raises(DataError, match=r"negative label -1"):
        records(f"parquet:{negative}")
    no_text = tmp_path / "no_text.parquet"
    pq.write_table(pa.table({"text": ["a", None, "c"] * 4}), no_text)
    with pytest.raises(DataError, match=r"no_text.parquet: row 1 .* has no text \(null in column 'text'\)"):
        list(records(f"parquet:{no_text}", "--config.data.text_records=document"))


# --------------------------------------------------------------------------------------------------
# Tokenizers


@pytest.mark.parametrize("suffix", [".model", ".json"])
def test_trained_tokenizers_round_trip_and_have_the_special_tokens(tiny_config, play_file, tmp_path, suffix):
    config = config_for(tiny_config, f"text:{play_file}")
    out = tmp_path / f"tok{suffix}"
    prepare.train_tokenizer(config, 512, str(out))
    tok = tokenizers.make_tokenizer(str(out))
    assert tok.vocab_size == 512 and set(tok.special_ids) >= {"pad", "cls", "mask", "eos"}
    assert len(set(tok.special_ids.values())) == 4 and max(tok.special_ids.values()) < 512
    text = "Fair is foul, and foul is fair: über alles"
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and ids.max() < tok.vocab_size
    assert len(ids) < len(text.encode())  # it learned merges
    assert tok.decode(ids) == text
    assert not set(ids) & set(tok.special_ids.values())
    # The same file named with its kind, and training with it end to end.
    kind = "sentencepiece" if suffix == ".model" else "hf"
    assert tokenizers.make_tokenizer(f"{kind}:{out}").encode(text).tolist() == ids.tolist()
    overrides = [f"--config.data.tokenizer={out}", "--config.model.vocab_size=512"]
    config = config_for(tiny_config, f"text:{play_file}", *overrides, task="masked_lm")
    batch = next(pipeline.train_batches(config))
    starts = (batch["positions"] == 0) & (batch["segment_ids"] > 0)
    assert (batch["tokens"][starts] == tok.special_ids["cls"]).all()


def test_a_vocabulary_without_special_tokens_gets_them_appended(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    hf = Tokenizer(models.WordLevel({"hello": 0, "world": 1, "[UNK]": 2}, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.save(str(tmp_path / "words.json"))
    tok = tokenizers.make_tokenizer(f"hf:{tmp_path / 'words.json'}")
    assert tok.special_ids == {"pad": 3, "cls": 4, "mask": 5, "eos": 6} and tok.vocab_size == 7
    assert tok.encode("hello world").tolist() == [0, 1]


def test_a_tokenizer_larger_than_the_model_is_refused(tiny_config, play_file, tmp_path):
    config = config_for(tiny_config, f"text:{play_file}")
    prepare.train_tokenizer(config, 400, str(tmp_path / "tok.json"))
    config = config_for(tiny_config, f"text:{play_file}", f"--config.data.tokenizer={tmp_path / 'tok.json'}")
    with pytest.raises(DataError, match=r"has 400 ids .* set --config.model.vocab_size=400"):
        pipeline.train_batches(config)


# --------------------------------------------------------------------------------------------------
# TFDS


def test_tfds_dataset_by_name_through_tfds_data_source(tiny_config, tmp_path):
    config = config_for(tiny_config, "tfds:bigjax_shakespeare", f"--config.data.data_dir={tmp_path}")
    train = sources.open_split(config, "train")  # prepares it (ArrayRecord) on first use
    assert "ArrayRecord, random access through tfds.data_source" in train.description
    assert (tmp_path / "bigjax_shakespeare" / "1.0.0").is_dir()
    bundled = corpus.shakespeare_documents("train", 0.1)
    assert sorted(r["text"] for r in train.records) == sorted(bundled.values())
    assert train.num_classes == 6  # the genre folders
    assert sources.open_split(config, "eval").description.endswith(
        "split 'validation' (ArrayRecord, random access through tfds.data_source and Grain)"
    )
    config.data.train_split = "train[:50%]"
    assert len(sources.open_split(config, "train").records) == 19
    batch = next(pipeline.train_batches(config))
    assert batch["inputs"].shape == (8, 32)


def test_tfds_image_dataset(tiny_config, tmp_path):
    config = config_for(
        tiny_config,
        "tfds:bigjax_digits",
        f"--config.data.data_dir={tmp_path}",
        "--config.data.image_size=8",
        "--config.data.channels=1",
        "--config.task.num_classes=10",
        task="classification",
    )
    evals = pipeline.eval_data(config)
    images, labels = corpus.digits("eval")
    assert sum(float(b["label_weights"].sum()) for b in evals.batches) == 16  # 2 eval batches of 8
    got = np.concatenate([b["labels"] for b in evals.batches])
    assert sorted(got) != [] and set(got) <= set(range(10))


def test_tfrecord_datasets_are_read_through_tensorflow(tiny_config, tmp_path):
    import tensorflow_datasets as tfds

    tfds.builder("bigjax_shakespeare", data_dir=str(tmp_path), file_format="tfrecord").download_and_prepare()
    config = config_for(tiny_config, "tfds:bigjax_shakespeare", f"--config.data.data_dir={tmp_path}")
    split = sources.open_split(config, "eval")
    assert "TFRecord through TensorFlow" in split.description
    assert sorted(r["text"] for r in split.records) == sorted(corpus.shakespeare_documents("eval", 0.1).values())


def test_tfrecord_without_tensorflow_says_what_to_install(tiny_config, tmp_path, monkeypatch):
    import tensorflow_datasets as tfds

    tfds.builder("bigjax_shakespeare", data_dir=str(tmp_path), file_format="tfrecord").download_and_prepare()
    monkeypatch.setattr(tfds_source, "tensorflow_available", lambda: False)
    config = config_for(tiny_config, "tfds:bigjax_shakespeare", f"--config.data.data_dir={tmp_path}")
    with pytest.raises(DataError, match=r"prepared as TFRecord .* pip install 'bigjax\[tf\]', or convert it"):
        sources.open_split(config, "train")


def test_tfds_bad_names_splits_and_unreachable_downloads(tiny_config, tmp_path, monkeypatch):
    config = config_for(tiny_config, "tfds:no_such_dataset", f"--config.data.data_dir={tmp_path}")
    with pytest.raises(DataError, match="tfds:no_such_dataset: Dataset no_such_dataset not found"):
        sources.open_split(config, "train")

    config = config_for(tiny_config, "tfds:bigjax_shakespeare", f"--config.data.data_dir={tmp_path}")
    config.data.train_split = "trian[:10%]"
    with pytest.raises(DataError, match=r"cannot read the split 'trian\[:10%\]'.*Its splits: train, validation"):
        sources.open_split(config, "train").records  # noqa: B018

    def no_network(self, dl_manager):
        raise ConnectionError("Failed to resolve 'data.example.org'")

    monkeypatch.setattr(tfds_builders.BigjaxShakespeare, "_split_generators", no_network)
    config.data.data_dir = str(tmp_path / "elsewhere")
    config.data.train_split = "train"
    with pytest.raises(DataError, match=r"not prepared in .* preparing it failed: Failed to resolve .*`tfds build"):
        sources.open_split(config, "train")


# --------------------------------------------------------------------------------------------------
# The tokenized cache


def test_prepared_cache_is_read_instead_of_the_text(tiny_config, jsonl_file, tmp_path, monkeypatch):
    overrides = [f"--config.data.cache_dir={tmp_path / 'cache'}", "--config.data.text_field=body"]
    config = config_for(tiny_config, f"jsonl:{jsonl_file}", *overrides)
    in_memory = [next(pipeline.train_batches(config))["inputs"] for _ in range(1)][0]
    lines = prepare.prepare(config)
    assert len(lines) == 2 and "train: tokenized 54 records" in lines[0]
    cached = tokenized.load(
        tokenized.cache_path(config, sources.open_split(config, "train"), tokenizers.ByteTokenizer())
    )
    assert cached.tokens.dtype == np.uint16 and isinstance(cached.tokens, np.memmap)

    def fail(*args, **kwargs):
        raise AssertionError("the text was read again")

    monkeypatch.setattr(sources, "_read_jsonl", fail)
    monkeypatch.setattr(tokenized, "tokenize", fail)
    np.testing.assert_array_equal(next(pipeline.train_batches(config))["inputs"], in_memory)
    assert pipeline.eval_data(config).stats["bytes_per_token"] == pytest.approx(1.0, abs=0.05)


def test_cache_key_follows_the_tokenizer_and_the_files(tiny_config, jsonl_file, tmp_path):
    config = config_for(
        tiny_config, f"jsonl:{jsonl_file}", f"--config.data.cache_dir={tmp_path}", "--config.data.text_field=body"
    )
    split = sources.open_split(config, "train")
    byte_path = tokenized.cache_path(config, split, tokenizers.ByteTokenizer())
    jsonl_file.write_text(jsonl_file.read_text() + json.dumps({"body": "one more"}) + "\n")
    assert tokenized.cache_path(config, sources.open_split(config, "train"), tokenizers.ByteTokenizer()) != byte_path


# --------------------------------------------------------------------------------------------------
# Bad input: one clear error each


def test_missing_paths_name_the_path(tiny_config, tmp_path):
    for source in (f"text:{tmp_path}/nope.txt", f"jsonl:{tmp_path}/nope.jsonl", f"imagefolder:{tmp_path}/nope"):
        with pytest.raises(DataError, match=f"{tmp_path}/nope.*no such file or directory"):
            sources.open_split(config_for(tiny_config, source), "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no files found"):
        sources.open_split(config_for(tiny_config, f"text:{tmp_path}/empty"), "train")
    with pytest.raises(DataError, match="has no class subdirectories"):
        sources.open_split(config_for(tiny_config, f"imagefolder:{tmp_path}/empty"), "train")
    with pytest.raises(DataError, match="tokenizer file .*missing.model .*not found"):
        tokenizers.make_tokenizer(str(tmp_path / "missing.model"))


def test_unknown_sources_splits_and_tokenizers(tiny_config):
    with pytest.raises(DataError, match="config.data.source='wikipedia' is not a source"):
        sources.parse_source("wikipedia")
    with pytest.raises(DataError, match="config.data.train_split='validation': .* has the splits train and eval"):
        sources.open_split(config_for(tiny_config, "shakespeare", "--config.data.train_split=validation"), "train")
    with pytest.raises(DataError, match="config.data.tokenizer='gpt2' is not a tokenizer"):
        tokenizers.make_tokenizer("gpt2")


def test_empty_split(tiny_config, tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    config = config_for(tiny_config, f"jsonl:{tmp_path / 'empty.jsonl'}")
    with pytest.raises(DataError, match=r"the train split \(train\) of jsonl:.*empty.jsonl is empty"):
        pipeline.train_batches(config)


def test_jsonl_field_that_does_not_exist(tiny_config, jsonl_file):
    config = config_for(tiny_config, f"jsonl:{jsonl_file}")  # text_field defaults to "text"
    with pytest.raises(DataError, match=r"reviews.jsonl:1 has no field 'text' .*its fields are body, id, sentiment"):
        pipeline.train_batches(config)


def test_bad_jsonl_lines_are_skipped_only_when_asked(tiny_config, jsonl_file, capsys):
    jsonl_file.write_text(jsonl_file.read_text() + "{not json\n" + json.dumps({"other": 1}) + "\n")
    config = config_for(tiny_config, f"jsonl:{jsonl_file}", "--config.data.text_field=body")
    with pytest.raises(DataError, match=r"reviews.jsonl:61 is not valid JSON"):
        pipeline.train_batches(config)
    config.data.skip_bad = True
    next(pipeline.train_batches(config))
    assert "skipped 2 bad JSONL line(s)" in capsys.readouterr().out


def test_an_image_that_does_not_decode(tiny_config, image_dir, capsys):
    (image_dir / "zero" / "00.png").write_bytes(b"this is not a png")
    config = config_for(
        tiny_config,
        f"imagefolder:{image_dir}",
        "--config.data.image_size=8",
        "--config.task.num_classes=3",
        "--config.batch_size=32",
        task="classification",
    )
    config.data.train_split = "train"
    batches = pipeline.train_batches(config)
    with pytest.raises(DataError, match=r"cannot decode .*zero/00.png .*skip_bad=True"):
        next(batches)
    config.data.skip_bad = True
    batch = next(pipeline.train_batches(config))
    # 32 draws from 27 train images: the whole first epoch (the broken image once) and 5 of the second.
    assert 1 <= (batch["label_weights"] == 0).sum() <= 2
    assert "zero/00.png; it gets weight 0" in capsys.readouterr().out


def test_classification_needs_labels_and_enough_classes(tiny_config, text_dir):
    with pytest.raises(DataError, match="has no labels"):
        pipeline.train_batches(config_for(tiny_config, f"text:{text_dir}", task="classification"))
    config = config_for(tiny_config, "shakespeare_genre", "--config.task.num_classes=1", task="classification")
    with pytest.raises(DataError, match="has 2 classes but config.task.num_classes=1"):
        pipeline.train_batches(config)


def test_fewer_classes_than_the_head_has_are_a_warning(tiny_config, image_dir, capsys):
    import shutil

    for name in ("seven", "zero"):
        shutil.rmtree(image_dir / name)
    overrides = ["--config.data.image_size=8", "--config.data.channels=1", "--config.task.num_classes=10"]
    config = config_for(tiny_config, f"imagefolder:{image_dir}", *overrides, task="classification")
    pipeline.train_batches(config)
    out = capsys.readouterr().out
    assert out.count("warning:") == 1
    assert f"warning: imagefolder:{image_dir} has 1 class but config.task.num_classes=10" in out
    assert "one subfolder per class" in out


def test_the_throughput_measure_reads_whole_batches_of_a_pipeline(tmp_path):
    from bigjax.data import throughput

    config = throughput.bench_config(str(tmp_path / "cache"), str(tmp_path / "tfds"), source="synthetic", seq_len=128)
    setup, examples_per_second, tokens_per_example = throughput.measure(config, seconds=0.05)
    assert setup > 0 and examples_per_second > 0 and tokens_per_example == 128
