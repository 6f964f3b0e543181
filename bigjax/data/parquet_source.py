"""Parquet files and Hugging Face `datasets` directories on disk, read with pyarrow (no `datasets` needed).

    parquet:PATH   Parquet files: one file, a directory (every *.parquet under it) or a glob, e.g. FineWeb's
                   `data/CC-MAIN-2024-10/*.parquet`; the rows of all files, in sorted file order, are one split
    arrow:PATH     what `datasets.Dataset.save_to_disk` / `DatasetDict.save_to_disk` wrote: a directory of Arrow
                   IPC files (`data-00000-of-0000N.arrow`, `state.json`, `dataset_info.json`); a DatasetDict
                   directory (`dataset_dict.json`, one subdirectory per split); or .arrow files (a file or a glob)

Decisions:
- Two prefixes, not one that guesses: the prefix names the file format, as `jsonl:` and `text:` do. `parquet:` on a
  save_to_disk directory is refused with a pointer to `arrow:`.
- The columns are those `jsonl:` and `tfds:` use: the text in config.data.text_field, the class in
  config.data.label_field (a source without that column is unlabelled). A label column holds integers (Hugging
  Face's ClassLabel: their class names, stored in the files' schema metadata, give the number of classes) or
  strings (indexed by sorted name, the same in every split, as for JSONL); anything else is refused.
- Splits: files, a glob or a single save_to_disk Dataset are split like JSONL: "eval" is the last
  config.data.eval_fraction of the rows. A DatasetDict has its own splits: config.data.train_split names one (the
  default "train"), config.data.eval_split another ("" = the first of validation, test, eval, dev it has; if it has
  none, the last eval_fraction of the train split, which training then does not see).
- Random access by row without reading the corpus into Python: the row counts come from the Parquet footers (and
  from the memory-mapped Arrow files), and row i is found by its chunk, a Parquet row group or an Arrow record
  batch. Only the text column of that one chunk is read and decoded, and it is kept until a row of another chunk is
  asked for: the tokenizer reads the records in order, so every chunk is read once (see ColumnRecords). Arrow IPC
  files are memory-mapped: nothing is copied until a chunk is decoded. Labels are one small integer array, read once
  (the label column only), because the number of classes must be known before training starts.
- Per-host sharding and exact resume are the pipeline's (bigjax.data.pipeline): the records form a
  grain.MapDataset with a fixed order, so global example k is the same on every host and after every restart.
"""

from __future__ import annotations

import bisect
import functools
import json
import pathlib
from collections.abc import Sequence

import numpy as np

from bigjax.data.errors import DataError
from bigjax.data.files import expand_paths, files_fingerprint
from bigjax.data.split import Split

PARQUET_SUFFIXES = (".parquet", ".pq")
ARROW_SUFFIXES = (".arrow",)
HELD_OUT_SPLITS = ("validation", "test", "eval", "dev")  # a DatasetDict's default eval split, the first it has


# --------------------------------------------------------------------------------------------------
# Chunks: the unit of reading (a Parquet row group, an Arrow record batch)


class Chunk:
    """`rows` rows of one file; `read(column)` gives that column of these rows as a pyarrow Array."""

    def __init__(self, path: pathlib.Path, rows: int, read):
        self.path, self.rows, self.read = path, rows, read


