"""Every test runs on 8 simulated CPU devices, so every sharding path is exercised without accelerators.

The flags must be set before jax is imported anywhere, hence at the top of conftest.
"""

import os

# The tests compile hundreds of small programs and run each a few steps: LLVM's optimizations cost more than they
# save here (about 40% of the suite's CPU time). Same XLA, same numerics up to rounding; never used outside tests.
# XLA:CPU's newer fusion emitters (MLIR) take longer to compile than its older loop emitters: switched off, one
# LoRA mesh-equivalence test went from 49 to 28 CPU seconds with an empty compilation cache (tests/costs.py: the
# suite's total below). XLA:CPU splits each program's LLVM module into parts compiled on parallel threads: on two
# cores already busy with two test workers that buys nothing and costs each part its own setup; in one piece,
# test_moe.py and test_model.py took 7-17% less CPU (two paired runs, empty compilation cache: 115.9 -> 107.3 and
# 111.6 -> 93.1 CPU seconds).
FAST_COMPILE = (
    "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true --xla_cpu_use_fusion_emitters=false"
    " --xla_cpu_parallel_codegen_split_count=1"
)
# The simulated devices are threads of one process. XLA aborts the process (LOG(FATAL): "Termination timeout ...
# exceeded") when a collective's threads have not all arrived within 40 s, which a loaded 2-core machine can cause
# (seen: the ring attention's scan of collective-permutes under two test workers and other processes): a test then
# dies with its worker. A late thread is not a wrong program, so tests wait as long as their own timeouts allow.
PATIENT_COLLECTIVES = "--xla_cpu_collective_call_terminate_timeout_seconds=1800"
# With XLA's concurrency-optimized scheduler, the simulated devices of one program were seen waiting for ever in
# different collectives (five at the ring attention's collective-permute, three at a gradient's all-reduce: a train
# step with data=2 x context=4, run again after others); with the default scheduler the same sequence completes.
ONE_COLLECTIVE_ORDER = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def xla_flags(devices: int | None) -> str:
    """XLA_FLAGS for a test process with `devices` simulated CPU devices (what the subprocesses get too); None: no
    device count, for a launcher that adds its own."""
    flags = f"{FAST_COMPILE} {PATIENT_COLLECTIVES} {ONE_COLLECTIVE_ORDER}"
    return flags if devices is None else f"{flags} --xla_force_host_platform_device_count={devices}"


os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " " + xla_flags(8)
os.environ["JAX_PLATFORMS"] = "cpu"
# One persistent compilation cache for the tests and the bigjax processes they start: the same tiny train step
# is compiled by dozens of them. Keys include the jax version, the devices and the program, so a stale entry
# is never used; the directory is ignored by git. Every program is kept, however quick to compile: with
# FAST_COMPILE most take under JAX's default minimum of a second, and a tenth of a second each, compiled again in
# every process, adds up (tests/costs.py, test_cli alone from a cold cache: 42 compiles and 28 hits with a minimum
# of 0.5 s, 10 and 60 with none; 82 CPU seconds, then 73).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(os.path.join(os.path.dirname(__file__), "..", ".jax-cache")))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# Where PYTHONDONTWRITEBYTECODE is set (this machine's image sets it), every process the tests start would compile
# the sources it imports again: bigjax's (~0.5 s of CPU each, over a hundred processes) and the installed packages'
# (`make install-dev` installs them with --no-compile: 40 s of CPU for jax, TensorFlow, torch and transformers). The
# first process to import a module writes its bytecode to __pycache__ (ignored by git) for the others.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)

import contextlib  # noqa: E402
import pathlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

sys.dont_write_bytecode = False

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = str(REPO / "experiments" / "tiny.py")


def pytest_configure(config):
    """BIGJAX_TEST_COSTS=FILE.jsonl: record each test's CPU time, processes and compiles (tests/costs.py)."""
    if os.environ.get("BIGJAX_TEST_COSTS"):
        import costs

        costs.register(config)


@pytest.fixture
def tiny_config():
    """The toy experiment's config, loaded as the CLI would, with overrides."""
    from bigjax import config as config_lib

    def load(arg: str = "", *overrides: str):
        return config_lib.load(TINY + (f":{arg}" if arg else ""), list(overrides))

    return load


