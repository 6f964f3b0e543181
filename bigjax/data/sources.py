"""Sources: where the records come from. `open_split(config, "train" | "eval")` gives one split as a `Split`
(bigjax.data.split): a random-access sequence of raw records, {"text": str[, "label": int]} or {"image": array |
bytes | path, "label": int}, plus what the rest of the pipeline needs to know about it.

`config.data.source` is one of
    shakespeare            the bundled plays (text)
    shakespeare_genre      their speeches labelled comedy=0 / tragedy=1 (text classification)
    digits                 scikit-learn's bundled 8x8 digits (images, 10 classes)
    synthetic              random tokens or images (handled by the pipeline: no records)
    text:PATH              plain text: a file, a directory (every file under it) or a glob
    jsonl:PATH             JSON lines, the text in config.data.text_field (labels in config.data.label_field)
    parquet:PATH           Parquet files (a file, a directory or a glob), the columns named as for JSONL
    arrow:PATH             a datasets.save_to_disk directory (Dataset or DatasetDict) or .arrow files (see
                           bigjax.data.parquet_source for both)
    imagefolder:PATH       PATH/CLASS/IMAGE, one subdirectory per class (optionally PATH/train and PATH/val)
    tfds:NAME[/CONFIG]     a TensorFlow Datasets dataset (see bigjax.data.tfds_source)

The bundled and local sources have the splits "train" and "eval": the eval split is the last
config.data.eval_fraction of every file (text), of the records (JSONL, Parquet, Arrow) or of every class (image
folders). A DatasetDict directory has its own splits, named by config.data.train_split and eval_split.
"""

from __future__ import annotations

import json
import pathlib

import grain

from bigjax.data import corpus, parquet_source
from bigjax.data.errors import DataError
from bigjax.data.files import expand_paths, files_fingerprint
from bigjax.data.split import Split
from bigjax.ops import metrics

BUNDLED = ("shakespeare", "shakespeare_genre", "digits", "synthetic")
PREFIXES = ("text", "jsonl", "parquet", "arrow", "imagefolder", "tfds")
LOCAL_SPLITS = ("train", "eval")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
# How a source's text is cut into records (config.data.text_records): the separator, or None to keep each document
# whole. By the names config.CHOICES lists besides "auto"; config.check_values refuses any other.
RECORD_SEPARATORS = {"document": None, "paragraph": "\n\n", "line": "\n"}


def parse_source(spec: str) -> tuple[str, str]:
    """ "text:PATH" -> ("text", "PATH"); "shakespeare" -> ("shakespeare", "")."""
    if spec in BUNDLED:
        return spec, ""
    kind, sep, arg = spec.partition(":")
    if sep and kind in PREFIXES and arg:
        return kind, arg
    raise DataError(
        f"config.data.source={spec!r} is not a source; use one of {', '.join(BUNDLED)}, or "
        + ", ".join(f"{p}:PATH" for p in PREFIXES[:-1])
        + ", tfds:NAME[/CONFIG]"
    )


def source_kind(spec: str) -> str:
    """ "text" or "image" (or "synthetic"), without reading anything."""
    kind, _ = parse_source(spec)
    if kind in ("digits", "imagefolder"):
        return "image"
    if kind == "synthetic":
        return "synthetic"
    if kind == "tfds":
        return "unknown"  # only the dataset's features tell
    return "text"


def split_name(config, which: str) -> str:
    """The configured split for "train" or "eval"; "" means the source's own eval split."""
    return config.data.train_split if which == "train" else config.data.eval_split


def open_split(config, which: str) -> Split:
    """The records of config.data.train_split (which="train") or config.data.eval_split (which="eval")."""
    kind, arg = parse_source(config.data.source)
    name = split_name(config, which)
    if kind == "tfds":
        from bigjax.data import tfds_source

        split = tfds_source.open_split(config, arg, name or None)
    elif kind == "arrow" and parquet_source.is_dataset_dict(arg):  # a DatasetDict: splits of its own
        split, name = parquet_source.dataset_dict_split(config, arg, which)
    else:
        name = name or "eval"
        if name not in LOCAL_SPLITS:
            raise DataError(
                f"config.data.{which}_split={name!r}: the source {config.data.source!r} has the splits "
                f"{' and '.join(LOCAL_SPLITS)} (the eval split is the last config.data.eval_fraction)"
            )
        opener = {
            "shakespeare": _shakespeare,
            "shakespeare_genre": _shakespeare_genre,
            "digits": _digits,
            "text": _text_files,
            "jsonl": _jsonl,
            "parquet": parquet_source.parquet_split,
            "arrow": parquet_source.arrow_split,
            "imagefolder": _image_folder,
        }[kind]
        split = opener(config, arg, name)
    if split.kind == "text":
        split = split_text_records(split, text_unit(config))
    split.where = f"the {which} split ({name or 'default'}) of {config.data.source}"
    return split


