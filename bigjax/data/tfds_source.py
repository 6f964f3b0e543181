"""TensorFlow Datasets by name: `config.data.source = "tfds:NAME[/CONFIG][:VERSION]"`.

Two ways to read a prepared dataset, and the log says which was taken:

1. ArrayRecord (preferred): `builder.as_data_source(split)`, i.e. `tfds.data_source`, gives random access to the
   records with no TensorFlow; Grain reads them by index like any other source. Needs the `tfds` extra.
2. TFRecord (datasets prepared in TFDS's older format): `builder.as_dataset(split)` through TensorFlow, read once
   into memory. Needs the `tf` extra (tensorflow-cpu). `tfds convert_format` turns such a dataset into ArrayRecord.

A dataset that is not prepared yet is downloaded and prepared as ArrayRecord by `bigjax data prepare` (and by a
single-process `bigjax train`). The records are {"text", "label"} or {"image", "label"}, from the features named
by config.data.text_field, image_field and label_field.

Offline, `tfds:bigjax_shakespeare` and `tfds:bigjax_digits` (bigjax.data.tfds_builders) build local TFDS datasets
from the bundled data, so this path is exercised for real without a network.
"""

from __future__ import annotations

import jax

from bigjax.data.errors import DataError
from bigjax.data.split import Split
from bigjax.ops import metrics

INSTALL_TFDS = "pip install 'bigjax[tfds]'"
INSTALL_TF = "pip install 'bigjax[tf]'"


def import_tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise DataError(f"tfds: sources need TensorFlow Datasets; {INSTALL_TFDS}") from None
    from bigjax.data import tfds_builders  # noqa: F401  (registers the local builders over the bundled data)

    return tfds


def tensorflow_available() -> bool:
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        return False
    return True


def make_builder(config, name: str):
    tfds = import_tfds()
    try:
        return tfds.builder(name, data_dir=config.data.data_dir or None)
    except tfds.core.registered.DatasetNotFoundError as error:
        raise DataError(f"config.data.source=tfds:{name}: {str(error).splitlines()[0]}") from None
    except (ValueError, KeyError) as error:
        raise DataError(f"config.data.source=tfds:{name}: {error}") from None


def prepare(builder, name: str) -> None:
    """Download and prepare the dataset as ArrayRecord in its data_dir; a clear error when that is impossible."""
    metrics.say(f"data: preparing tfds:{name} as ArrayRecord in {builder.data_dir} (once)")
    try:
        builder.download_and_prepare(file_format="array_record")
    except Exception as error:  # tfds raises many kinds: no network, manual download needed, missing extras
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DataError(
            f"tfds:{name} is not prepared in {builder.data_dir} and preparing it failed: {first}. Prepare it where "
            f"the data can be downloaded (`tfds build {name} --file_format=array_record --data_dir=DIR`) and point "
            "config.data.data_dir at DIR"
        ) from None


def is_prepared(builder) -> bool:
    return builder.data_path.exists() and any(builder.data_path.glob("dataset_info.json"))


def open_split(config, name: str, split: str | None) -> Split:
    builder = make_builder(config, name)
    if not is_prepared(builder):
        if jax.process_count() > 1:
            raise DataError(
                f"tfds:{name} is not prepared in {builder.data_dir}; run `bigjax data prepare --config ...` once "
                "(on storage every host reads, or on every host) before a multi-process run"
            )
        prepare(builder, name)
        builder = make_builder(config, name)
    splits = list(builder.info.splits)
    split = split or default_eval_split(name, splits)
    features = builder.info.features
    kind, converter = record_converter(config, name, features)
    label = config.data.label_field
    num_classes = getattr(features[label], "num_classes", None) if label in features else None
    array_record = file_format(builder) == "array_record"
    if not array_record and not tensorflow_available():
        raise DataError(
            f"tfds:{name} is prepared as TFRecord in {builder.data_dir}, which only TensorFlow reads; {INSTALL_TF}, "
            f"or convert it to ArrayRecord: `tfds convert_format --dataset_dir={builder.data_path} "
            "--out_file_format=array_record`"
        )
    how = ARRAY_RECORD_READ if array_record else TFRECORD_READ
    fingerprint = f"tfds:{builder.info.full_name}:{split}"
    description = f"tfds:{builder.info.full_name} split {split!r} ({how})"
    read = lambda: read_split(builder, name, split, splits, array_record).map(converter)
    return Split(kind, fingerprint, description, read, num_classes)


def default_eval_split(name: str, splits: list[str]) -> str:
    for candidate in ("validation", "test", "eval", "dev"):
        if candidate in splits:
            return candidate
    raise DataError(
        f"tfds:{name} has no validation or test split (it has {', '.join(splits)}); set config.data.eval_split, "
        "e.g. 'train[95%:]' with config.data.train_split='train[:95%]'"
    )


ARRAY_RECORD_READ = "ArrayRecord, random access through tfds.data_source and Grain"
TFRECORD_READ = "TFRecord through TensorFlow (tfds as_dataset), held in memory"


def file_format(builder) -> str:
    return getattr(builder.info.file_format, "value", builder.info.file_format)  # an enum in recent tfds


def read_split(builder, name: str, split: str, splits: list[str], array_record: bool):
    """A grain.MapDataset of the split's raw tfds records."""
    import grain

    try:
        if array_record:
            return grain.MapDataset.source(builder.as_data_source(split=split))
        import tensorflow_datasets as tfds

        return grain.MapDataset.source(list(tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False))))
    except (ValueError, KeyError, AssertionError, TypeError) as error:
        raise DataError(
            f"tfds:{name} cannot read the split {split!r}: {str(error).splitlines()[0] if str(error) else error!r}. "
            f"Its splits: {', '.join(splits)}; slices look like 'train[:95%]' or 'train[1000:]'"
        ) from None


def record_converter(config, name: str, features):
    """("text" | "image", a function from a tfds record to bigjax's record)."""
    d = config.data
    label = d.label_field if d.label_field in features else None
    if d.image_field in features:
        field, kind = d.image_field, "image"
    elif d.text_field in features:
        field, kind = d.text_field, "text"
    else:
        raise DataError(
            f"tfds:{name} has no feature {d.text_field!r} (config.data.text_field) or {d.image_field!r} "
            f"(config.data.image_field); its features: {', '.join(features.keys())}"
        )

    def convert(record: dict) -> dict:
        value = record[field]
        if kind == "text" and isinstance(value, bytes):
            value = value.decode("utf-8")
        out = {kind: value}
        if label is not None:
            out["label"] = int(record[label])
        return out

    return kind, convert
