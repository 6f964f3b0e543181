"""The device mesh, the logical-axis rules, and the shardings derived from them.

Models name their axes logically (`embed`, `mlp`, `heads`, ...); the rules in the config map those names to
the mesh axes `data`, `fsdp`, `tensor`, `context` (the sequence), `expert` (a MoE layer's experts) and `stage` (the
layers, bigjax.parallel.pipeline). Nothing else in bigjax mentions a mesh axis
(but bigjax.parallel, whose collectives name the axis the rules map to). The two travel together
as one `Sharding`: `sharding.activate()` to trace, `.batch` and `.replicated` for inputs and outputs, `.of(tree)`
for a tree of parameters, `.global_batch(host_batch)` for data.
"""

from __future__ import annotations

import contextlib
import dataclasses

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AbstractMesh, AxisType, NamedSharding, PartitionSpec

from bigjax import config as config_lib

MESH_AXES = ("data", "fsdp", "tensor", "context", "expert", "stage")
# The examples of a batch are split over the data-parallel axes; `expert` is one of them outside a MoE layer's experts.
BATCH_AXES = ("data", "fsdp", "expert")


def make_abstract_mesh(config, num_devices: int) -> AbstractMesh:
    """The mesh config.mesh gives on `num_devices` devices that need not exist (for `bigjax plan`)."""
    shape = config_lib.check_against_devices(config, num_devices)
    return AbstractMesh(
        tuple(shape[axis] for axis in MESH_AXES), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES)
    )


def make_mesh(config, devices=None) -> jax.sharding.Mesh:
    """A mesh of `devices` (default: all) shaped by config.mesh, after checking it fits."""
    devices = jax.devices() if devices is None else list(devices)
    shape = config_lib.check_against_devices(config, len(devices))
    sizes = tuple(shape[axis] for axis in MESH_AXES)
    # Auto axes: sharding propagates through plain code; explicit axes would demand annotations everywhere.
    return jax.make_mesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def logical_rules(config) -> tuple:
    """The rule table from config, with JSON lists turned back into tuples."""
    return tuple(
        (name, tuple(axes) if isinstance(axes, (list, tuple)) else axes) for name, axes in config.sharding_rules
    )


@contextlib.contextmanager
def activate(mesh, rules):
    """Trace under this so `nn.with_logical_constraint` in the models resolves to the mesh.

    An AbstractMesh (sizes and names, no devices: `bigjax plan` for devices not present) works for shapes
    and shardings, never for running anything.
    """
    use_mesh = jax.sharding.use_abstract_mesh if isinstance(mesh, AbstractMesh) else jax.set_mesh
    with use_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def shardings_from_logical(boxed_abstract_tree, mesh, rules):
    """NamedShardings for a pytree whose leaves carry Flax logical-partitioning metadata.

    Leaves without names are replicated, and so are leaves whose names do not fit their rank: optimizers
    such as Adafactor keep factored moments that inherit a parameter's names but not its shape.
    """
    specs = nn.get_partition_spec(boxed_abstract_tree)
    leaves = nn.unbox(boxed_abstract_tree)
    specs = jax.tree.map(
        lambda spec, leaf: spec if len(spec) <= leaf.ndim else PartitionSpec(),
        specs,
        leaves,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )
    shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
    jax.tree_util.tree_map_with_path(_check_divisible, leaves, shardings)
    return shardings


def _check_divisible(path, leaf, sharding) -> None:
    """A dimension split over mesh axes must divide evenly: say which parameter and which axes, before XLA does."""
    for dim, (size, axes) in enumerate(zip(leaf.shape, sharding.spec, strict=False)):  # a spec may be shorter
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        ways = int(np.prod([sharding.mesh.shape[a] for a in axes]))
        if size % ways:
            name = jax.tree_util.keystr(path, simple=True, separator="/")
            raise config_lib.ConfigError(
                f"{name} has size {size} in dimension {dim}, which does not split over mesh axes "
                f"{'x'.join(axes)}={ways}; change config.mesh or the model size "
                "(or map that logical axis to no mesh axis in config.sharding_rules)"
            )


def batch_sharding(mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def global_batch_from_host(host_batch: dict, mesh) -> dict:
    """This process's rows of the batch -> global jax.Arrays sharded over the data-parallel axes."""
    sharding = batch_sharding(mesh)
    return {
        key: jax.make_array_from_process_local_data(sharding, np.asarray(value)) for key, value in host_batch.items()
    }


def describe(mesh) -> str:
    return " x ".join(f"{name}={size}" for name, size in mesh.shape.items()) + f" ({mesh.devices.size} devices)"


@dataclasses.dataclass(frozen=True)
class Sharding:
    """A mesh with its logical-axis rules: how every logical name lands on the devices."""

    mesh: jax.sharding.Mesh | AbstractMesh
    rules: tuple

    @classmethod
    def from_config(cls, config, devices=None, num_devices: int | None = None) -> Sharding:
        """On `devices` (default: all), or on `num_devices` devices that need not exist (an AbstractMesh)."""
        mesh = make_abstract_mesh(config, num_devices) if num_devices else make_mesh(config, devices)
        return cls(mesh, logical_rules(config))

    def activate(self):
        return activate(self.mesh, self.rules)

    @property
    def batch(self) -> NamedSharding:
        return batch_sharding(self.mesh)

    @property
    def replicated(self) -> NamedSharding:
        return replicated(self.mesh)

    def of(self, boxed_abstract_tree):
        """The NamedShardings of a tree whose leaves carry logical axis names."""
        return shardings_from_logical(boxed_abstract_tree, self.mesh, self.rules)

    def global_batch(self, host_batch: dict) -> dict:
        return global_batch_from_host(host_batch, self.mesh)

    def describe(self) -> str:
        return describe(self.mesh)
