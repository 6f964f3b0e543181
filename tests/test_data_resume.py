"""Bit-exact resume for every source: the hashes of all global batches of an uninterrupted run equal those of a
run stopped and resumed from its iterator state, whether it resumes with the same number of processes or not."""

import hashlib
import json

import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from bigjax.data import DataError, DeviceBatches, corpus, pipeline
from bigjax.parallel import mesh as mesh_lib

STEPS, STOP = 8, 3


def digest(batch: dict) -> str:
    h = hashlib.sha256()
    for key in sorted(batch):
        h.update(key.encode() + np.ascontiguousarray(batch[key]).tobytes())
    return h.hexdigest()


def make_sources(tmp_path) -> dict:
    """{name: (source, task, overrides)} over small local copies of the bundled data."""
    text = tmp_path / "text"
    text.mkdir()
    plays = corpus.shakespeare_plays()
    for name in ("tragedies/macbeth", "comedies/twelfth-night"):
        (text / f"{name.split('/')[1]}.txt").write_text(plays[name][:20_000])
    texts, labels = corpus.shakespeare_genre("eval", 0.1)
    jsonl = tmp_path / "genre.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in zip(texts, labels, strict=True)))
    # The same speeches as Parquet (labels as strings, in row groups of 50) and as a save_to_disk Dataset (Arrow).
    genre = pa.table({"speech": texts, "genre": [corpus.GENRE_NAMES[y] for y in labels]})
    pq.write_table(genre, tmp_path / "genre.parquet", row_group_size=50)
    (tmp_path / "saved").mkdir()
    with pa.OSFile(str(tmp_path / "saved" / "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, genre.schema) as writer:
            writer.write_table(genre, max_chunksize=50)
    (tmp_path / "saved" / "state.json").write_text(
        json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]})
    )
    columns = ["--config.data.text_field=speech", "--config.data.label_field=genre", "--config.task.num_classes=2"]
    images, digit_labels = corpus.digits("eval")
    for i in range(40):
        folder = tmp_path / "images" / str(digit_labels[i])
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i][..., 0]).save(folder / f"{i}.png")
    image = ["--config.data.image_size=8", "--config.data.crop_padding=1", "--config.data.random_flip=True"]
    classes = "--config.task.num_classes=10"
    return {
        "shakespeare": ("shakespeare", "causal_lm", []),
        "shakespeare_masked": ("shakespeare", "masked_lm", []),
        "shakespeare_genre": ("shakespeare_genre", "classification", ["--config.task.num_classes=2"]),
        "tfds": ("tfds:bigjax_shakespeare", "causal_lm", [f"--config.data.data_dir={tmp_path / 'tfds'}"]),
        "text_files": (f"text:{text}", "causal_lm", []),
        "jsonl": (f"jsonl:{jsonl}", "classification", ["--config.task.num_classes=2"]),
        "parquet": (f"parquet:{tmp_path / 'genre.parquet'}", "classification", columns),
        "parquet_lm": (f"parquet:{tmp_path / 'genre.parquet'}", "causal_lm", columns[:1]),
        "arrow": (f"arrow:{tmp_path / 'saved'}", "classification", columns),
        "imagefolder": (f"imagefolder:{tmp_path / 'images'}", "classification", [classes, *image]),
        "digits": ("digits", "classification", [classes, "--config.data.channels=1", *image]),
    }


@pytest.fixture(scope="module")
def all_sources(tmp_path_factory):
    return make_sources(tmp_path_factory.mktemp("sources"))


def config_of(tiny_config, spec):
    source, task, overrides = spec
    config = tiny_config("", f"--config.data.source={source}", *overrides)
    config.task.name = task
    return config


@pytest.mark.parametrize(
    "name",
    [
        "shakespeare",
        "shakespeare_masked",
        "shakespeare_genre",
        "tfds",
        "text_files",
        "jsonl",
        "parquet",
        "parquet_lm",
        "arrow",
        "imagefolder",
        "digits",
    ],
)
def test_stop_and_resume_gives_the_same_batches(tiny_config, all_sources, name):
    config = config_of(tiny_config, all_sources[name])
    straight = pipeline.train_batches(config)
    expected = [digest(next(straight)) for _ in range(STEPS)]
    assert len(set(expected)) == STEPS  # the batches differ: equal hashes below mean something

    first = pipeline.train_batches(config)
    seen = [digest(next(first)) for _ in range(STOP)]
    state = json.loads(json.dumps(first.get_state()))  # as the checkpoint stores it
    resumed = pipeline.train_batches(config)  # a new process: everything rebuilt from the config
    resumed.set_state(state)
    seen += [digest(next(resumed)) for _ in range(STEPS - STOP)]
    assert seen == expected

    # Resumed by two processes instead of one: each reads its half, and the halves make the same global batches.
    hosts = [pipeline.train_batches(config, process_index=p, process_count=2) for p in range(2)]
    for host in hosts:
        host.set_state(state)
    for step in range(STOP, STEPS):
        halves = [next(host) for host in hosts]
        assert all(len(h[next(iter(h))]) == config.batch_size // 2 for h in halves)
        glued = {key: np.concatenate([h[key] for h in halves]) for key in halves[0]}
        assert digest(glued) == expected[step]


def test_prefetching_to_the_devices_keeps_the_batches_and_checkpoints_the_last_one_used(tiny_config):
    config = tiny_config("")
    mesh = mesh_lib.make_mesh(config)
    straight = pipeline.train_batches(config)
    expected = [digest(next(straight)) for _ in range(STEPS)]

    for prefetch in (0, 1, 3):
        host = pipeline.train_batches(config)
        ahead = DeviceBatches(host, mesh, prefetch)
        seen = [digest(jax.device_get(next(ahead))) for _ in range(STOP)]
        assert host.step == STOP + prefetch  # the host iterator runs ahead ...
        state = json.loads(json.dumps(ahead.get_state()))
        assert state["step"] == STOP  # ... but the saved position is that of the last batch a step used

        resumed = DeviceBatches(pipeline.train_batches(config), mesh, prefetch)
        resumed.set_state(state)
        seen += [digest(jax.device_get(next(resumed))) for _ in range(STEPS - STOP)]
        assert seen == expected, f"prefetch={prefetch}"


def test_a_batch_that_does_not_split_over_the_processes_is_refused(tiny_config):
    config = tiny_config("")
    with pytest.raises(DataError, match="batch_size=8 does not divide across 3 processes"):
        pipeline.train_batches(config, process_index=0, process_count=3)


def test_resuming_on_changed_data_says_the_batches_will_differ(tiny_config, tmp_path, capsys):
    text = tmp_path / "corpus.txt"
    text.write_text(corpus.shakespeare_plays()["tragedies/macbeth"])
    config = tiny_config("", f"--config.data.source=text:{text}")
    batches = pipeline.train_batches(config)
    next(batches)
    state = batches.get_state()
    pipeline.train_batches(config).set_state(state)
    assert "resuming on other data" not in capsys.readouterr().out
    text.write_text(corpus.shakespeare_plays()["tragedies/hamlet"])
    pipeline.train_batches(config).set_state(state)
    assert "resuming on other data than the checkpoint's" in capsys.readouterr().out
    # A checkpoint made before any batch was read (`bigjax import`'s) names no data: nothing to differ from.
    pipeline.train_batches(config).set_state(pipeline.state_before_any_batch())
    assert "resuming on other data" not in capsys.readouterr().out