def run_cli(*args, timeout=300, check=True, **popen):
    """Run `bigjax ARGS` in a subprocess (8 simulated devices, like the tests) and return the result."""
    result = subprocess.run(
        [sys.executable, "-m", "bigjax.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        **popen,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"bigjax {' '.join(map(str, args))} failed ({result.returncode}):\n{result.stderr[-3000:]}"
        )
    return result


@pytest.fixture
def cli():
    return run_cli


def cli_main(*args) -> int:
    """`bigjax ARGS` by cli.main in this process, as `cli_in_process` runs it: its exit code. What it prints goes to
    this process's sys.stdout and sys.stderr, for the caller to capture (capsys, or contextlib.redirect_stdout in a
    module fixture, where capsys is not available)."""
    from bigjax import cli as bigjax_cli
    from bigjax.ops import logs
    from bigjax.run import signals

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(logs, "send_library_logs_to_file", lambda workdir, command: None)  # keep pytest's logging
        patch.setattr(logs, "_handler", None)
        try:
            return bigjax_cli.main([str(arg) for arg in args])
        except SystemExit as exit:  # argparse's refusal of the arguments themselves
            return exit.code
        finally:
            signals.release()  # `train` took SIGTERM and SIGINT: pytest's again


@pytest.fixture
def cli_in_process(capsys):
    """`bigjax ARGS` as `cli` runs it, but by cli.main in this process: the same printed lines and exit code
    without a process to start (each costs ~3 s of CPU in imports alone). For tests of what a command says and
    does where the process itself is not what is tested; every command keeps tests through `cli`."""

    def run(*args, check=True):
        capsys.readouterr()  # what the test printed before is not the command's
        returncode = cli_main(*args)
        captured = capsys.readouterr()
        result = subprocess.CompletedProcess(["bigjax", *map(str, args)], returncode, captured.out, captured.err)
        if check and returncode != 0:
            raise AssertionError(f"bigjax {' '.join(map(str, args))} failed ({returncode}):\n{captured.err[-3000:]}")
        return result

    return run


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """experiments/tiny.py as it is, trained 8 steps in this process (checkpoints 4 and 8, metrics every 2 steps):
    once per session (per xdist worker) for every test that needs a trained tiny run. Shared: read it, and copy
    it (`copy_run`) before changing anything in it."""
    from bigjax import config as config_lib
    from bigjax.run import train

    workdir = tmp_path_factory.mktemp("tiny_run") / "run"
    assert train.train(config_lib.load(TINY), workdir).step == 8
    return workdir


def copy_run(workdir, where):
    """A copy of the run `workdir` at where/run, to change."""
    import shutil

    return pathlib.Path(shutil.copytree(workdir, pathlib.Path(where) / "run"))


def read_until(process, marker: str, stderr_file) -> str:
    """What `process` writes to its stdout (a text pipe) up to the first line that contains `marker`: a test waits
    on the process's own word that it got there, not on a clock. Fails with its stderr (sent to the file
    `stderr_file`, so that it never fills a pipe nobody reads) if the process ends first."""
    seen = []
    for line in process.stdout:
        seen.append(line)
        if marker in line:
            return "".join(seen)
    process.wait()
    raise AssertionError(
        f"the process exited ({process.returncode}) before writing {marker!r}:\n{stderr_file.read_text()[-3000:]}"
    )


def init_params(task, seed=0):
    """A task's parameters, unboxed, initialized under jit (op-by-op init of a scanned model is slow)."""
    import flax.linen as nn
    import jax

    return jax.jit(lambda: nn.unbox(task.init_variables(jax.random.key(seed))["params"]))()


def model_loss_and_grads(config, devices, params=None):
    """(loss, gradients, parameters, compiled program) of one step of `config`'s model on a fixed batch (random
    tokens, some padding) on `devices`: what the equivalence tests of a parallel axis compare with one device."""
    import jax
    import numpy as np

    from bigjax.run.setup import make_setup

    setup = make_setup(config, devices)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, (config.batch_size, config.data.seq_len + 1), dtype=np.int32)
    weights = np.ones((config.batch_size, config.data.seq_len), np.float32)
    weights[0, -5:] = 0
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": weights}
    params = jax.device_get(init_params(setup.task)) if params is None else params

    def mean_loss(p, b):
        sums, _ = setup.task.loss_sums(p, {}, b)
        return sums["loss"] / sums["count"]

    step = jax.jit(jax.value_and_grad(mean_loss), in_shardings=(setup.state_shardings.params, setup.sharding.batch))
    with setup.sharding.activate():
        compiled = step.lower(params, setup.sharding.global_batch(batch)).compile()
        loss, grads = compiled(jax.device_put(params, setup.state_shardings.params), setup.sharding.global_batch(batch))
    return jax.device_get(loss), jax.device_get(grads), params, compiled


@contextlib.contextmanager
def file_size_limit(size: int):
    """This process's files may not grow past `size` bytes (RLIMIT_FSIZE): what a full disk does to writes, without
    one. A write crossing it is cut there, and the next one fails with EFBIG ("File too large"); Python ignores
    SIGXFSZ, so the process lives. (Only around writes of this thread alone: what pytest captures is a file too, and
    a library's threads may outlive the limit.)"""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
