"""`make bench-data`: how fast each input pipeline delivers batches on this host's CPU (one process, one thread).

    python -m bigjax.data.throughput [--seconds 3]

Prints tokens/s (text) or images/s (images) per pipeline, measured over whole batches after a warm-up batch, with
the setup time (reading, tokenizing or loading a cache, packing) shown apart. The same paragraphs as JSONL, Parquet
and Arrow compare the local file sources: their batches come from the same tokens, so the setup column is where
the format shows. The pre-tokenized LM path is what
a large run reads; it must outpace the accelerator: GPT-2 124M trains at ~0.6 M tokens/s on one H100, so 3 M
tokens/s per host is the bar (5x).
"""

from __future__ import annotations

import argparse
import pathlib
import tempfile
import time

import numpy as np

from bigjax import config as config_lib
from bigjax.data import corpus, pipeline, prepare, sources, tokenized, tokenizers

LM_BAR = 3e6  # tokens/s per host: 5x GPT-2 124M training on one H100


def bench_config(cache_dir: str, data_dir: str, **data) -> object:
    config = config_lib.defaults()
    config.batch_size = data.pop("batch_size", 64)
    config.task.name = data.pop("task", "causal_lm")
    config.task.num_classes = data.pop("num_classes", 0)
    config.model.vocab_size = 260
    config.model.max_len = 2048
    config.data.update(dict(cache_dir=cache_dir, data_dir=data_dir, **data))
    return config


def measure(config, seconds: float) -> tuple[float, float, float]:
    """(setup seconds, examples per second, tokens per example) reading train batches from `config`."""
    started = time.perf_counter()
    batches = pipeline.train_batches(config)
    first = next(batches)
    setup = time.perf_counter() - started
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        next(batches)
        count += config.batch_size
    rate = count / (time.perf_counter() - started)
    tokens = first["inputs"].shape[1] if "inputs" in first else first.get("tokens", np.zeros((1, 0))).shape[1]
    return setup, rate, tokens


def measure_reading(config, repeats: int = 3) -> float:
    """Tokens per second of opening the train split, reading its records and tokenizing them (best of `repeats`):
    the part of a run's setup that depends on the source's format."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        split = sources.open_split(config, "train")
        tokens = tokenized.tokenize(split.records, tokenizers.make_tokenizer(config.data.tokenizer))
        best = min(best, time.perf_counter() - started)
    return len(tokens.tokens) / best


def write_image_folder(root: pathlib.Path, size: int = 32) -> None:
    """The digits' train split as PNG files of size x size in one folder per class."""
    from PIL import Image

    images, labels = corpus.digits("train")
    for i, (image, label) in enumerate(zip(images[:512], labels[:512], strict=True)):
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[..., 0]).resize((size, size)).save(folder / f"{i}.png")


def write_text_files(root: pathlib.Path) -> dict[str, str]:
    """The bundled plays' paragraphs, one row each, as the same records in JSONL, Parquet and a save_to_disk-style
    Arrow file: {format: source spec}, so the local sources are compared on equal text."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [p for text in corpus.shakespeare_plays().values() for p in text.split("\n\n") if p.strip()]
    root.mkdir(parents=True)
    (root / "plays.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    table = pa.table({"text": rows})
    pq.write_table(table, root / "plays.parquet")
    with pa.OSFile(str(root / "data-00000-of-00001.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return {
        "jsonl": f"jsonl:{root / 'plays.jsonl'}",
        "parquet": f"parquet:{root / 'plays.parquet'}",
        "arrow": f"arrow:{root / 'data-00000-of-00001.arrow'}",
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="measure each pipeline this long")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        cache, tfds_dir = str(root / "cache"), str(root / "tfds")
        write_image_folder(root / "images")
        files = write_text_files(root / "files")
        lm = dict(seq_len=1024, batch_size=64)
        cached = bench_config(cache, tfds_dir, **lm)
        prepare.prepare(cached)  # the pre-tokenized cache of the bundled corpus (uint16 memmap)
        image = dict(task="classification", num_classes=10, image_size=32, crop_padding=4, random_flip=True)
        pipelines = [
            ("causal LM, pre-tokenized cache, T=1024", cached),
            ("causal LM, bundled text tokenized in memory", bench_config("", tfds_dir, **lm)),
            ("causal LM, TFDS ArrayRecord (local)", bench_config("", tfds_dir, source="tfds:bigjax_shakespeare", **lm)),
            ("causal LM, JSONL paragraphs in memory", bench_config("", tfds_dir, source=files["jsonl"], **lm)),
            ("causal LM, Parquet paragraphs in memory", bench_config("", tfds_dir, source=files["parquet"], **lm)),
            ("causal LM, Arrow IPC paragraphs in memory", bench_config("", tfds_dir, source=files["arrow"], **lm)),
            ("causal LM, synthetic", bench_config("", tfds_dir, source="synthetic", **lm)),
            ("masked LM, packed paragraphs, T=512", bench_config("", tfds_dir, task="masked_lm", seq_len=512)),
            (
                "text classification, packed speeches, T=512",
                bench_config(
                    "", tfds_dir, source="shakespeare_genre", task="classification", num_classes=2, seq_len=512
                ),
            ),
            (
                "images: digits, resize 8->32, crop+flip",
                bench_config("", tfds_dir, source="digits", channels=1, **image),
            ),
            (
                "images: PNG folder, decode 32x32, crop+flip",
                bench_config("", tfds_dir, source=f"imagefolder:{root / 'images'}", **image),
            ),
        ]
        rows = []
        for name, config in pipelines:
            setup, rate, tokens = measure(config, args.seconds)
            rows.append((name, setup, rate, tokens))
        reading = [(kind, measure_reading(bench_config("", tfds_dir, source=src, **lm))) for kind, src in files.items()]
    print(f"\n{'pipeline':48} {'setup':>8} {'rate':>22}")
    for name, setup, rate, tokens in rows:
        shown = f"{rate * tokens / 1e6:8.2f} M tokens/s" if tokens else f"{rate:10,.0f} images/s"
        print(f"{name:48} {setup:7.2f}s {shown:>22}")
    print("\nreading and tokenizing the same paragraphs (byte tokenizer, best of 3):")
    for kind, rate in reading:
        print(f"  {kind:8} {rate / 1e6:8.2f} M tokens/s   {rate / reading[0][1]:5.2f}x JSONL")
    lm_rate = rows[0][2] * rows[0][3]
    verdict = "meets" if lm_rate >= LM_BAR else "is BELOW"
    print(f"\nthe pre-tokenized LM path {verdict} the bar of {LM_BAR / 1e6:.0f} M tokens/s per host")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
