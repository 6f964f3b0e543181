"""A run's setup, built once from its config: where it runs (the mesh with its rules), what it learns (the task
and its model), how (the optimizer, frozen parameters included), and the shapes and shardings of its state.

    setup = make_setup(config)                      # on the devices present
    setup = make_setup(config, num_devices=64)      # on devices that are not (an AbstractMesh: `bigjax plan`)

`train`, `eval`, `generate`, `plan` and `bench` all start here, so what `plan` counts and `bench` times is the
step `train` runs. Nothing is allocated: the state is abstract until `init_state()` creates it in its shards.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import optax

from bigjax import tasks
from bigjax.compress import distill, prune, quantized
from bigjax.compress.variant import Variant
from bigjax.parallel import mesh as mesh_lib
from bigjax.run import optim
from bigjax.run import state as state_lib


@dataclasses.dataclass(frozen=True)
class Setup:
    config: ml_collections.ConfigDict
    sharding: mesh_lib.Sharding
    task: Any  # bigjax.tasks: the model, the batch layout, the loss and the metrics
    tx: optax.GradientTransformation
    abstract_state: state_lib.TrainState  # ShapeDtypeStructs
    state_shardings: state_lib.TrainState  # a NamedSharding for each leaf
    init: Callable[[], state_lib.TrainState]  # creates the boxed state (state_lib.boxed_init): traced once for both

    @property
    def mesh(self):
        return self.sharding.mesh

    @property
    def variant(self) -> Variant:
        """Which model the run is (float, QAT, PTQ, LoRA, QLoRA), made once with the task: ask it, not the config."""
        return self.task.variant

    @functools.cached_property
    def teacher(self) -> distill.Teacher | None:
        """config.distill's teacher on this mesh (its task, its variables' shapes and shardings), or None when
        distillation is off. Made, and checked against this run, when first asked for: by the train step that
        train, plan and bench build; eval and generation never need the teacher's workdir."""
        return distill.make_teacher(self.config, self.sharding, self.task)

    def boxed_params(self) -> dict:
        """The parameters' shapes with their logical-axis boxes (and a quantized model's Qwix `WithAux` nodes,
        which say how each kernel is quantized): what bigjax.compress.quantized converts by."""
        with self.sharding.activate():
            return jax.eval_shape(self.init).params  # the trace make_setup made: jax's cache holds it

    def init_state(self) -> state_lib.TrainState:
        """A fresh state, created directly in its shards."""
        return state_lib.create_sharded_state(self.init, self.sharding, self.state_shardings)

    def state_target(self) -> state_lib.TrainState:
        """The state as ShapeDtypeStructs with their shardings: what a checkpoint is restored onto, or a step
        lowered for."""
        return state_lib.restore_target(self.abstract_state, self.state_shardings)

    @property
    def variable_shardings(self) -> dict:
        return state_lib.model_variables(self.state_shardings)

    def variables_target(self) -> dict:
        """The model's variables alone, like `state_target`: what eval, generation and fine-tuning restore."""
        return state_lib.model_variables(self.state_target())


def make_setup(config, devices=None, num_devices: int | None = None) -> Setup:
    """The setup of `config` on `devices` (default: all present), or on `num_devices` that need not exist."""
    sharding = mesh_lib.Sharding.from_config(config, devices, num_devices)
    task = tasks.make_task(config)
    variant = task.variant
    if variant.inference_only:
        # Integer weights are run, never trained: no optimizer state (a quantized workdir holds parameters alone),
        # and no pruning (a pruned run's zeros quantize to exact zeros).
        tx = optax.set_to_zero()
    else:
        pruning = prune.from_config(config, task)  # None unless config.prune.kind is set
        frozen = functools.partial(variant.frozen, freeze=config.freeze) if variant.freezes_any(config.freeze) else None
        tx = optim.make_optimizer(config.optim, config.total_steps, frozen=frozen, prune=pruning)
    init = state_lib.boxed_init(task, tx, config.seed)
    abstract_state, state_shardings = state_lib.abstract_state_and_shardings(init, sharding)
    quantized.check_lora(variant, config.freeze, abstract_state.params)
    return Setup(config, sharding, task, tx, abstract_state, state_shardings, init)
