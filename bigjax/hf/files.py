"""Hugging Face model directories on disk: config.json, the safetensors weights (one file, or shards listed by an
index), the tokenizer files.

Weights are read lazily: `TensorReader(dir)(name)` is a `View` of a tensor, and the family modules describe each
bigjax parameter as views of HF tensors (transposed or axes permuted, an axis split, a range, two summed, layers
stacked, the vocabulary padded). Nothing is read until a device asks for its block, `view[index]`, and then only
that block is read from the file (safetensors' slices; bfloat16 through a memory map). So a host reads only what its
own devices hold, and never more than one parameter's blocks at a time.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import shutil
from collections.abc import Callable

import numpy as np

from bigjax.hf.common import HFError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SHARD_PATTERN = "model{suffix}.safetensors"  # transformers' names: model-00001-of-00003.safetensors
MAX_SHARD_SIZE = "5GB"  # transformers' default max_shard_size
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
SENTENCEPIECE_FILE = "tokenizer.model"  # a Llama's or T5's SentencePiece model, where there is no tokenizer.json
PREPROCESSOR_FILE = "preprocessor_config.json"  # an image model's image processor: resize, rescale, normalize

Index = tuple[slice, ...]  # one slice per axis, step 1 (what jax.make_array_from_callback asks for)


def read_hf_config(hf_dir) -> dict:
    path = pathlib.Path(hf_dir) / "config.json"
    if not path.is_file():
        raise HFError(f"{path} not found: {hf_dir} is not a Hugging Face model directory (what save_pretrained writes)")
    try:
        return json.loads(path.read_text())
    except ValueError as error:
        raise HFError(f"{path} is not valid JSON ({error})") from None


def read_image_normalization(hf_dir) -> tuple[tuple, tuple] | None:
    """(image_mean, image_std) of the image processor saved beside an image model, if there is one."""
    path = pathlib.Path(hf_dir) / PREPROCESSOR_FILE
    if not path.is_file():
        return None
    processor = json.loads(path.read_text())
    if not processor.get("do_normalize", True) or "image_mean" not in processor:
        return None
    return tuple(map(float, processor["image_mean"])), tuple(map(float, processor["image_std"]))


def image_processor_config(config) -> dict:
    """A ViTImageProcessor's preprocessor_config.json that prepares pixels as bigjax's pipeline does: resize to
    data.image_size, x / 255, then (x - data.image_mean) / data.image_std per channel."""
    d = config.data

    def per_channel(values):
        return [float(v) for v in values] * (d.channels if len(values) == 1 else 1)

    return dict(
        image_processor_type="ViTImageProcessor",
        do_resize=True,
        size=dict(height=d.image_size, width=d.image_size),
        resample=2,  # bilinear
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=per_channel(d.image_mean),
        image_std=per_channel(d.image_std),
    )


# --------------------------------------------------------------------------------------------------
# Lazy views


def full_index(shape) -> Index:
    return tuple(slice(0, n) for n in shape)


def normalize(index, shape) -> Index:
    index = index if isinstance(index, tuple) else (index,)
    index = index + (slice(None),) * (len(shape) - len(index))
    return tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape, strict=True))


@dataclasses.dataclass(frozen=True)
class View:
    """A tensor of `shape` whose blocks `read(index)` gives (index normalized: one step-1 slice per axis)."""

    shape: tuple[int, ...]
    read: Callable[[Index], np.ndarray]

    def __getitem__(self, index) -> np.ndarray:
        return self.read(normalize(index, self.shape))

    def full(self) -> np.ndarray:
        return self.read(full_index(self.shape))

    @property
    def T(self) -> View:  # noqa: N802 (numpy's name)
        return View(self.shape[::-1], lambda index: self.read(index[::-1]).T)

    def transpose(self, *axes: int) -> View:
        """The axes permuted as numpy's transpose(axes): torch's conv kernel [out, in, kh, kw] is
        `.transpose(2, 3, 1, 0)`, Flax's [kh, kw, in, out]. A block reads the same block of the source."""
        assert sorted(axes) == list(range(len(self.shape))), (axes, self.shape)

        def read(index: Index) -> np.ndarray:
            source = [None] * len(axes)
            for out_axis, in_axis in enumerate(axes):
                source[in_axis] = index[out_axis]
            return self.read(tuple(source)).transpose(axes)

        return View(tuple(self.shape[a] for a in axes), read)

    def range(self, axis: int, start: int, stop: int) -> View:
        """Axis `axis` cut to [start, stop) (ViT's class-token row of the position table, and the rest)."""

        def read(index: Index) -> np.ndarray:
            cut = index[axis]
            return self.read(index[:axis] + (slice(start + cut.start, start + cut.stop),) + index[axis + 1 :])

        return View(self.shape[:axis] + (stop - start,) + self.shape[axis + 1 :], read)

    def plus(self, other: View) -> View:
        """The elementwise sum of two views of one shape (a table folded into another)."""
        assert self.shape == other.shape, (self.shape, other.shape)
        return View(self.shape, lambda index: self.read(index) + other.read(index))

    def split_axis(self, axis: int, sizes: tuple[int, ...]) -> View:
        """Axis `axis` reshaped into `sizes` (row-major, as numpy's reshape): [d, h*hd] -> [d, h, hd]. A block that
        takes whole sub-axes after the first is one contiguous range of the original axis; any other block reads
        the axis whole and cuts afterwards."""
        assert math.prod(sizes) == self.shape[axis], (sizes, self.shape)
        shape = self.shape[:axis] + tuple(sizes) + self.shape[axis + 1 :]
        inner = math.prod(sizes[1:])

        def read(index: Index) -> np.ndarray:
            parts = index[axis : axis + len(sizes)]
            if all(p == slice(0, n) for p, n in zip(parts[1:], sizes[1:], strict=True)):
                source = (
                    index[:axis] + (slice(parts[0].start * inner, parts[0].stop * inner),) + index[axis + len(sizes) :]
                )
                block = self.read(source)
                return block.reshape(block.shape[:axis] + (-1, *sizes[1:]) + block.shape[axis + 1 :])
            source = index[:axis] + (slice(0, self.shape[axis]),) + index[axis + len(sizes) :]
            block = self.read(source)
            block = block.reshape(block.shape[:axis] + tuple(sizes) + block.shape[axis + 1 :])
            return block[(slice(None),) * axis + parts]

        return View(shape, read)

    def merge_axes(self, axis: int, count: int) -> View:
        """Axes axis..axis+count-1 flattened into one (the inverse of split_axis): read whole, then reshaped."""
        merged = math.prod(self.shape[axis : axis + count])
        shape = self.shape[:axis] + (merged,) + self.shape[axis + count :]

        def read(index: Index) -> np.ndarray:
            source = index[:axis] + full_index(self.shape[axis : axis + count]) + index[axis + 1 :]
            block = self.read(source)
            block = block.reshape(block.shape[:axis] + (merged,) + block.shape[axis + count :])
            return block[(slice(None),) * axis + (index[axis],)]

        return View(shape, read)

    def columns(self, start: int, stop: int) -> View:
        """The last axis' range [start, stop): one of q|k|v in a fused projection."""
        return self.range(len(self.shape) - 1, start, stop)

    def padded(self, axis: int, size: int) -> View:
        """Zeros appended along `axis` up to `size` (the vocabulary rows bigjax adds)."""
        if size <= self.shape[axis]:
            return self
        have = self.shape[axis]
        shape = self.shape[:axis] + (size,) + self.shape[axis + 1 :]

        def read(index: Index) -> np.ndarray:
            want = index[axis]
            out = np.zeros(tuple(s.stop - s.start for s in index), np.float32)
            stored = slice(want.start, min(want.stop, have))
            if stored.start < stored.stop:
                block = self.read(index[:axis] + (stored,) + index[axis + 1 :])
                out[(slice(None),) * axis + (slice(0, stored.stop - stored.start),)] = block
            return out

        return View(shape, read)


