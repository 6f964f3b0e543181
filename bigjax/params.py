"""Parameter paths: the "/"-joined names of a parameter tree's leaves, and regex selections over them.

    layers/attention/query/kernel      classifier/bias      embed/embedding

Fine-tuning (`init_from.include/exclude`, `freeze`) and the optimizer (weight-decay masks, frozen parameters)
name parameters this way. Scanned layers are one stacked array each, so one name covers every layer. A LoRA
adapter is named after its kernel: `layers/attention/query/kernel_lora_a` and `..._lora_b`.
"""

from __future__ import annotations

import re

import jax
from flax.core.meta import AxisMetadata


def param_path(keypath) -> str:
    """A jax key path -> "layers/attention/query/kernel" (Flax's boxing `.value` left out)."""
    names = []
    for key in keypath:
        name = getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))
        if name != "value" or not isinstance(key, jax.tree_util.GetAttrKey):
            names.append(str(name))
    return "/".join(names)


def leaf_name(keypath) -> str:
    """The last name of the path: "kernel", "bias", "embedding", "scale"..."""
    return param_path(keypath).rpartition("/")[2]


def matches(params, pattern: str):
    """A tree like `params` of bools: does the parameter's path match `pattern` (re.search)? '' matches none.

    Flax's logical-axis boxes count as leaves, so that optax's masks (freeze) replace a boxed parameter whole.
    """
    regex = re.compile(pattern) if pattern else None
    return jax.tree_util.tree_map_with_path(
        lambda path, _: bool(regex and regex.search(param_path(path))),
        params,
        is_leaf=lambda x: isinstance(x, AxisMetadata),
    )


def by_path(tree) -> dict:
    """{"layers/attention/query/kernel": leaf, ...}"""
    return {param_path(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def boxes_by_path(tree) -> dict:
    """Like `by_path`, for a tree of Flax's logical-axis boxes: {"layers/mlp/up/kernel": LogicallyPartitioned}."""
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, AxisMetadata))[0]
    return {param_path(path): leaf for path, leaf in leaves}


def nest(flat: dict) -> dict:
    """{"a/b/c": x} -> {"a": {"b": {"c": x}}}: the tree a "/"-named selection of parameters restores into."""
    tree = {}
    for name, value in flat.items():
        *parents, leaf = name.split("/")
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return tree


ADAPTERS = r"_lora_[ab]$"  # the paths of LoRA's adapters (bigjax.compress.quantized)
