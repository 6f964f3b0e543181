"""The XLA flags bigjax sets for GPU runs: the user's own flags win, nothing is set off the GPU, and the installed
jaxlib knows every flag (an unknown one aborts XLA at start-up)."""

import os
import subprocess
import sys

import pytest

from bigjax.ops import xla_flags

OURS = {f"--{name}={value}" for name, value in xla_flags.GPU_FLAGS.items()}


def test_on_a_gpu_every_flag_is_added():
    env = {"JAX_PLATFORMS": "cuda"}
    added = xla_flags.apply_gpu_defaults(env)
    assert set(added) == OURS and set(env["XLA_FLAGS"].split()) == OURS


def test_the_users_flags_win_and_are_kept():
    user = "--xla_gpu_enable_triton_gemm=true --xla_dump_to=/tmp/hlo --xla_gpu_enable_latency_hiding_scheduler"
    env = {"JAX_PLATFORMS": "cuda,cpu", "XLA_FLAGS": user}
    added = xla_flags.apply_gpu_defaults(env)
    tokens = env["XLA_FLAGS"].split()
    assert tokens[-3:] == user.split()  # the user's, unchanged, last
    assert "--xla_gpu_enable_triton_gemm=false" not in tokens  # named by the user, with another value: theirs
    assert not any(t.startswith("--xla_gpu_enable_latency_hiding_scheduler=") for t in tokens)  # a bare boolean too
    assert set(added) == OURS - {
        "--xla_gpu_enable_triton_gemm=false",
        "--xla_gpu_enable_latency_hiding_scheduler=true",
    }


@pytest.mark.parametrize("platforms", ["cpu", "tpu", "cpu,tpu"])
def test_nothing_is_set_off_the_gpu(platforms):
    env = {"JAX_PLATFORMS": platforms, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    assert xla_flags.apply_gpu_defaults(env) == []
    assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8"


def test_without_jax_platforms_a_gpu_plugin_decides(monkeypatch):
    monkeypatch.setattr(xla_flags, "gpu_plugin_installed", lambda: False)
    env = {}
    assert xla_flags.apply_gpu_defaults(env) == [] and "XLA_FLAGS" not in env
    monkeypatch.setattr(xla_flags, "gpu_plugin_installed", lambda: True)
    assert set(xla_flags.apply_gpu_defaults(env)) == OURS


def test_this_cpu_environment_has_no_gpu_plugin():
    assert not xla_flags.gpu_plugin_installed()


def test_the_switch_turns_them_off_and_a_bad_value_is_an_error():
    env = {"JAX_PLATFORMS": "cuda", "BIGJAX_XLA_FLAGS": "off"}
    assert xla_flags.apply_gpu_defaults(env) == [] and "XLA_FLAGS" not in env
    with pytest.raises(xla_flags.XlaFlagsError, match="BIGJAX_XLA_FLAGS='maybe': use 'on'"):
        xla_flags.apply_gpu_defaults({"JAX_PLATFORMS": "cuda", "BIGJAX_XLA_FLAGS": "maybe"})


def test_the_installed_jaxlib_knows_every_flag():
    # XLA parses every flag on every platform, so a CPU process aborts on one this jaxlib does not know.
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": " ".join(sorted(OURS))}
    code = "import jax, jax.numpy as jnp; print(jax.jit(lambda x: x + 1)(jnp.ones(2)).sum())"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "4.0", result.stderr[-2000:]
    bogus = {**env, "XLA_FLAGS": "--xla_gpu_no_such_flag=true"}
    result = subprocess.run([sys.executable, "-c", code], env=bogus, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "Unknown flag" in result.stderr  # the check above can fail


def test_cli_reports_a_bad_switch_as_one_error_line(cli):
    env = {**os.environ, "BIGJAX_XLA_FLAGS": "sometimes"}
    result = cli("plan", "--config", "experiments/tiny.py", check=False, env=env)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: BIGJAX_XLA_FLAGS='sometimes': use 'on' (the default) or 'off'"
