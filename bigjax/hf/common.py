"""What every Hugging Face family module uses: the error, the refusals, labels, and the view of a run's parameters."""

from __future__ import annotations

import numpy as np

from bigjax.errors import UserError


class HFError(UserError):
    """A Hugging Face directory bigjax cannot read or represent, or a run it cannot export: a message for the user."""


def refuse(field: str, value, why: str):
    raise HFError(f"config.json {field}={value!r}: {why}; bigjax cannot import this model")


def require(hf: dict, field: str, allowed, default, why: str):
    value = hf.get(field, default)
    if value not in allowed:
        refuse(field, value, why)


def num_labels(hf: dict) -> int:
    """A classifier's number of classes, as transformers counts them."""
    return len(hf["id2label"]) if hf.get("id2label") else int(hf.get("num_labels", 2))


def labels(num_classes: int) -> dict:
    """config.json's label names for a classifier of `num_classes` (transformers' defaults)."""
    return dict(
        id2label={str(i): f"LABEL_{i}" for i in range(num_classes)},
        label2id={f"LABEL_{i}": i for i in range(num_classes)},
    )


def set_image_data(config, hf: dict, image_size: int, mean, std) -> None:
    """An imported image model's data settings: its resolution, channels and pixel normalization (the model's own
    preprocessor_config.json overrides mean and std in bigjax.hf.convert); the images themselves are named when
    training."""
    config.data.update(
        source="synthetic",  # name the images when training (--config.data.source=...)
        image_size=image_size,
        channels=int(hf.get("num_channels", 3)),
        image_mean=mean,
        image_std=std,
    )


def layer_stacks(m) -> list[tuple[str, int, int]]:
    """(prefix, first layer, end) of each stack the Transformer layers of model config `m` are scanned in, as
    bigjax.models.gpt stacks them: `layers`, or a MoE's `dense_layers` and `moe_layers`; none for a model without
    Transformer layers."""
    from bigjax.models import gpt

    if "num_layers" not in m:
        return []
    moe = m.get("moe")
    first_dense = moe.first_dense_layers if moe and moe.num_experts else None
    return [(name, start, stop) for name, start, stop, _ in gpt.layer_stacks(m.num_layers, first_dense)]


def layer_slot(m, i: int) -> tuple[str, int]:
    """(the prefix of the stack holding layer i when scanned, its place in that stack)."""
    return next((name, i - start) for name, start, stop in layer_stacks(m) if start <= i < stop)


class Params:
    """A run's parameters by "/" path, brought to the host as numpy arrays when first read (`fetch`: a gather
    across processes for arrays split over several hosts); `layer(i, sub, slot)` reads layer i's whether the layers
    are scanned (one array stacked over a leading axis: `layers/...`, or where layer_slot places it) or unrolled
    (`layers_I/...`)."""

    def __init__(self, flat: dict, fetch=np.asarray):
        self.flat, self.fetch, self.fetched = flat, fetch, {}

    def __getitem__(self, path: str) -> np.ndarray:
        if path not in self.fetched:  # once each: a stacked array serves every layer
            self.fetched[path] = np.asarray(self.fetch(self.flat[path]))
        return self.fetched[path]

    def __contains__(self, path: str) -> bool:
        return path in self.flat

    def layer(self, i: int, sub: str, slot: tuple[str, int] | None = None) -> np.ndarray:
        name, place = slot or ("layers", i)
        stacked = f"{name}/{sub}"
        return self[stacked][place] if stacked in self.flat else self[f"layers_{i}/{sub}"]
