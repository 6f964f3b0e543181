"""Joining a multi-process (multi-host) job through JAX's own runtime, and failing fast when it breaks.

Every process runs the same command. When the environment describes a job of several processes, bigjax calls
`jax.distributed.initialize` before anything touches a device; afterwards `jax.devices()` lists the devices of
all processes and every mesh spans them. A job is described either explicitly (JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID: launch/multiprocess.sh, Kubernetes) or by the cluster, whose own variables
JAX reads (SLURM, Cloud TPU VMs: BIGJAX_DISTRIBUTED=auto). docs/launching.md, "The job's variables", lists every
variable and its default: that table is the one place they are documented.

Failure detection is JAX's coordination service, configured here: its heartbeat thread keeps running while a
process is blocked in a collective or a long compile, and when a process goes silent for the heartbeat
timeout, or its coordinator disappears, the service ends every other process with an error naming the lost
one. The one case JAX reports poorly, a job that never forms, gets bigjax's own error (see
`_report_missing_processes`).
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
import threading

import jax

from bigjax.errors import UserError

DEFAULT_TIMEOUTS = {"BIGJAX_INIT_TIMEOUT": 300, "BIGJAX_HEARTBEAT_TIMEOUT": 100, "BIGJAX_SHUTDOWN_TIMEOUT": 120}


class DistributedError(UserError):
    """The environment describes a job that cannot be joined: a message for the user."""


@dataclasses.dataclass(frozen=True)
class JobSpec:
    """How this process joins: explicit coordinates, or None fields for JAX to detect from the cluster."""

    coordinator_address: str | None
    num_processes: int | None
    process_id: int | None

    @property
    def detected(self) -> bool:
        return self.num_processes is None


def job_from_environment(env=os.environ) -> JobSpec | None:
    """The job this process belongs to, or None for a single process."""
    mode = env.get("BIGJAX_DISTRIBUTED", "").lower()
    if mode not in ("", "auto", "off"):
        raise DistributedError(f"BIGJAX_DISTRIBUTED={mode!r}: use 'auto' (detect SLURM / TPU VM) or 'off'")
    if mode == "off":
        return None
    num_processes = int(env.get("JAX_NUM_PROCESSES", "1"))
    if num_processes > 1:
        missing = [name for name in ("JAX_COORDINATOR_ADDRESS", "JAX_PROCESS_ID") if name not in env]
        if missing:
            raise DistributedError(f"JAX_NUM_PROCESSES={num_processes} but {' and '.join(missing)} is not set")
        process_id = int(env["JAX_PROCESS_ID"])
        if not 0 <= process_id < num_processes:
            raise DistributedError(f"JAX_PROCESS_ID={process_id} is not in 0..{num_processes - 1}")
        return JobSpec(env["JAX_COORDINATOR_ADDRESS"], num_processes, process_id)
    if mode == "auto" or _in_slurm_step_of_several_tasks(env):
        return JobSpec(None, None, None)
    return None


def _in_slurm_step_of_several_tasks(env) -> bool:
    # SLURM_STEP_ID is set inside `srun`, not in the batch script itself (which is one process).
    return "SLURM_STEP_ID" in env and int(env.get("SLURM_NTASKS", "1")) > 1


def timeouts(env=os.environ) -> dict[str, int]:
    values = {}
    for name, default in DEFAULT_TIMEOUTS.items():
        text = env.get(name, str(default))
        if not text.isdigit() or int(text) <= 0:
            raise DistributedError(f"{name}={text!r} must be a positive number of seconds")
        values[name] = int(text)
    return values


def initialize_if_multiprocess() -> None:
    """A no-op for a single process; otherwise join the job the environment describes."""
    job = job_from_environment()
    if job is None:
        return
    limits = timeouts()
    init_timeout = limits["BIGJAX_INIT_TIMEOUT"]
    # JAX's own join timeout ends the process with a bare "Deadline Exceeded"; ours fires first and says more.
    watchdog = threading.Timer(init_timeout, _report_missing_processes, args=(job, init_timeout))
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(
            coordinator_address=job.coordinator_address,
            num_processes=job.num_processes,
            process_id=job.process_id,
            initialization_timeout=init_timeout + 30,
            heartbeat_timeout_seconds=limits["BIGJAX_HEARTBEAT_TIMEOUT"],
            shutdown_timeout_seconds=limits["BIGJAX_SHUTDOWN_TIMEOUT"],
        )
    finally:
        watchdog.cancel()


def _report_missing_processes(job: JobSpec, waited: int) -> None:
    """Called when the job has not formed in time: say who is missing, as far as this process can tell, and exit."""
    where = f"process {job.process_id} of {job.num_processes}" if not job.detected else "this process"
    address = job.coordinator_address or "the coordinator JAX derived from the cluster"
    if job.process_id == 0:
        others = "process 1" if job.num_processes == 2 else f"some of processes 1..{job.num_processes - 1}"
        missing = f"{others} did not join at {address}"
    elif job.coordinator_address and not _reachable(job.coordinator_address):
        missing = f"process 0 (the coordinator, at {address}) is not running or cannot be reached from this host"
    else:
        missing = f"the coordinator at {address} is up, but not all {job.num_processes or ''} processes joined"
    print(
        f"error ({where}): the job did not form within BIGJAX_INIT_TIMEOUT={waited}s: {missing}. A process that "
        "never started, crashed while starting, or cannot reach the coordinator holds up the others; see its log.",
        file=sys.stderr,
        flush=True,
    )
    sys.stdout.flush()
    os._exit(1)  # the main thread is blocked inside JAX's join: leave from here


def _reachable(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=5):
            return True
    except OSError:
        return False


def describe() -> str:
    """ "process 1 of 4" in a multi-process job, "" otherwise: for error messages and logs."""
    if jax.process_count() == 1:
        return ""
    return f"process {jax.process_index()} of {jax.process_count()}"