def stack(views: list[View]) -> View:
    """Views of equal shape stacked on a new leading axis (the scanned layers)."""

    def read(index: Index) -> np.ndarray:
        return np.stack([views[i].read(index[1:]) for i in range(index[0].start, index[0].stop)])

    return View((len(views), *views[0].shape), read)


# --------------------------------------------------------------------------------------------------
# Reading


class TensorReader:
    """HF tensors by name, as lazy `View`s, from model.safetensors or the shards a model.safetensors.index.json
    lists. A name is found with or without the `transformer.` prefix that GPT2LMHeadModel adds (the original gpt2
    files lack it). Blocks come out as float32 (bfloat16 widens exactly)."""

    def __init__(self, hf_dir):
        from safetensors import safe_open

        hf_dir = pathlib.Path(hf_dir)
        if (hf_dir / INDEX_FILE).is_file():
            weight_map = json.loads((hf_dir / INDEX_FILE).read_text())["weight_map"]
            self.files = {name: hf_dir / shard for name, shard in weight_map.items()}
        elif (hf_dir / SINGLE_FILE).is_file():
            with safe_open(hf_dir / SINGLE_FILE, framework="numpy") as f:
                self.files = {name: hf_dir / SINGLE_FILE for name in f.keys()}  # noqa: SIM118 (not a dict)
        else:
            raise HFError(f"{hf_dir} has neither {SINGLE_FILE} nor {INDEX_FILE} (only safetensors weights are read)")
        self.hf_dir = hf_dir

    def has(self, name: str) -> bool:
        return self._stored_name(name) is not None

    def _stored_name(self, name: str) -> str | None:
        for candidate in (name, "transformer." + name, name.removeprefix("transformer.")):
            if candidate in self.files:
                return candidate
        return None

    def __call__(self, name: str) -> View:
        from safetensors import safe_open

        stored = self._stored_name(name)
        if stored is None:
            raise HFError(f"{self.hf_dir} has no tensor {name} (a model of another architecture, or a damaged file?)")
        file = self.files[stored]
        with safe_open(file, framework="numpy") as f:
            tensor = f.get_slice(stored)
            shape, bfloat16 = tuple(tensor.get_shape()), tensor.get_dtype() == "BF16"

        def read(index: Index) -> np.ndarray:
            if bfloat16:  # most released Llama weights
                return np.asarray(bfloat16_tensor(file, stored)[index], dtype=np.float32)
            with safe_open(file, framework="numpy") as f:
                return np.asarray(f.get_slice(stored)[index], dtype=np.float32)

        return View(shape, read)


