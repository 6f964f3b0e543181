"""Hugging Face model directories on disk: config.json, the safetensors weights (one file, or shards listed by an
index), the tokenizer files.

Weights are read lazily: `TensorReader(dir)(name)` is a `View` of a tensor, and the family modules describe each
bigjax parameter as views of HF tensors (transposed or axes permuted, an axis split, a range, two summed, layers
stacked, the vocabulary padded). Nothing is read until a device asks for its block, `view[index]`, and then only
that block is read from the file (safetensors' slices; bfloat16 through a memory map). So a host reads only what its
own devices hold, and never more than one parameter's blocks at a time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
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


class HFConfig(dict):
    """config.json's fields. A field the family modules read that is not there is one HFError naming it."""

    def __init__(self, fields: dict, path: pathlib.Path):
        super().__init__(fields)
        self.path = path

    def __missing__(self, field: str):
        raise HFError(
            f"{self.path} has no {field!r}, which bigjax needs to build {self.get('architectures')}; save the model "
            "again with transformers' save_pretrained"
        )


def read_hf_config(hf_dir) -> HFConfig:
    path = pathlib.Path(hf_dir) / "config.json"
    if not path.is_file():
        raise HFError(f"{path} not found: {hf_dir} is not a Hugging Face model directory (what save_pretrained writes)")
    fields = read_json(path)
    if not isinstance(fields, dict):
        raise HFError(f"{path} is not a JSON object of fields but a {type(fields).__name__}; save the model again")
    return HFConfig(fields, path)


def read_json(path: pathlib.Path):
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise HFError(f"{path} is not valid JSON ({error}); download or save it again") from None


def read_image_normalization(hf_dir) -> tuple[tuple, tuple] | None:
    """(image_mean, image_std) of the image processor saved beside an image model, if there is one."""
    path = pathlib.Path(hf_dir) / PREPROCESSOR_FILE
    if not path.is_file():
        return None
    processor = read_json(path)
    if not isinstance(processor, dict):
        raise HFError(f"{path} is not a JSON object of settings but a {type(processor).__name__}; save it again")
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
    """A tensor of `shape` whose blocks `read(index)` gives (index normalized: one step-1 slice per axis); `name`
    is the HF tensor it reads, for errors. A layout the config's sizes cannot have (an axis that does not split
    into heads, a range past the end, layers of different shapes) is an HFError: the weights disagree with
    config.json."""

    shape: tuple[int, ...]
    read: Callable[[Index], np.ndarray]
    name: str = ""

    def disagrees(self, why: str) -> HFError:
        return HFError(f"{self.name} has shape {self.shape}, {why}: the weights disagree with config.json")

    def __getitem__(self, index) -> np.ndarray:
        return self.read(normalize(index, self.shape))

    def full(self) -> np.ndarray:
        return self.read(full_index(self.shape))

    @property
    def T(self) -> View:  # noqa: N802 (numpy's name)
        return View(self.shape[::-1], lambda index: self.read(index[::-1]).T, self.name)

    def transpose(self, *axes: int) -> View:
        """The axes permuted as numpy's transpose(axes): torch's conv kernel [out, in, kh, kw] is
        `.transpose(2, 3, 1, 0)`, Flax's [kh, kw, in, out]. A block reads the same block of the source."""
        assert sorted(axes) == list(range(len(self.shape))), (axes, self.shape)

        def read(index: Index) -> np.ndarray:
            source = [None] * len(axes)
            for out_axis, in_axis in enumerate(axes):
                source[in_axis] = index[out_axis]
            return self.read(tuple(source)).transpose(axes)

        return View(tuple(self.shape[a] for a in axes), read, self.name)

    def range(self, axis: int, start: int, stop: int) -> View:
        """Axis `axis` cut to [start, stop) (ViT's class-token row of the position table, and the rest)."""
        if not 0 <= start <= stop <= self.shape[axis]:
            raise self.disagrees(f"which has no range [{start}, {stop}) along axis {axis}")

        def read(index: Index) -> np.ndarray:
            cut = index[axis]
            return self.read(index[:axis] + (slice(start + cut.start, start + cut.stop),) + index[axis + 1 :])

        return View(self.shape[:axis] + (stop - start,) + self.shape[axis + 1 :], read, self.name)

    def plus(self, other: View) -> View:
        """The elementwise sum of two views of one shape (a table folded into another)."""
        if self.shape != other.shape:
            raise self.disagrees(f"which cannot be added to {other.name} of shape {other.shape}")
        return View(self.shape, lambda index: self.read(index) + other.read(index), self.name)

    def split_axis(self, axis: int, sizes: tuple[int, ...]) -> View:
        """Axis `axis` reshaped into `sizes` (row-major, as numpy's reshape): [d, h*hd] -> [d, h, hd]. A block that
        takes whole sub-axes after the first is one contiguous range of the original axis; any other block reads
        the axis whole and cuts afterwards."""
        if math.prod(sizes) != self.shape[axis]:
            raise self.disagrees(f"whose axis {axis} does not split into {tuple(sizes)}")
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

        return View(shape, read, self.name)

    def merge_axes(self, axis: int, count: int) -> View:
        """Axes axis..axis+count-1 flattened into one (the inverse of split_axis): read whole, then reshaped."""
        merged = math.prod(self.shape[axis : axis + count])
        shape = self.shape[:axis] + (merged,) + self.shape[axis + count :]

        def read(index: Index) -> np.ndarray:
            source = index[:axis] + full_index(self.shape[axis : axis + count]) + index[axis + 1 :]
            block = self.read(source)
            block = block.reshape(block.shape[:axis] + (merged,) + block.shape[axis + count :])
            return block[(slice(None),) * axis + (index[axis],)]

        return View(shape, read, self.name)

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

        return View(shape, read, self.name)