def text_unit(config) -> str:
    """What one text record is: a whole document for causal LM, a paragraph for packed examples, unless set."""
    unit = config.data.text_records
    if unit == "auto":
        return "document" if config.task.name == "causal_lm" else "paragraph"
    return unit


def split_text_records(split: Split, unit: str) -> Split:
    """Cut every record into paragraphs (blank-line separated) or non-empty lines; a piece keeps its label."""
    separator = RECORD_SEPARATORS[unit]
    if separator is None:
        return split

    def cut(records):
        pieces = []
        for record in records:
            pieces += [{**record, "text": p.strip("\n")} for p in record["text"].split(separator) if p.strip()]
        return pieces

    return split.with_records(cut, f"{split.fingerprint}|{unit}")


# --------------------------------------------------------------------------------------------------
# Bundled


def _shakespeare(config, _, split: str) -> Split:
    fraction = config.data.eval_fraction
    read = lambda: ([{"text": t} for t in corpus.shakespeare_documents(split, fraction).values()], None)
    return Split("text", f"shakespeare:{split}:{fraction}", "the bundled plays", read)


def _shakespeare_genre(config, _, split: str) -> Split:
    fraction = config.data.eval_fraction

    def read():
        texts, labels = corpus.shakespeare_genre(split, fraction)
        return [{"text": t, "label": y} for t, y in zip(texts, labels, strict=True)]

    description = "speeches of the bundled plays by genre"
    return Split("text", f"shakespeare_genre:{split}:{fraction}", description, read, len(corpus.GENRE_NAMES))


def _digits(config, _, split: str) -> Split:
    def read():
        images, labels = corpus.digits(split)
        return grain.MapDataset.source(images).map_with_index(lambda i, im: {"image": im, "label": int(labels[i])})

    return Split("image", f"digits:{split}", "scikit-learn's bundled 8x8 digits", read, 10)


# --------------------------------------------------------------------------------------------------
# Local files


def _cut(text: str, split: str, eval_fraction: float) -> str:
    """The first (1 - eval_fraction) of a text (train) or the rest (eval), cut at a line boundary."""
    cut = text.rfind("\n", 0, int(len(text) * (1 - eval_fraction))) + 1
    return text[:cut] if split == "train" else text[cut:]


