"""Memory per device of context-parallel attention's backward pass, by XLA's compiled memory analysis.

    python benchmarks/context_memory.py              # 8 simulated CPU devices, compiles only, runs nothing
    python benchmarks/context_memory.py train_step   # the whole train step of a small Llama at T=8192

The train step table: experiments/long_context.py's small Llama at T=8192 on 8 devices, a grid of data x context
(data = 8 / context), one sequence per data replica: each device holds 8192 / context of its tokens. Per device,
XLA's temporaries (activations, gradients, scratch) and the arguments (parameters, optimizer state, batch).

Each device holds a fixed block of `LOCAL` tokens while the context axis grows (n = 1, 2, 4, 8): the sequence is
n x LOCAL. For each strategy, the temporary memory of the program that computes the gradients of a loss of the
attention output w.r.t. q, k, v (arguments and outputs, the same for all, apart). The ring's backward is bigjax's
custom_vjp going round the ring again; the two autodiff rows differentiate the same forward loop instead, with and
without each step rematerialized (jax.checkpoint): why the ring has its own backward pass.
"""

import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec  # noqa: E402

from bigjax.parallel import context as cp  # noqa: E402

BATCH, LOCAL, HEADS, KV_HEADS, HEAD_DIM = 1, 2048, 8, 8, 64


def autodiff_ring(remat: bool):
    """Ring attention differentiated by autodiff through its forward loop (each step rematerialized or not)."""

    def attention(q, k, v, positions, segments, *, causal, strategy, axis_name="context"):
        step = cp._accumulate
        if remat:
            cp._accumulate = jax.checkpoint(step, static_argnums=(5,))
        try:
            on_device = lambda *arrays: cp._ring_forward(*arrays, causal, axis_name)[0]
            split = PartitionSpec(None, axis_name)
            in_context = jax.shard_map(on_device, in_specs=split, out_specs=split, axis_names={axis_name})
            return in_context(q, k, v, positions, segments)
        finally:
            cp._accumulate = step

    return attention


def temp_bytes(attention, ways: int, strategy: str) -> int:
    devices = jax.devices()[:ways]
    mesh = jax.make_mesh((ways,), ("context",), axis_types=(AxisType.Auto,), devices=devices)
    split = NamedSharding(mesh, PartitionSpec(None, "context"))
    length = ways * LOCAL
    shape = lambda heads: jax.ShapeDtypeStruct((BATCH, length, heads, HEAD_DIM), jnp.float32, sharding=split)
    positions = jax.ShapeDtypeStruct((BATCH, length), jnp.int32, sharding=split)

    def loss(q, k, v, positions):
        return jnp.sum(attention(q, k, v, positions, None, causal=True, strategy=strategy) ** 2)

    with jax.set_mesh(mesh):
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(
            shape(HEADS), shape(KV_HEADS), shape(KV_HEADS), positions
        )
        return compiled.compile().memory_analysis().temp_size_in_bytes


ROWS = {
    "all_gather": (cp.context_attention, "all_gather"),
    "ring (custom_vjp, bigjax)": (cp.context_attention, "ring"),
    "ring, autodiff, each step remat": (autodiff_ring(remat=True), "ring"),
    "ring, autodiff": (autodiff_ring(remat=False), "ring"),
}


def train_step_memory(context: int, strategy: str) -> tuple[int, int]:
    """(temporary, argument) bytes per device of the compiled train step of the small Llama at T=8192."""
    from bigjax import config as config_lib
    from bigjax.run import step as step_lib
    from bigjax.run.setup import make_setup

    shape = "seq=8192,layers=2,width=64,heads=4"  # the model the table in docs/parallelism.md was measured with
    config = config_lib.load(f"experiments/long_context.py:{shape},context={context},strategy={strategy}")
    config.mesh.update(dict(data=8 // context, fsdp=1, tensor=1, context=context))
    config.batch_size = 8 // context
    stats = step_lib.lower_train_step(make_setup(config)).compile().memory_analysis()
    return stats.temp_size_in_bytes, stats.argument_size_in_bytes


def train_step_table():
    ways = (1, 2, 4, 8)
    print("train step of a small Llama at T=8192 on 8 devices (data = 8 / context), per device, MiB: temporaries")
    print(f"{'':14}" + "".join(f"{'context=' + str(n):>12}" for n in ways))
    for strategy in cp.STRATEGIES:
        sizes = [train_step_memory(n, strategy)[0] / 2**20 for n in ways]
        print(f"{strategy:14}" + "".join(f"{size:12.1f}" for size in sizes))
    print(f"arguments (parameters, optimizer state, batch): {train_step_memory(8, 'ring')[1] / 2**20:.1f} MiB")


if __name__ == "__main__" and sys.argv[1:] == ["train_step"]:
    train_step_table()
elif __name__ == "__main__":
    ways = (1, 2, 4, 8)
    print(f"temporary memory per device, MiB: {LOCAL} tokens per device, {HEADS} heads of {HEAD_DIM}, float32")
    print(f"{'':34}" + "".join(f"{'context=' + str(n):>12}" for n in ways))
    for name, (attention, strategy) in ROWS.items():
        sizes = [temp_bytes(attention, n, strategy) / 2**20 for n in ways]
        print(f"{name:34}" + "".join(f"{size:12.1f}" for size in sizes))