def bfloat16_tensor(file, name: str) -> np.ndarray:
    """One bfloat16 tensor of a safetensors file, memory-mapped (indexing it reads only that block). numpy has no
    bfloat16, so safetensors' numpy API refuses it: map it by the file's own layout (8 bytes of header length, a
    JSON header, the data) as ml_dtypes.bfloat16 (jax's)."""
    import ml_dtypes

    with open(file, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        entry = json.loads(f.read(length))[name]
    start, end = entry["data_offsets"]
    data = np.memmap(file, dtype=np.uint8, mode="r", offset=8 + length + start, shape=(end - start,))
    return data.view(ml_dtypes.bfloat16).reshape(entry["shape"])


# --------------------------------------------------------------------------------------------------
# Writing


def shard_bytes(size: int | str) -> int:
    """ "5GB", "40KB" or a number of bytes (transformers' units: GB = 10**9) -> bytes."""
    # The parser split_state_dict_into_shards_factory itself uses (not exported by huggingface_hub's __init__).
    from huggingface_hub.serialization._base import parse_size_to_int

    try:
        return int(size) if isinstance(size, int) or size.isdigit() else parse_size_to_int(size)
    except ValueError:
        raise HFError(f"--max-shard-size {size!r} is not a size; use e.g. 5GB, 500MB or a number of bytes") from None


def save_weights(tensors: dict[str, np.ndarray], out: pathlib.Path, max_shard_bytes: int) -> int:
    """model.safetensors, or above `max_shard_bytes` transformers' shards and their index (split by
    huggingface_hub, as save_pretrained does). Returns the number of files written."""
    from huggingface_hub import split_state_dict_into_shards_factory
    from safetensors.numpy import save_file

    split = split_state_dict_into_shards_factory(
        tensors, get_storage_size=lambda a: a.nbytes, filename_pattern=SHARD_PATTERN, max_shard_size=max_shard_bytes
    )
    for filename, names in split.filename_to_tensors.items():
        save_file({name: tensors[name] for name in names}, str(out / filename), metadata={"format": "pt"})
    if split.is_sharded:
        total = sum(a.nbytes for a in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": split.tensor_to_filename}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2))
    return len(split.filename_to_tensors)


def copy_tokenizer_files(source_dir, dest_dir) -> str | None:
    """Copy the directory's tokenizer into dest_dir: tokenizer.json (with its config files, where present), else a
    SentencePiece tokenizer.model. Returns the config.data.tokenizer that names the copy; None when there is neither."""
    source_dir, dest_dir = pathlib.Path(source_dir), pathlib.Path(dest_dir).resolve()
    if (source_dir / "tokenizer.json").is_file():
        for name in TOKENIZER_FILES:
            if (source_dir / name).is_file():
                shutil.copyfile(source_dir / name, dest_dir / name)
        return f"hf:{dest_dir / 'tokenizer.json'}"
    if (source_dir / SENTENCEPIECE_FILE).is_file():
        shutil.copyfile(source_dir / SENTENCEPIECE_FILE, dest_dir / SENTENCEPIECE_FILE)
        return f"sentencepiece:{dest_dir / SENTENCEPIECE_FILE}"
    return None