def stack(views: list[View]) -> View:
    """Views of equal shape stacked on a new leading axis (the scanned layers)."""
    for view in views[1:]:
        if view.shape != views[0].shape:
            raise view.disagrees(f"unlike {views[0].name} of shape {views[0].shape}, which it is stacked with")

    def read(index: Index) -> np.ndarray:
        return np.stack([views[i].read(index[1:]) for i in range(index[0].start, index[0].stop)])

    return View((len(views), *views[0].shape), read, views[0].name)


# --------------------------------------------------------------------------------------------------
# Reading


class TensorReader:
    """HF tensors by name, as lazy `View`s, from model.safetensors or the shards a model.safetensors.index.json
    lists. A name is found with or without the `transformer.` prefix that GPT2LMHeadModel adds (the original gpt2
    files lack it). Blocks come out as float32 (bfloat16 widens exactly).

    Every file's header is read at once, so a missing, truncated or damaged file, or an index naming tensors its
    shard lacks, is refused before an import writes anything."""

    def __init__(self, hf_dir):
        hf_dir = pathlib.Path(hf_dir)
        if (hf_dir / INDEX_FILE).is_file():
            weight_map = read_index(hf_dir / INDEX_FILE)
        elif (hf_dir / SINGLE_FILE).is_file():
            weight_map = None
        else:
            raise HFError(f"{hf_dir} has neither {SINGLE_FILE} nor {INDEX_FILE} (only safetensors weights are read)")
        shards = sorted(set(weight_map.values())) if weight_map else [SINGLE_FILE]
        headers = {shard: read_header(hf_dir / shard) for shard in shards}
        if weight_map is None:
            weight_map = dict.fromkeys(headers[SINGLE_FILE], SINGLE_FILE)
        for name, shard in weight_map.items():
            if name not in headers[shard]:
                raise HFError(f"{hf_dir / INDEX_FILE} lists {name} in {shard}, which lacks it; download both again")
        self.files = {name: hf_dir / shard for name, shard in weight_map.items()}
        self.layouts = {name: headers[shard][name] for name, shard in weight_map.items()}
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
        file, (shape, dtype) = self.files[stored], self.layouts[stored]

        def read(index: Index) -> np.ndarray:
            if dtype == "BF16":  # most released Llama weights
                return np.asarray(bfloat16_tensor(file, stored)[index], dtype=np.float32)
            with safe_open(file, framework="numpy") as f:
                return np.asarray(f.get_slice(stored)[index], dtype=np.float32)

        return View(shape, read, stored)


