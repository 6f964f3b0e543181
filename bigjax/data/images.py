"""Images: decode, resize, augment (random crop and flip), normalize.

Every random choice comes from a generator seeded by (seed, global example index), and the global index of an
example is step * batch_size + its row: the same example gets the same crop in every run, on any number of
hosts, and after any resume.
"""

from __future__ import annotations

import io
import pathlib

import numpy as np
from PIL import Image, UnidentifiedImageError

from bigjax.data.errors import DataError
from bigjax.ops import metrics


def decode(image, channels: int) -> np.ndarray:
    """An array (HW or HWC), encoded bytes or a file path -> uint8 [h, w, channels]."""
    if isinstance(image, np.ndarray) and image.dtype == np.uint8:
        array = image if image.ndim == 3 else image[..., None]
        if array.shape[-1] == channels:
            return array
        pil = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    else:
        pil = _open(image)
    return _as_array(pil.convert("L" if channels == 1 else "RGB"), channels)


def _open(image) -> Image.Image:
    try:
        source = io.BytesIO(image) if isinstance(image, bytes) else image
        pil = Image.open(source)
        pil.load()
        return pil
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        where = image if isinstance(image, (str, pathlib.Path)) else f"an encoded image of {len(image)} bytes"
        raise DataError(
            f"cannot decode {where} ({error}); remove or replace it, or set config.data.skip_bad=True to give it "
            "weight 0"
        ) from None


def _as_array(pil: Image.Image, channels: int) -> np.ndarray:
    array = np.asarray(pil, dtype=np.uint8)
    return array[..., None] if array.ndim == 2 else array[..., :channels]


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize to size x size (a no-op when it is that size already)."""
    if image.shape[0] == size and image.shape[1] == size:
        return image
    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    return _as_array(pil.resize((size, size), Image.BILINEAR), image.shape[-1])


def random_crop(image: np.ndarray, padding: int, rng: np.random.Generator) -> np.ndarray:
    """Pad by `padding` pixels on every side (reflecting the border) and crop the original size back out."""
    h, w = image.shape[:2]
    padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)), mode="reflect")
    top, left = rng.integers(0, 2 * padding + 1, size=2)
    return padded[top : top + h, left : left + w]


def normalize(image: np.ndarray, mean, std) -> np.ndarray:
    """uint8 -> float32 in [0, 1], then (x - mean) / std per channel (a single value serves every channel)."""
    x = image.astype(np.float32) / 255.0
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


class ImageExamples:
    """record (+ its global index) -> {"image", "labels", "label_weights"}, augmented when training."""

    def __init__(self, config, train: bool):
        d = config.data
        if d.image_size <= 0:
            raise DataError("images need config.data.image_size (height = width after resizing), e.g. 8 for digits")
        if d.channels not in (1, 3):
            raise DataError(f"config.data.channels={d.channels}: use 1 (grey) or 3 (RGB)")
        for key in ("image_mean", "image_std"):
            if len(d[key]) not in (1, d.channels):
                raise DataError(f"config.data.{key} has {len(d[key])} values; give 1 or config.data.channels")
        self.size, self.channels = d.image_size, d.channels
        self.mean, self.std = tuple(d.image_mean), tuple(d.image_std)
        self.crop_padding = d.crop_padding if train else 0
        self.flip = d.random_flip and train
        self.seed = config.seed
        self.skip_bad = d.skip_bad
        self.bad = 0

    def __call__(self, index: int, record: dict) -> dict:
        try:
            image = resize(decode(record["image"], self.channels), self.size)
            weight = 1.0
        except DataError:
            if not self.skip_bad:
                raise
            self._count_bad(record["image"])
            image, weight = np.zeros((self.size, self.size, self.channels), np.uint8), 0.0
        if self.crop_padding or self.flip:
            rng = np.random.default_rng((self.seed, index))
            if self.crop_padding:
                image = random_crop(image, self.crop_padding, rng)
            if self.flip and rng.random() < 0.5:
                image = image[:, ::-1]
        return {
            "image": normalize(image, self.mean, self.std),
            "labels": np.int32(record["label"]),
            "label_weights": np.float32(weight),
        }

    def _count_bad(self, image) -> None:
        self.bad += 1
        where = image if isinstance(image, str) else "an encoded image"
        metrics.say(f"data: cannot decode {where}; it gets weight 0 (config.data.skip_bad; {self.bad} so far)")