def _parquet_file(path: pathlib.Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as error:
        raise DataError(
            f"{path} is not a Parquet file ({error}); leave it out of config.data.source=parquet:... (save_to_disk "
            "directories and .arrow files are read by arrow:PATH)"
        ) from None


def parquet_chunks(files: list[pathlib.Path]) -> tuple[list[Chunk], list]:
    """(a chunk per row group of every file, every file's schema), from the files' footers only."""
    chunks, schemas = [], []
    for path in files:
        file = _parquet_file(path)
        schemas.append((path, file.schema_arrow))
        for group in range(file.metadata.num_row_groups):
            read = functools.partial(_read_row_group, path, group)
            chunks.append(Chunk(path, file.metadata.row_group(group).num_rows, read))
    return chunks, schemas


def _read_row_group(path: pathlib.Path, group: int, column: str):
    table = _parquet_file(path).read_row_group(group, columns=[column])
    return table.column(0).combine_chunks()


def arrow_chunks(files: list[pathlib.Path]) -> tuple[list[Chunk], list]:
    """(a chunk per record batch of every file, every file's schema); the files are memory-mapped."""
    chunks, schemas = [], []
    for path in files:
        batches, schema = _arrow_batches(path)
        schemas.append((path, schema))
        for batch in batches:
            chunks.append(Chunk(path, batch.num_rows, lambda column, batch=batch: batch.column(column)))
    return chunks, schemas


def _arrow_batches(path: pathlib.Path):
    """The record batches of an Arrow IPC file: the stream format (what save_to_disk writes) or the file format."""
    import pyarrow as pa

    try:
        source = pa.memory_map(str(path))
        try:
            reader = pa.ipc.open_file(source)
            return [reader.get_batch(i) for i in range(reader.num_record_batches)], reader.schema
        except pa.ArrowInvalid:
            source.seek(0)
            table = pa.ipc.open_stream(source).read_all()  # memory-mapped: the batches point into the file
            return table.to_batches(), table.schema
    except (pa.ArrowInvalid, OSError) as error:
        raise DataError(f"{path} is not an Arrow IPC file ({error}); leave it out of config.data.source") from None


# --------------------------------------------------------------------------------------------------
# Records


class ColumnRecords(Sequence):
    """Rows [start, stop) of the chunks as {"text": str[, "label": int]}: len() and [i].

    This is what grain.MapDataset.source takes (it asks only for __len__ and __getitem__), and what Split.records
    promises. It is handed over as it is, not wrapped in a MapDataset: iterating a MapDataset reads ahead on a pool
    of threads, out of order, which would decode the same chunk again and again; iterating this reads in order.
    Holding the decoded text of one chunk at a time keeps a FineWeb-sized corpus out of memory while the tokenizer
    walks through it."""

    def __init__(self, chunks: list[Chunk], text_field: str, labels, start: int, stop: int):
        self.chunks, self.text_field, self.labels = chunks, text_field, labels
        self.start, self.stop = start, stop
        self.chunk_starts = np.concatenate([[0], np.cumsum([c.rows for c in chunks])]).tolist()
        self.cached = (-1, None)  # (chunk index, its texts as Python strings)

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(i)
        row = self.start + i
        index = bisect.bisect_right(self.chunk_starts, row) - 1
        if self.cached[0] != index:
            self.cached = (index, self.chunks[index].read(self.text_field).to_pylist())
        text = self.cached[1][row - self.chunk_starts[index]]
        if text is None:
            chunk = self.chunks[index]
            raise DataError(
                f"{chunk.path}: row {row - self.chunk_starts[index]} of a chunk of {chunk.rows} rows has no text "
                f"(null in column {self.text_field!r}); drop such rows from the data"
            )
        record = {"text": text}
        if self.labels is not None:
            record["label"] = int(self.labels[row])
        return record


def check_text_column(schemas: list, text_field: str) -> None:
    import pyarrow as pa

    for path, schema in schemas:
        if text_field not in schema.names:
            raise DataError(
                f"{path} has no column {text_field!r} (config.data.text_field); its columns are "
                f"{', '.join(schema.names) or 'none'}"
            )
        kind = schema.field(text_field).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
            raise DataError(
                f"{path}: the column {text_field!r} (config.data.text_field) holds {kind}, not text; point "
                "config.data.text_field at a string column"
            )


def read_labels(chunks: list[Chunk], schemas: list, label_field: str, other_names=set):
    """(int32 labels of every row, number of classes), or (None, None) when the files have no such column.

    Integer labels count max + 1 classes, or as many as the ClassLabel names the schema holds, if more. String
    labels become indices of the sorted names: of these rows and of `other_names()` (the other splits' string
    labels), so that every split numbers the classes alike."""
    import pyarrow as pa

    present = [label_field in schema.names for _, schema in schemas]
    if not any(present) or not chunks:
        return None, None
    if not all(present):
        missing = next(path for (path, _), p in zip(schemas, present, strict=True) if not p)
        raise DataError(
            f"{missing} has no column {label_field!r} (config.data.label_field) but other files have it; "
            "label every file or none"
        )
    values = [_label_column(chunk, label_field) for chunk in chunks]
    if len({v.type for v in values}) > 1:
        raise DataError(
            f"the column {label_field!r} (config.data.label_field) holds integers in some files and strings in "
            f"others ({chunks[0].path} and more); use one or the other"
        )
    column = pa.chunked_array(values, type=values[0].type)
    if pa.types.is_string(column.type):
        names = sorted(set(column.unique().to_pylist()) | other_names())
        index = {name: i for i, name in enumerate(names)}
        return np.asarray([index[v] for v in column.to_pylist()], np.int32), len(names)
    labels = column.to_numpy()
    if labels.min() < 0:
        raise DataError(
            f"{chunks[0].path}: the column {label_field!r} (config.data.label_field) holds the negative label "
            f"{labels.min()}; class labels run from 0"
        )
    classes = class_label_names(schemas[0][1], label_field) or []
    return labels.astype(np.int32), max(len(classes), int(labels.max()) + 1)


def _label_column(chunk: Chunk, label_field: str):
    """The chunk's labels as integers or strings (dictionary-encoded columns decoded); bad ones refused."""
    import pyarrow as pa

    values = chunk.read(label_field)
    if pa.types.is_dictionary(values.type):
        values = values.dictionary_decode()
    if values.null_count:
        raise DataError(
            f"{chunk.path}: {values.null_count} row(s) have no label (null in column {label_field!r}, "
            "config.data.label_field); label every row or none"
        )
    if pa.types.is_integer(values.type):
        return values.cast(pa.int64())
    if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
        return values.cast(pa.string())
    raise DataError(
        f"{chunk.path}: the column {label_field!r} (config.data.label_field) holds {values.type} values, not "
        "class labels; labels are integers (0, 1, ...) or strings (class names): cast the column, or point "
        "config.data.label_field at another"
    )


def label_names(chunks: list[Chunk], schemas: list, label_field: str) -> set[str]:
    """The distinct string labels of these chunks (none for integer or absent labels)."""
    import pyarrow as pa

    names = set()
    for chunk, (_, schema) in zip(chunks, _schema_of_each(chunks, schemas), strict=True):
        if label_field in schema.names:
            values = _label_column(chunk, label_field)
            if pa.types.is_string(values.type):
                names |= set(values.unique().to_pylist())
    return names


def _schema_of_each(chunks: list[Chunk], schemas: list) -> list:
    by_path = dict(schemas)
    return [(chunk.path, by_path[chunk.path]) for chunk in chunks]


def class_label_names(schema, label_field: str) -> list[str] | None:
    """The class names of a Hugging Face ClassLabel column, from the metadata `datasets` writes into the schema."""
    try:
        info = json.loads((schema.metadata or {})[b"huggingface"])
        feature = info["info"]["features"][label_field]
    except (KeyError, ValueError, TypeError):
        return None
    return list(feature["names"]) if feature.get("_type") == "ClassLabel" and feature.get("names") else None


# --------------------------------------------------------------------------------------------------
# Splits


def fingerprint_of(kind: str, files: list[pathlib.Path], config, which: str) -> str:
    d = config.data
    return f"{kind}:{files_fingerprint(files)}:{d.text_field}:{d.label_field}:{which}:{d.eval_fraction}"


def columnar_split(config, kind: str, files: list[pathlib.Path], split: str, description: str, label_files=None):
    """The rows of `files` (all; or the train/eval part by config.data.eval_fraction) as a text Split.

    `split` is "train" or "eval" (cut by eval_fraction) or "all"; `label_files` are the files whose string labels
    name the classes (every split's, for a DatasetDict), by default `files`."""
    d = config.data
    chunk_reader = parquet_chunks if kind == "parquet" else arrow_chunks

    def read():
        chunks, schemas = chunk_reader(files)
        check_text_column(schemas, d.text_field)
        other = [f for f in label_files or [] if f not in files]
        labels, num_classes = read_labels(
            chunks, schemas, d.label_field, lambda: label_names(*chunk_reader(other), d.label_field) if other else set()
        )
        rows = sum(c.rows for c in chunks)
        cut = int(rows * (1 - d.eval_fraction))
        start, stop = {"train": (0, cut), "eval": (cut, rows), "all": (0, rows)}[split]
        return ColumnRecords(chunks, d.text_field, labels, start, stop), num_classes

    fingerprint = fingerprint_of(kind, files, config, split)
    if label_files:  # string labels are numbered over every split
        fingerprint += f":{fingerprint_of(kind, label_files, config, 'labels')}"
    return Split("text", fingerprint, description, read)


def parquet_split(config, pattern: str, split: str) -> Split:
    path = pathlib.Path(pattern).expanduser()
    if path.is_dir() and is_saved_dataset(path):
        raise DataError(
            f"{pattern} is a directory written by datasets' save_to_disk (Arrow files, not Parquet); use "
            f"config.data.source=arrow:{pattern}"
        )
    files = expand_paths(pattern, "Parquet source", () if path.is_file() else PARQUET_SUFFIXES)
    description = f"{len(files)} Parquet file(s) from {pattern}, read by row group with pyarrow"
    return columnar_split(config, "parquet", files, split, description)


def arrow_split(config, pattern: str, split: str) -> Split:
    """A save_to_disk Dataset directory, or .arrow files; split by config.data.eval_fraction."""
    path = pathlib.Path(pattern).expanduser()
    files = saved_dataset_files(path) if path.is_dir() else expand_paths(pattern, "Arrow source", ARROW_SUFFIXES)
    description = f"{len(files)} Arrow file(s) from {pattern}, memory-mapped with pyarrow"
    return columnar_split(config, "arrow", files, split, description)


def is_saved_dataset(path: pathlib.Path) -> bool:
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def is_dataset_dict(pattern: str) -> bool:
    return (pathlib.Path(pattern).expanduser() / "dataset_dict.json").is_file()


def saved_dataset_files(folder: pathlib.Path) -> list[pathlib.Path]:
    """The Arrow files of a save_to_disk Dataset directory, in the order its state.json lists them."""
    state = folder / "state.json"
    if state.is_file():
        try:
            names = [entry["filename"] for entry in json.loads(state.read_text())["_data_files"]]
        except (ValueError, KeyError, TypeError) as error:
            raise DataError(f"{state} is not the state.json datasets' save_to_disk writes ({error!r})") from None
        files = [folder / name for name in names]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise DataError(f"{folder}: state.json lists {', '.join(missing)}, which do not exist")
    else:
        files = sorted(p for p in folder.glob("*.arrow") if p.is_file())
    if not files:
        raise DataError(
            f"Arrow source {folder}: no .arrow files found (config.data.source=arrow:DIR reads the directory "
            "datasets' save_to_disk wrote)"
        )
    return files


def dataset_dict_split(config, root: str, which: str) -> tuple[Split, str]:
    """(the split of a save_to_disk DatasetDict for "train" or "eval", its name) per config.data.*_split."""
    folder = pathlib.Path(root).expanduser()
    try:
        splits = list(json.loads((folder / "dataset_dict.json").read_text())["splits"])
    except (ValueError, KeyError, TypeError) as error:
        raise DataError(
            f"{folder / 'dataset_dict.json'} is not what datasets' save_to_disk writes ({error!r})"
        ) from None
    d = config.data
    held_out = d.eval_split or next((s for s in HELD_OUT_SPLITS if s in splits), "")
    for key, name in (("train_split", d.train_split), ("eval_split", held_out)):
        if name and name not in splits:
            raise DataError(
                f"config.data.{key}={name!r}: the DatasetDict {root} has the splits {', '.join(splits)}; set "
                f"config.data.{key} to one of them"
            )
    name = held_out if which == "eval" and held_out else d.train_split
    part = "all" if held_out else which  # no held-out split: the last eval_fraction of the train split is eval
    files = saved_dataset_files(folder / name)
    label_files = [f for s in splits for f in saved_dataset_files(folder / s)]
    shown = (
        name if held_out else f"{name}, {'the last' if which == 'eval' else 'all but the last'} {d.eval_fraction:.0%}"
    )
    description = f"split {shown} of the DatasetDict {root}, {len(files)} Arrow file(s) memory-mapped with pyarrow"
    return columnar_split(config, "arrow", files, part, description, label_files), name
