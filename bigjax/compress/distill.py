"""Knowledge distillation: a student learns from a teacher run's soft targets as well as from the data's labels.

    config.distill = dict(teacher="runs/teacher", step=0, temperature=2.0, alpha=0.5)
    bigjax train --config experiments/shakespeare_char.py --workdir runs/student \\
        --config.distill.teacher=runs/teacher --config.distill.temperature=2

The loss the student follows, at every token (causal LM), chosen position (masked LM) or example (classification)
that its own loss counts, with that position's weight (padding, unused prediction slots and packed segments count
for nothing, as in the hard loss):

    alpha * T^2 * KL(softmax(teacher_logits / T) || softmax(student_logits / T)) + (1 - alpha) * hard loss

(Hinton et al. 2015: T^2 keeps the soft term's gradients at the scale of the hard one's as T changes.) The KL is
optax's `kl_divergence_with_log_targets` of the two log-softmaxes, in fp32, over the whole (padded) vocabulary or
class set: both models pad the vocabulary alike, or the run is refused.

Decisions:

- `config.distill` is a section of its own beside `config.init_from`: both name another run's workdir and a step
  of it (0 = the newest); `teacher=""` turns distillation off, and then nothing of this module is reached: the
  train step is the one without it, bit for bit.
- The teacher is built from its own saved config (WORKDIR/config.json: its family, size and dtypes), with this
  run's data settings (sequence length, packing, image size), since it reads this run's batches. Its variables are
  restored from its checkpoint onto this run's mesh, each sharded by its logical axis names under this run's rules
  (`bigjax.run.state.abstract_state_and_shardings` with an optimizer that keeps nothing): like the student's, and no
  array of it exists whole on one device.
- The teacher's variables are not part of the TrainState: no optimizer state, no gradient (they are an argument of
  the jitted step that `jax.grad` does not differentiate, and their logits pass through `stop_gradient` besides),
  and they are not saved in the student's checkpoints. A resume reads them again from the teacher's workdir, from
  the same step: `pin_teacher_step` writes the step a run started with into its config (config.json and every
  checkpoint's config), so a teacher that has saved newer checkpoints since does not change a resumed run. A
  resume is bit-exact as long as that checkpoint of the teacher is unchanged.
- The teacher runs in inference mode (no dropout; BatchNorm with its saved statistics), in its own compute dtype.
  A masked LM's teacher reads the student's corrupted rows and predicts at the same chosen positions; a chunked
  causal-LM loss (`task.loss_chunk`) makes the teacher's logits a piece at a time too.
- Evaluation (inline and `bigjax eval`) reports the student's own loss as before and never needs the teacher. In
  training, `loss` is the distilled loss the optimizer follows; `hard_loss` is the task's own loss and `distill_kl`
  the mean KL at temperature T (without the T^2), both per counted token or example.
- Refused, each with one `error:` line: a teacher workdir without a saved config or committed checkpoints, a
  Hugging Face directory (import it first), this run's own workdir, another task, another vocabulary (tokenizer,
  vocabulary size or its padding), another number of classes, a model that cannot read this run's batches.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from bigjax import paths, tasks
from bigjax.config import ConfigError
from bigjax.ops import metrics
from bigjax.run import checkpoint
from bigjax.run import state as state_lib
from bigjax.run.workdir import Run

HF_PREFIX = "hf:"


@dataclasses.dataclass(frozen=True)
class Teacher:
    """The teacher of a distillation run on this run's mesh: its task (its model), its variables' shapes and
    shardings, and the soft-target settings. Nothing is loaded until `load()`."""

    workdir: str
    config: ml_collections.ConfigDict  # the teacher's own saved config, with this run's data settings
    task: Any
    abstract_variables: dict  # ShapeDtypeStructs
    variable_shardings: dict  # a NamedSharding for each leaf, on the student's mesh
    temperature: float
    alpha: float
    step: int  # the checkpoint of the teacher this run distills from

    def variables_target(self) -> dict:
        return state_lib.restore_target(self.abstract_variables, self.variable_shardings)

    def load(self) -> dict:
        """The teacher's variables, restored from its checkpoint straight into their shards on this run's mesh."""
        variables = Run(self.workdir).restore_variables(self.step, self.variables_target())
        count = state_lib.count_parameters(variables["params"])
        metrics.say(
            f"distill: teacher {self.workdir} step {self.step} ({count / 1e6:.2f}M parameters), "
            f"temperature {self.temperature}, alpha {self.alpha}"
        )
        return variables

    def in_step(self, variables) -> TeacherInStep:
        """What a task's loss needs of the teacher inside the traced step, its variables there as given."""
        return TeacherInStep(self.task, variables, self.temperature, self.alpha)


