"""A family's mapping, written once and read both ways: a table of entries, each a bigjax parameter path and the
Hugging Face tensor it is, with the change of layout between them (transposed, axes permuted, an axis split into
heads) as a pair: `view` turns the HF tensor's lazy View into bigjax's layout (import), `array` turns bigjax's array
back (export). As Levanter's state-dict key maps, one table serves `bigjax import` and `bigjax export`, so the two
cannot drift apart; tests/test_hf_mapping.py checks that export then import gives back every parameter.

    Tensor(path, hf, layout)          one parameter is one HF tensor
    Fused(paths, hf, layouts)         several parameters side by side along the HF tensor's last axis (GPT-2's q|k|v)
    Constant(hf, value)               an HF tensor transformers needs that bigjax has no parameter for (export only)

A family module may add its own entry kind with the same four members (paths, hf_names, views, arrays): ViT's class
token, which is two HF tensors folded into one parameter. `index` places an entry in a stacked array (ResNet's
scanned blocks); `optional` marks a head one architecture has and another lacks, mapped where both sides have it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from bigjax.hf import files


@dataclasses.dataclass(frozen=True)
class Layout:
    """One change of layout and its inverse: `view` (HF -> bigjax, on a lazy View), `array` (bigjax -> HF)."""

    view: Callable[[files.View], files.View]
    array: Callable[[np.ndarray], np.ndarray]


# torch's nn.Linear stores [out, in], bigjax's kernels [in, out].
TRANSPOSED = Layout(lambda view: view.T, lambda array: array.T)


def permuted(*axes: int) -> Layout:
    """The axes permuted as numpy's transpose(axes) (torch's conv kernel [out, in, kh, kw] -> Flax's [kh, kw, in, out]
    is permuted(2, 3, 1, 0)); back by the inverse permutation."""
    inverse = tuple(int(a) for a in np.argsort(axes))
    return Layout(lambda view: view.transpose(*axes), lambda array: array.transpose(inverse))


def split(axis: int, sizes: tuple[int, ...]) -> Layout:
    """Axis `axis` split into `sizes` ([d, h*hd] -> [d, h, hd]); back by merging them."""

    def merged(array: np.ndarray) -> np.ndarray:
        return array.reshape(array.shape[:axis] + (-1,) + array.shape[axis + len(sizes) :])

    return Layout(lambda view: view.split_axis(axis, sizes), merged)


def to_bigjax(view: files.View, layout: tuple[Layout, ...]) -> files.View:
    for step in layout:
        view = step.view(view)
    return view


def to_hf(array: np.ndarray, layout: tuple[Layout, ...]) -> np.ndarray:
    for step in reversed(layout):
        array = step.array(array)
    return array


@dataclasses.dataclass(frozen=True)
class Tensor:
    path: str
    hf: str
    layout: tuple[Layout, ...] = ()
    index: int | None = None
    optional: bool = False

    @property
    def paths(self) -> tuple[str, ...]:
        return (self.path,)

    @property
    def hf_names(self) -> tuple[str, ...]:
        return (self.hf,)

    def views(self, read) -> dict:
        return {self.path: to_bigjax(read(self.hf), self.layout)}

    def arrays(self, get) -> dict:
        return {self.hf: to_hf(get(self.path), self.layout)}


@dataclasses.dataclass(frozen=True)
class Fused:
    """Parameters side by side, in equal widths, along the last axis of one HF tensor, each with its own layout."""

    paths: tuple[str, ...]
    hf: str
    layout: tuple[Layout, ...] = ()
    index: int | None = None
    optional: bool = False

    @property
    def hf_names(self) -> tuple[str, ...]:
        return (self.hf,)

    def views(self, read) -> dict:
        fused = read(self.hf)
        width = fused.shape[-1] // len(self.paths)
        return {
            path: to_bigjax(fused.columns(k * width, (k + 1) * width), self.layout) for k, path in enumerate(self.paths)
        }

    def arrays(self, get) -> dict:
        return {self.hf: np.concatenate([to_hf(get(path), self.layout) for path in self.paths], axis=-1)}


@dataclasses.dataclass(frozen=True)
class Constant:
    """An HF tensor with no bigjax parameter behind it: export writes `value`, import reads nothing."""

    hf: str
    value: np.ndarray
    index: int | None = None
    optional: bool = False
    paths: tuple[str, ...] = ()

    @property
    def hf_names(self) -> tuple[str, ...]:
        return (self.hf,)

    def views(self, read) -> dict:
        return {}

    def arrays(self, get) -> dict:
        return {self.hf: self.value}


def rooted(names: tuple[str, ...], root: str) -> tuple[str, ...]:
    return tuple(root + name for name in names)


def views(table, read) -> dict[str, files.View]:
    """Import: {bigjax path: lazy view of the HF tensors} of a table (entries with an `index` stacked in order). An
    optional entry whose HF tensors are not all there is left out; any other missing tensor is read's HFError."""
    found, stacks = {}, {}
    for entry in table:
        if entry.optional and not all(read.has(name) for name in entry.hf_names):
            continue
        for path, view in entry.views(read).items():
            if entry.index is None:
                found[path] = view
            else:
                stacks.setdefault(path, []).append(view)
    return found | {path: files.stack(stacked) for path, stacked in stacks.items()}


def arrays(table, get: Callable[[str], np.ndarray], has: Callable[[str], bool]) -> dict[str, np.ndarray]:
    """Export: {HF name: array} of a table, from `get(path)` (an entry with an `index` takes that row of its stacked
    array). An optional entry whose parameters the run lacks (`has`) is left out."""
    out = {}
    for entry in table:
        if entry.optional and not all(has(path) for path in entry.paths):
            continue
        if entry.index is None:
            out |= entry.arrays(get)
        else:
            out |= entry.arrays(lambda path, index=entry.index: get(path)[index])
    return out
