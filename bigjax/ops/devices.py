"""What bigjax knows of accelerators it may not see: each kind's dense bf16 peak FLOP/s (for MFU) and memory size (for
`bigjax plan`), and the short names `bigjax plan --device-kind` takes.

Tables are keyed by a substring of `jax.Device.device_kind`; the first key found in a kind wins.
"""

from __future__ import annotations

import jax

# Dense bf16 peak FLOP/s per device (no sparsity), keyed by a substring of `jax.Device.device_kind`.
# The one table of device peaks in bigjax.
PEAK_FLOPS = {
    "H200": 989e12,
    "H100 PCIe": 756e12,  # before "H100": the PCIe card runs at lower clocks than the SXM one
    "H100": 989e12,
    "A100": 312e12,
    "L4": 121e12,
    "TPU v6 lite": 918e12,  # v6e
    "TPU v5p": 459e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5": 459e12,
    "TPU v4": 275e12,
}


GiB = 2**30

# Memory per device (HBM), keyed like PEAK_FLOPS. Where the devices are present, bigjax reads their own
# figure (`memory_stats()["bytes_limit"]`) instead; the 40 GB A100 is listed for `bigjax plan` alone.
DEVICE_MEMORY = {
    "H200": 141e9,
    "H100": 80 * GiB,
    "A100-SXM4-40GB": 40 * GiB,
    "A100": 80 * GiB,
    "L4": 24e9,
    "TPU v6 lite": 32 * GiB,
    "TPU v5p": 95 * GiB,
    "TPU v5 lite": 16 * GiB,
    "TPU v5": 95 * GiB,
    "TPU v4": 32 * GiB,
}

# Short names for `bigjax plan --device-kind NAME` -> a device_kind as JAX reports it.
DEVICE_KIND_NAMES = {
    "h200": "NVIDIA H200",
    "h100": "NVIDIA H100 80GB HBM3",
    "a100": "NVIDIA A100-SXM4-80GB",
    "a100-40gb": "NVIDIA A100-SXM4-40GB",
    "l4": "NVIDIA L4",
    "v4": "TPU v4",
    "v5e": "TPU v5 lite",
    "v5p": "TPU v5p",
    "v6e": "TPU v6 lite",
}


def _lookup(table: dict, kind: str):
    """The first entry whose key is a substring of `kind` (so "TPU v5p" is listed before "TPU v5")."""
    for name, value in table.items():
        if name.lower() in kind.lower():
            return value
    return None


def peak_flops(device=None) -> float | None:
    return peak_flops_of_kind((device or jax.devices()[0]).device_kind)


def peak_flops_of_kind(device_kind: str) -> float | None:
    return _lookup(PEAK_FLOPS, device_kind)


def device_memory(device_kind: str) -> float | None:
    """Bytes of memory of one device of this kind, from the table; None when unknown (a CPU, say)."""
    return _lookup(DEVICE_MEMORY, device_kind)