@dataclasses.dataclass(frozen=True)
class TeacherInStep:
    """The teacher as a task's `loss_sums(..., teacher=...)` sees it, inside the jitted step."""

    SUMS = ("hard_loss", "distill_kl")  # the sums it adds: the task's own loss, and the KL at temperature T

    task: Any
    variables: dict
    temperature: float
    alpha: float

    @property
    def params(self) -> dict:
        return self.variables["params"]

    def distilled_sums(self, sums: dict, student_logits, teacher_logits, weights) -> dict:
        """The task's `sums` (its "loss" the sum of its weighted hard losses) with "loss" replaced by the distilled
        loss over the same weighted positions, and the two parts beside it (see the module docstring)."""
        soft = soft_target_losses(student_logits, teacher_logits, self.temperature)
        kl = jnp.sum(soft * weights.astype(jnp.float32))
        hard = sums["loss"]
        loss = self.alpha * self.temperature**2 * kl + (1.0 - self.alpha) * hard
        return {**sums, "loss": loss, "hard_loss": hard, "distill_kl": kl}


def soft_target_losses(student_logits, teacher_logits, temperature: float):
    """KL(softmax(teacher / T) || softmax(student / T)) at each position [...], in fp32; the teacher is a constant."""
    teacher_logits = jax.lax.stop_gradient(teacher_logits)
    log_student = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    log_teacher = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
    return optax.losses.kl_divergence_with_log_targets(log_student, log_teacher)


# --------------------------------------------------------------------------------------------------
# The teacher of a run, checked against it


def make_teacher(config, sharding, student_task) -> Teacher | None:
    """config.distill's teacher on `sharding` (this run's mesh and rules), checked against this run and its task;
    None when distillation is off. Reads the teacher's config and its checkpoint's metadata, no array."""
    d = config.distill
    if not d.teacher:
        return None
    teacher_config = teacher_config_for(config)
    step = teacher_step(d.teacher, d.step)
    task = tasks.make_task(teacher_config)
    refuse_unreadable_batches(config, student_task, teacher_config, task)
    init = state_lib.boxed_init(task, optax.identity(), 0)  # no optimizer state: optax.identity keeps none
    try:
        abstract_state, shardings = state_lib.abstract_state_and_shardings(init, sharding)
    except ConfigError as error:  # a dimension of the teacher's that this mesh cannot split
        raise ConfigError(f"{_named(d.teacher)}: the teacher's {error}") from None
    refuse_other_layouts(d.teacher, step, abstract_state)
    abstract, shardings = state_lib.model_variables(abstract_state), state_lib.model_variables(shardings)
    return Teacher(d.teacher, teacher_config, task, abstract, shardings, d.temperature, d.alpha, step)


def teacher_config_for(config) -> ml_collections.ConfigDict:
    """The teacher's saved config, checked against this run's, with this run's data settings (it reads this run's
    batches) and without a chunked loss of its own (the student's task decides how logits are made)."""
    d = config.distill
    name = _named(d.teacher)
    if d.teacher.startswith(HF_PREFIX):
        raise ConfigError(
            f"{name}: a Hugging Face model teaches through a workdir: `bigjax import --hf "
            f"{d.teacher.removeprefix(HF_PREFIX)} --workdir DIR` first, then config.distill.teacher=DIR"
        )
    try:
        saved = Run(d.teacher).saved_config()
    except ConfigError as error:
        raise ConfigError(f"{name}: {error}") from None
    if saved.task.name != config.task.name:
        raise ConfigError(
            f"{name} was trained for task.name={saved.task.name!r}, this run for {config.task.name!r}; "
            "a teacher must do the student's task"
        )
    if config.task.name == "classification":
        if saved.task.num_classes != config.task.num_classes:
            raise ConfigError(
                f"{name} has {saved.task.num_classes} classes, this run {config.task.num_classes}; "
                "a teacher must classify into the student's classes"
            )
    else:
        refuse_another_vocabulary(name, saved, config)
    teacher = saved.copy_and_resolve_references()
    teacher.data = config.data.copy_and_resolve_references()
    teacher.task.loss_chunk = 0
    max_len = teacher.model.get("max_len")
    if max_len is not None and config.data.seq_len > max_len:
        raise ConfigError(
            f"{name}: its model reads at most {max_len} positions (model.max_len), this run's rows are "
            f"config.data.seq_len={config.data.seq_len}; shorten them or pick a teacher with a longer max_len"
        )
    return teacher