def read_index(path: pathlib.Path) -> dict[str, str]:
    """model.safetensors.index.json's weight_map: {tensor name: the shard file holding it}."""
    index = read_json(path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(shard, str) for shard in weight_map.values()):
        raise HFError(f"{path} has no weight_map of tensor names to shard files; download it again")
    return weight_map


def read_header(path: pathlib.Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """{tensor name: (shape, dtype)} of a safetensors file, from its header (safetensors checks that the data
    the header describes is all there: a truncated file is refused)."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():  # only a shard can be: model.safetensors was found
        raise HFError(f"{path}, which {INDEX_FILE} lists, is missing; download it again")
    try:
        with safe_open(path, framework="numpy") as f:
            slices = {name: f.get_slice(name) for name in f.keys()}  # noqa: SIM118 (not a dict)
            return {name: (tuple(s.get_shape()), s.get_dtype()) for name, s in slices.items()}
    except (SafetensorError, OSError) as error:
        raise HFError(f"{path} is not a readable safetensors file ({error}); download it again") from None


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

    split = split_state_dict_into_shards_factory(
        tensors, get_storage_size=lambda a: a.nbytes, filename_pattern=SHARD_PATTERN, max_shard_size=max_shard_bytes
    )
    for filename, names in split.filename_to_tensors.items():
        save_safetensors({name: tensors[name] for name in names}, out / filename, metadata={"format": "pt"})
    if split.is_sharded:
        total = sum(a.nbytes for a in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": split.tensor_to_filename}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2))
    return len(split.filename_to_tensors)


def save_safetensors(arrays: dict[str, np.ndarray], path, metadata: dict | None = None) -> None:
    """`arrays` as a safetensors file, readable as any file this process writes (0o666 less its umask): safetensors
    writes a private temporary file (0600) and renames it, which a server running as another user cannot read. A
    failed write (a full disk) is an OSError, as Python's own writes' are."""
    from safetensors import SafetensorError
    from safetensors.numpy import save_file

    try:
        save_file(arrays, str(path), metadata=metadata)
    except SafetensorError as error:
        raise OSError(f"{path}: {error}") from error
    os.chmod(path, 0o666 & ~umask())


def umask() -> int:
    """This process's umask, read without setting it where Linux shows it (os.umask only sets it, and another thread
    creating a file at that moment would get the value set)."""
    with contextlib.suppress(OSError):
        for line in pathlib.Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def tokenizer_spec(directory) -> str | None:
    """The config.data.tokenizer naming the directory's tokenizer: its tokenizer.json, else a SentencePiece
    tokenizer.model; None when it has neither."""
    directory = pathlib.Path(directory).resolve()
    if (directory / "tokenizer.json").is_file():
        return f"hf:{directory / 'tokenizer.json'}"
    if (directory / SENTENCEPIECE_FILE).is_file():
        return f"sentencepiece:{directory / SENTENCEPIECE_FILE}"
    return None


def moved_spec(spec: str, directory) -> str:
    """`spec` (a tokenizer_spec) naming the same file in `directory`: where copy_tokenizer_files puts it."""
    kind, _, path = spec.partition(":")
    return f"{kind}:{pathlib.Path(directory).resolve() / pathlib.Path(path).name}"


def copy_tokenizer_files(source_dir, dest_dir) -> str | None:
    """Copy the directory's tokenizer into dest_dir: tokenizer.json (with its config files, where present), else a
    SentencePiece tokenizer.model. Returns the config.data.tokenizer that names the copy; None when there is neither."""
    source_dir = pathlib.Path(source_dir)
    found = tokenizer_spec(source_dir)
    if found is None:
        return None
    names = TOKENIZER_FILES if found.startswith("hf:") else (SENTENCEPIECE_FILE,)
    for name in names:
        if (source_dir / name).is_file():
            shutil.copyfile(source_dir / name, pathlib.Path(dest_dir) / name)
    return tokenizer_spec(dest_dir)