def _read_text(path: pathlib.Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataError(
            f"{path} is not UTF-8 text ({error}); convert it or leave it out of config.data.source"
        ) from None


def _text_files(config, pattern: str, split: str) -> Split:
    files = expand_paths(pattern, "text source")
    fraction = config.data.eval_fraction
    read = lambda: (grain.MapDataset.source(files).map(lambda f: {"text": _cut(_read_text(f), split, fraction)}), None)
    fingerprint = f"text:{files_fingerprint(files)}:{split}:{fraction}"
    return Split("text", fingerprint, f"{len(files)} text file(s) from {pattern}", read)


def _jsonl(config, pattern: str, split: str) -> Split:
    files = expand_paths(pattern, "JSONL source")
    d = config.data

    def read():
        rows = _read_jsonl(files, d.text_field, d.label_field, d.skip_bad)
        rows, num_classes = _index_labels(rows, pattern, d.label_field)
        cut = int(len(rows) * (1 - d.eval_fraction))
        return (rows[:cut] if split == "train" else rows[cut:]), num_classes

    fingerprint = (
        f"jsonl:{files_fingerprint(files)}:{d.text_field}:{d.label_field}:{split}:{d.eval_fraction}:{d.skip_bad}"
    )
    return Split("text", fingerprint, f"{len(files)} JSONL file(s) from {pattern}", read)


def _index_labels(rows: list[dict], pattern: str, label_field: str) -> tuple[list[dict], int | None]:
    """String labels become class indices (sorted by name, the same in every split); returns (rows, classes)."""
    labelled = sum("label" in r for r in rows)
    if not labelled:
        return rows, None
    if labelled != len(rows):
        raise DataError(
            f"{pattern}: {len(rows) - labelled} of {len(rows)} records have no field {label_field!r} "
            "(config.data.label_field); label every record or none"
        )
    names = sorted({r["label"] for r in rows if isinstance(r["label"], str)})
    if not names:
        return rows, max(r["label"] for r in rows) + 1
    if len(names) != len(rows) and any(isinstance(r["label"], int) for r in rows):
        raise DataError(f"{pattern}: the labels mix integers and strings; use one or the other")
    index = {name: i for i, name in enumerate(names)}
    return [{**r, "label": index[r["label"]]} for r in rows], len(names)


def _read_jsonl(files, text_field: str, label_field: str, skip_bad: bool) -> list[dict]:
    rows, skipped = [], 0
    for path in files:
        for number, line in enumerate(_read_text(path).splitlines(), 1):
            if not line.strip():
                continue
            row, problem = _parse_jsonl_line(line, text_field)
            if problem and skip_bad:
                skipped += 1
                continue
            if problem:
                raise DataError(
                    f"{path}:{number} {problem}; fix it, or set config.data.skip_bad=True to skip such lines"
                )
            record = {"text": str(row[text_field])}
            if label_field in row:
                label = row[label_field]
                if not isinstance(label, (int, str)) or isinstance(label, bool):
                    raise DataError(f"{path}:{number}: the label {label!r} is neither an integer nor a string")
                record["label"] = label
            rows.append(record)
    if skipped:
        metrics.say(f"data: skipped {skipped} bad JSONL line(s) in {len(files)} file(s) (config.data.skip_bad)")
    return rows


def _parse_jsonl_line(line: str, text_field: str) -> tuple[dict | None, str | None]:
    """(the record, None) or (None, what is wrong with the line)."""
    try:
        row = json.loads(line)
    except ValueError as error:
        return None, f"is not valid JSON ({error})"
    if not isinstance(row, dict):
        return None, "is not a JSON object"
    if text_field not in row:
        return None, (
            f"has no field {text_field!r} (config.data.text_field); its fields are {', '.join(sorted(row)) or 'none'}"
        )
    return row, None


def _image_folder(config, root: str, split: str) -> Split:
    base = pathlib.Path(root).expanduser()
    if not base.is_dir():
        raise DataError(f"image folder {root}: no such file or directory (config.data.source=imagefolder:PATH)")
    split_dirs = _split_dirs(base)
    class_root = split_dirs["train"] if split_dirs else base
    classes = sorted(p.name for p in class_root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"image folder {class_root} has no class subdirectories; lay it out as {root}/CLASS/IMAGE")
    items, ignored = [], 0
    for label, name in enumerate(classes):
        folder = (split_dirs[split] if split_dirs else base) / name
        files = sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []
        images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
        ignored += len(files) - len(images)
        if not split_dirs:  # the last eval_fraction of every class is held out
            cut = len(images) - int(round(len(images) * config.data.eval_fraction))
            images = images[:cut] if split == "train" else images[cut:]
        items += [(str(p), label) for p in images]
    if ignored:
        metrics.say(f"data: {ignored} file(s) in {root} are not images ({', '.join(IMAGE_SUFFIXES)}) and are ignored")
    read = lambda: grain.MapDataset.source(items).map(lambda item: {"image": item[0], "label": item[1]})
    fingerprint = f"imagefolder:{files_fingerprint([pathlib.Path(p) for p, _ in items])}"
    layout = "train/ and eval/ subfolders" if split_dirs else f"the last {config.data.eval_fraction:.0%} held out"
    return Split("image", fingerprint, f"{len(classes)} classes in {root} ({layout})", read, len(classes))


def _split_dirs(base: pathlib.Path) -> dict | None:
    """{"train": dir, "eval": dir} when the folder is split already (train/ and val/, eval/ or test/)."""
    train = base / "train"
    evals = [base / name for name in ("val", "validation", "eval", "test") if (base / name).is_dir()]
    if train.is_dir() and evals:
        return {"train": train, "eval": evals[0]}
    return None
