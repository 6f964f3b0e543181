"""Pipeline parallelism: a stack of layers cut into stages over the mesh axis `stage`, micro-batches streamed through.

The layers' weights are stacked along a leading `layers` axis (a scanned stack, `model.scan_layers`), and are kept,
saved and restored in that layout whatever the pipeline: the checkpoint of a pipelined run is that of any run. Only
inside the step are they regrouped, [layers, ...] -> [stages, repeats, layers per group, ...], and handed to a
`jax.shard_map` that is manual over `stage`: each device holds its stage's groups and runs them, every stage at once
as one SPMD program (what MaxText writes as a `vmap` over the stage-stacked weights; under shard_map each device's
slice is one stage, so the map is the program itself). After each iteration every stage hands its activations to
the next with `jax.lax.ppermute`; the iterations run in a `jax.lax.scan`, so the program holds one iteration, and
each block inside is rematerialized by the model's remat policy (run_group's business).

Schedules. Layer l belongs to group l // per_group; group g runs on stage g % stages, in pass g // stages.
- `gpipe` (repeats = 1): stage s holds the consecutive layers of group s. Micro-batch m enters stage 0 at
  iteration m and leaves the last stage at iteration m + stages - 1.
- `circular` (repeats = r > 1): stage s holds groups s, s + stages, ..., which are not adjacent; a micro-batch goes
  round the ring of stages r times. Stage 0 starts pass p of micro-batch m at iteration p * microbatches + m; what
  comes back from the last stage waits in `held` until then (microbatches >= stages, so it is never late).
In both, stage s at iteration t works on micro-batch (t - s) mod microbatches, pass (t - s) // microbatches, when
0 <= t - s < repeats * microbatches; the other slots are the bubble, and the fraction of them is
(stages - 1) / (repeats * microbatches + stages - 1).

A bubble slot computes on zeros, never on what its slot held: a NaN or inf there (tests fill the slots with NaN)
would otherwise reach the weights' gradients through 0 x NaN. Its results are never selected into anything.

Why the stored layout costs the circular schedule a transfer: the weights are split over `stage` along `layers` in
equal consecutive blocks (the rule `layers -> stage`), which is exactly gpipe's grouping, so regrouping them moves
nothing; circular stages hold non-adjacent groups, so XLA moves each group to its stage once a step (and the
gradients back; on the CPU its partitioner replicates them on the way), traffic of the order of FSDP's gathering of
the layers, in exchange for the smaller bubble.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

STAGE_AXIS = "stage"
# The value the bubble slots start with. Tests set it to NaN, to prove that no bubble reaches a result.
BUBBLE_FILL = 0.0


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """model.pipeline, resolved: micro-batches per step (0 = as many as stages), the schedule, and (circular) how
    many passes round the stages a micro-batch makes."""

    microbatches: int = 0
    schedule: str = "gpipe"
    repeats: int = 1


def stage_count() -> int:
    """How many devices the mesh axis `stage` has in the current mesh (1: no mesh, no such axis)."""
    return jax.sharding.get_abstract_mesh().shape.get(STAGE_AXIS, 1)


def bubble_fraction(stages: int, microbatches: int, repeats: int = 1) -> float:
    """The fraction of stage-iterations that do no work: (stages - 1) / (repeats x microbatches + stages - 1)."""
    return (stages - 1) / (repeats * microbatches + stages - 1)


def schedule_of(model_config, stages: int) -> dict | None:
    """The pipeline config.model runs on `stages` stages, as `bigjax plan`, `bench` and the training log report it:
    None where nothing is pipelined."""
    if stages == 1 or "pipeline" not in model_config:
        return None
    p = model_config.pipeline
    repeats = p.repeats if p.schedule == "circular" else 1
    microbatches = p.microbatches or stages
    return dict(
        schedule=p.schedule,
        stages=stages,
        microbatches=microbatches,
        repeats=repeats,
        layers_per_stage=model_config.num_layers // stages,
        bubble_fraction=bubble_fraction(stages, microbatches, repeats),
    )


def describe(schedule: dict) -> str:
    s = schedule
    return (
        f"pipeline: {s['schedule']} over stage={s['stages']}, {s['microbatches']} micro-batches x {s['repeats']} "
        f"pass(es), {s['layers_per_stage']} layers per stage; bubble fraction {s['bubble_fraction']:.1%} "
        f"((stages-1)/(repeats x microbatches + stages-1))"
    )


def pipeline(run_group, stacked, x, extras=(), *, microbatches: int, repeats: int = 1, axis_name=STAGE_AXIS):
    """The layers of `stacked` (a tree of [layers, ...] weights) applied in order to x [batch, ...], pipelined over
    the mesh axis `axis_name` of the current mesh (jax.set_mesh): equal to running every layer on the whole batch.
    Returns (output, sums).

    `run_group(weights, x, slot, *extras)` applies one group of consecutive layers (weights [layers per group, ...])
    to a micro-batch (`slot`, an int32 that differs between every stage and iteration, seeds its dropout) and returns
    (output, sums): a tree of per-layer values [layers per group, ...] that add over the rows (a MoE layer's router
    sums; {} for none). `sums` is their total over the micro-batches, [layers, ...] in the order of `stacked`: the
    whole batch's, as running the layers on it would give. `extras` (arrays [batch, ...], or None) are split into
    micro-batches along with x and passed on unchanged (positions, segment ids). Micro-batch i holds rows i,
    i + microbatches, ...: each device keeps its rows.
    """
    stages = jax.sharding.get_abstract_mesh().shape[axis_name]
    grouped = stage_groups(stacked, stages, repeats)
    micro = lambda a: None if a is None else a.reshape(-1, microbatches, *a.shape[1:]).swapaxes(0, 1)
    xs, extras = micro(x), jax.tree.map(micro, tuple(extras), is_leaf=lambda a: a is None)

    def on_stage(weights, xs, extras):
        weights = jax.tree.map(lambda w: w[0], weights)  # this device's stage: [repeats, per_group, ...]
        schedule = _Schedule(jax.lax.axis_index(axis_name), stages, microbatches, repeats)

        def iteration(carry, t):
            state, held, sums = carry
            x_in = schedule.input(t, state, xs, held)
            group = jax.tree.map(lambda w: w[schedule.pass_of(t)], weights)
            extra = jax.tree.map(lambda e: None if e is None else e[schedule.microbatch(t)], extras)
            y, group_sums = run_group(group, x_in, t * stages + schedule.stage, *extra)
            received = hand_on(y, axis_name, stages)
            sums = schedule.add_sums(t, sums, group_sums)
            return (received, schedule.keep_returned(t, received, held), sums), None

        fill = lambda shape: jnp.full(shape, BUBBLE_FILL, x.dtype)
        state = fill(xs.shape[1:])
        # The sums start at zero, one set per pass, shaped as what a group returns.
        first = jax.tree.map(lambda e: None if e is None else e[0], extras)
        shapes = jax.eval_shape(run_group, jax.tree.map(lambda w: w[0], weights), state, 0, *first)[1]
        carry = (state, fill(xs.shape), jax.tree.map(lambda a: jnp.zeros((repeats, *a.shape), a.dtype), shapes))
        (_, held, sums), _ = jax.lax.scan(iteration, carry, jnp.arange(schedule.iterations))
        # Stage 0 holds every micro-batch's output, from the last stage's last pass: the result, on every stage. Summed
        # in float32, exactly (one value and zeros; bfloat16 -> float32 -> bfloat16 loses nothing): XLA's CPU compiler
        # (jax 0.10) aborts on a bfloat16 all-reduce ("Invalid binary instruction opcode copy"). For the same reason
        # the micro-batches enter in float32 and are cast only once a stage has picked its input (the gradient of one
        # used by every stage is summed over them).
        result = jnp.where(schedule.stage == 0, held, 0).astype(jnp.float32)
        stage_sums = jax.tree.map(lambda a: a[None], sums)  # [1 (this stage), repeats, per_group, ...]
        return jax.lax.psum(result, axis_name).astype(held.dtype), stage_sums

    specs = (PartitionSpec(axis_name), PartitionSpec(), PartitionSpec())
    out_specs = (PartitionSpec(), PartitionSpec(axis_name))
    # Unchecked (check_vma=False): inside, no value is typed as varying over `stage`. Checked, a shard_map nested in
    # this one (context attention's, over `context`) cannot be differentiated in jax 0.10: its residuals get the
    # partition spec of every axis they vary over, the enclosing `stage` included (ShapedArray.nospec, "TODO should
    # use newly all_names"), and lowering finds them half the size it expects. Unchecked, the transposes are still
    # right (the cotangent of what enters unsplit is summed over the stages, that of the unsplit output is not
    # counted once per stage); the equivalence tests are the check the types no longer make.
    on_stages = jax.shard_map(on_stage, in_specs=specs, out_specs=out_specs, axis_names={axis_name}, check_vma=False)
    out, sums = on_stages(grouped, xs.astype(jnp.float32), extras)
    return out.swapaxes(0, 1).reshape(x.shape), layer_order(sums)


def stage_groups(stacked, stages: int, repeats: int):
    """[layers, ...] -> [stages, repeats, layers per group, ...]: stage s, pass p holds group p * stages + s."""
    per_group = jax.tree.leaves(stacked)[0].shape[0] // (stages * repeats)
    return jax.tree.map(lambda w: w.reshape(repeats, stages, per_group, *w.shape[1:]).swapaxes(0, 1), stacked)


def layer_order(grouped):
    """stage_groups undone: [stages, repeats, layers per group, ...] -> [layers, ...]."""
    return jax.tree.map(lambda a: a.swapaxes(0, 1).reshape(-1, *a.shape[3:]), grouped)


def hand_on(y, axis_name: str, stages: int):
    """Every stage's activations to the next stage, the last stage's back to stage 0 (its next pass, or the output)."""
    return jax.lax.ppermute(y, axis_name, [(i, (i + 1) % stages) for i in range(stages)])


@dataclasses.dataclass(frozen=True)
class _Schedule:
    """Which micro-batch and pass `stage` works on at each iteration, and what it hands on."""

    stage: jax.Array  # this device's stage (traced)
    stages: int
    microbatches: int
    repeats: int

    @property
    def iterations(self) -> int:
        return self.repeats * self.microbatches + self.stages - 1

    def microbatch(self, t):
        return (t - self.stage) % self.microbatches

    def pass_of(self, t):
        """The pass (a Python 0 for gpipe: a slice by a traced index would be a new array in every iteration, and the
        scan would keep each of them, a copy of the stage's layers per iteration, for the backward pass)."""
        if self.repeats == 1:
            return 0
        return jnp.clip((t - self.stage) // self.microbatches, 0, self.repeats - 1)

    def working(self, t):
        """Whether this stage's slot at iteration t does real work (not the bubble)."""
        return (t >= self.stage) & (t - self.stage < self.repeats * self.microbatches)

    def input(self, t, state, xs, held):
        """What this stage works on at iteration t: stage 0 takes a new micro-batch in the first pass and one back
        from the last stage after; the others what the stage before handed on. Zeros in a bubble slot."""
        m = t % self.microbatches
        first_stage = jnp.where(t < self.microbatches, xs[m], held[m])
        x_in = jnp.where(self.stage == 0, first_stage, state)
        return jnp.where(self.working(t), x_in, jnp.zeros_like(x_in)).astype(state.dtype)

    def add_sums(self, t, sums, group_sums):
        """`sums` [repeats, per_group, ...] with what this stage's group added at iteration t, where it did real work:
        a bubble slot's layers ran on zeros, whose sums are no rows'."""
        add = lambda total, new: total.at[self.pass_of(t)].add(jnp.where(self.working(t), new, 0))
        return jax.tree.map(add, sums, group_sums)

    def keep_returned(self, t, received, held):
        """`held` with what stage 0 just received from the last stage: micro-batch (t - stages + 1) mod
        microbatches, after a pass; the last pass's is the output."""
        sent = t - (self.stages - 1)  # the iteration at which the last stage's work began on what arrives now
        arrived = (self.stage == 0) & (sent >= 0) & (sent < self.repeats * self.microbatches)
        m = sent % self.microbatches
        return held.at[m].set(jnp.where(arrived, received, held[m]))
