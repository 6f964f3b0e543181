"""Joining a multi-process (multi-host) job through JAX's own runtime.

Every process runs the same command. When the environment names a job of several processes, bigjax calls
`jax.distributed.initialize` before anything touches a device; afterwards `jax.devices()` lists the devices
of all processes and every mesh spans them. The variables (the launch scripts set them):

    JAX_COORDINATOR_ADDRESS   host:port of process 0's coordinator
    JAX_NUM_PROCESSES         how many processes
    JAX_PROCESS_ID            this process's index, 0..N-1
    BIGJAX_INIT_TIMEOUT       seconds to wait for all processes to join (default 300); a missing process
                              then makes the others fail with an error instead of hanging
"""

from __future__ import annotations

import os

import jax


def initialize_if_multiprocess() -> None:
    """A no-op for a single process; otherwise join the job the environment describes."""
    num_processes = int(os.environ.get("JAX_NUM_PROCESSES", "1"))
    if num_processes <= 1:
        return
    missing = [name for name in ("JAX_COORDINATOR_ADDRESS", "JAX_PROCESS_ID") if name not in os.environ]
    if missing:
        raise RuntimeError(f"JAX_NUM_PROCESSES={num_processes} but {', '.join(missing)} is not set")
    jax.distributed.initialize(
        coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
        num_processes=num_processes,
        process_id=int(os.environ["JAX_PROCESS_ID"]),
        initialization_timeout=int(os.environ.get("BIGJAX_INIT_TIMEOUT", "300")),
    )