def refuse_another_vocabulary(name: str, saved, config) -> None:
    """Soft targets are distributions over token ids: both models must mean the same token by each id, and have
    the same (padded) number of them."""
    tokenizers = saved.data.tokenizer, config.data.tokenizer
    if tokenizers[0] != tokenizers[1]:
        raise ConfigError(
            f"{name} has another vocabulary: its tokenizer is {tokenizers[0]!r}, this run's {tokenizers[1]!r}; "
            "a teacher must share the student's tokenizer"
        )
    sizes = saved.model.vocab_size, config.model.vocab_size
    if sizes[0] != sizes[1]:
        raise ConfigError(
            f"{name} has another vocabulary: model.vocab_size={sizes[0]}, this run's {sizes[1]}; set "
            f"config.model.vocab_size={sizes[0]} or pick a teacher of the same vocabulary"
        )
    multiples = saved.model.vocab_multiple, config.model.vocab_multiple
    padded = [-(-sizes[0] // m) * m for m in multiples]
    if padded[0] != padded[1]:
        raise ConfigError(
            f"{name} pads its vocabulary to {padded[0]} entries (model.vocab_multiple={multiples[0]}), this run "
            f"to {padded[1]}; set config.model.vocab_multiple={multiples[0]}"
        )


def refuse_unreadable_batches(config, student_task, teacher_config, teacher_task) -> None:
    """The teacher reads the student's batches: their layouts must be the same (a text teacher for an image
    student, or the other way round, cannot)."""
    layout = lambda task: {key: (s.shape, s.dtype) for key, s in task.batch_spec(1).items()}
    if layout(student_task) != layout(teacher_task):
        raise ConfigError(
            f"{_named(config.distill.teacher)}: its model ({teacher_config.model.family}) reads batches of "
            f"{_describe(teacher_task)}, this run's are {_describe(student_task)}; pick a teacher of the same kind "
            "of input"
        )


def refuse_other_layouts(workdir: str, step: int, abstract_state) -> None:
    """The teacher's checkpoint must hold the arrays its model, built for this run's data, has (its optimizer
    state is not read): a ViT teacher at another image size (other position embeddings) cannot read this run's
    images, say. Compared by Orbax's metadata, before any array is read."""
    differences = checkpoint.layout_differences(Run(workdir).step_dir(step), abstract_state, shown=3)
    differences = [d for d in differences if not d.startswith("opt_state")]
    if differences:
        raise ConfigError(
            f"{_named(workdir)}: its checkpoint {step} does not fit its model as built for this run's data: "
            f"{'; '.join(differences)}"
        )


def teacher_step(workdir: str, step: int) -> int:
    """`step` if the teacher has committed it; its newest committed step for 0."""
    try:
        return Run(workdir).committed_step(step or None)
    except checkpoint.CheckpointError as error:
        raise ConfigError(f"{_named(workdir)}: {error} (config.distill.step=0 takes the newest)") from None


def pin_teacher_step(config, workdir) -> ml_collections.ConfigDict:
    """`config` with distill.step set to the teacher step this run uses, for a trainer in `workdir`.

    A run resumed with distill.step=0 keeps the step its config.json recorded when it started (the same teacher),
    so that it goes on as it began even if the teacher has saved newer checkpoints since; a new run takes the
    teacher's newest. The pinned step is written to config.json and every checkpoint's config with the rest.
    """
    d = config.distill
    if not d.teacher:
        return config
    if not d.teacher.startswith(HF_PREFIX) and _same_dir(d.teacher, workdir):
        raise ConfigError(
            f"config.distill.teacher={d.teacher} is this run's own workdir; a teacher is another, finished run"
        )
    step = d.step or _recorded_step(workdir, d.teacher)
    if not d.teacher.startswith(HF_PREFIX):
        step = teacher_step(d.teacher, step)
    pinned = config.copy_and_resolve_references()
    pinned.distill.step = step
    return pinned


def _recorded_step(workdir, teacher: str) -> int:
    """The teacher step the run in `workdir` started with, if it distilled from the same teacher; 0 otherwise."""
    try:
        saved = Run(workdir).saved_config()
    except ConfigError:
        return 0  # a new run (or a config.json a resume rewrites anyway): the teacher's newest
    recorded = saved.distill
    return recorded.step if recorded.teacher and _same_dir(recorded.teacher, teacher) else 0


def _same_dir(a: str, b) -> bool:
    if paths.is_url(a) or paths.is_url(b):
        return str(a).rstrip("/") == str(b).rstrip("/")
    return paths.workdir(a).resolve() == paths.workdir(b).resolve()


def _named(workdir: str) -> str:
    return f"config.distill.teacher={workdir}"


def _describe(task) -> str:
    return ", ".join(f"{key} {tuple(s.shape[1:])}" for key, s in task.batch_spec(1).items())
