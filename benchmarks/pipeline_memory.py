"""Memory per device of a pipelined train step, by XLA's compiled memory analysis (`bigjax plan` on the devices here).

    python benchmarks/pipeline_memory.py           # 8 simulated CPU devices, compiles only, runs nothing

A small Llama (16 layers, d_model 256, 8 heads, 4 KV heads, MLP 768, vocabulary 384, sequence 256), batch 32, fp32,
AdamW, without remat and with model.remat=full, on 8 devices: data parallel (stage=1), pipelined over stage=2 and 4
(the rest data parallel), and FSDP over all 8 for comparison. Columns, per device: parameters and optimizer state
(exact, from the shardings), XLA's temporaries (gradients, activations kept for the backward pass, scratch), and the
program's peak, in MiB.
"""

import itertools
import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from bigjax import config as config_lib  # noqa: E402
from bigjax import plan  # noqa: E402

MODEL = [
    "config.model.num_layers=16",
    "config.model.d_model=256",
    "config.model.num_heads=8",
    "config.model.num_kv_heads=4",
    "config.model.mlp_dim=768",
    "config.model.max_len=256",
    "config.data.seq_len=256",
    "config.batch_size=32",
]
RUNS = {
    "data=8 (no pipeline)": ["config.mesh.data=8"],
    "fsdp=8": ["config.mesh.data=1", "config.mesh.fsdp=8"],
    "stage=2 gpipe, 4 micro-batches": [
        "config.mesh.data=4",
        "config.mesh.stage=2",
        "config.model.pipeline.microbatches=4",
    ],
    "stage=4 gpipe, 8 micro-batches": [
        "config.mesh.data=2",
        "config.mesh.stage=4",
        "config.model.pipeline.microbatches=8",
    ],
    "stage=4 circular x2, 8 micro-batches": [
        "config.mesh.data=2",
        "config.mesh.stage=4",
        "config.model.pipeline.microbatches=8",
        "config.model.pipeline.schedule=circular",
        "config.model.pipeline.repeats=2",
    ],
}


def mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def main():
    print("| mesh | bubble | remat | parameters | optimizer state | XLA temporaries | peak |")
    print("|---|---|---|---|---|---|---|")
    for (name, mesh), remat in itertools.product(RUNS.items(), ("none", "full")):
        config = config_lib.load("experiments/tiny.py:llama=True", [*MODEL, *mesh, f"config.model.remat={remat}"])
        p = plan.make_plan(config)
        bubble = f"{p.pipeline['bubble_fraction']:.0%}" if p.pipeline else "-"
        d = p.per_device
        row = [
            name,
            bubble,
            remat,
            mib(d["parameters"]),
            mib(d["optimizer_state"]),
            mib(p.xla["temporaries"]),
            mib(d["total"]),
        ]
        print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
