"""`bigjax bench`: the figures it reports and how they are computed (never how fast anything is)."""

import json

import jax
import pytest
from conftest import TINY

from bigjax import bench, tasks
from bigjax.ops import devices
from bigjax.run import step as step_lib
from bigjax.run.setup import make_setup


def test_bench_command_reports_throughput_flops_and_environment(cli, tiny_config, tmp_path):
    """On a mesh that splits the sequence too (context=2, ring): bench runs what train runs."""
    out = tmp_path / "bench.json"
    overrides = ["config.optim.mu_dtype=bfloat16", "config.mesh.context=2", "config.model.context_parallel=ring"]
    args = ("--steps", 4, "--warmup", 1, "--windows", 2, "--json", out, *(f"--{o}" for o in overrides))
    printed = cli("bench", "--config", TINY, *args).stdout
    assert "tokens/s" in printed and "MFU" in printed
    result = json.loads(out.read_text())

    task = tasks.make_task(tiny_config())
    assert result["flops_per_example"] == task.flops_per_example()
    assert result["causal_flops_per_example"] == task.causal_flops_per_example()
    assert result["causal_flops_per_example"] < result["flops_per_example"]
    examples_per_second = result["examples_per_second"]
    assert result["model_flops_per_second"] == pytest.approx(result["flops_per_example"] * examples_per_second)
    assert result["tokens_per_second"] == pytest.approx(result["examples_per_second"] * 32)
    assert result["timed_steps"] == 4 and result["warmup_steps"] == 1 and len(result["window_step_times"]) == 2
    assert result["step_time_min"] <= result["step_time_median"] <= result["step_time_max"]
    assert result["examples_per_second"] == pytest.approx(8 * 4 / result["timed_seconds"])
    assert result["compile_seconds"] > 0
    # The experiment reads Shakespeare; the bench reads synthetic data of the same shapes.
    assert result["data_source"] == "synthetic"
    assert result["config"] == TINY and result["overrides"] == overrides
    assert result["num_devices"] == 8
    assert result["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1, "context": 2, "expert": 1, "stage": 1}
    assert result["device_kind"] == "cpu" and {"jax", "jaxlib", "flax"} <= set(result["versions"])
    # A CPU has no listed peak and reports no memory statistics: said so, not invented.
    assert result["mfu"] is None and result["mfu_causal"] is None
    assert result["peak_memory_bytes"] is None and "unavailable" in result["peak_memory_note"]


def test_report_arithmetic_against_a_known_peak(tiny_config, monkeypatch):
    config = tiny_config()
    setup = make_setup(config)
    task = setup.task
    timing = bench.Timing(compile_seconds=2.0, window_steps=[2, 2], window_seconds=[1.0, 3.0])
    monkeypatch.setitem(devices.PEAK_FLOPS, "cpu", 1e9)
    result = bench.report(setup, timing, parameters=1, config_name="tiny", overrides=[], warmup=0)
    assert result["examples_per_second"] == 8 * 4 / 4.0
    assert result["window_step_times"] == [0.5, 1.5] and result["step_time_median"] == 1.0
    assert result["mfu"] == pytest.approx(task.flops_per_example() * 8.0 / (1e9 * 8))
    assert result["mfu_causal"] == pytest.approx(task.causal_flops_per_example() * 8.0 / (1e9 * 8))


def test_timed_steps_split_into_near_equal_windows():
    assert bench.window_sizes(10, 3) == [4, 3, 3]
    assert bench.window_sizes(4, 4) == [1, 1, 1, 1]


def test_bad_bench_arguments_are_one_error_line(cli_in_process):
    result = cli_in_process("bench", "--config", TINY, "--steps", 2, "--windows", 3, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --steps=2 --warmup=10 --windows=3: need steps >= windows >= 1 and warmup >= 0"
    ]


@pytest.mark.parametrize(
    "device_kind, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA A100-SXM4-40GB", 312e12),
        ("NVIDIA L4", 121e12),
        ("TPU v4", 275e12),
        ("TPU v5 lite", 197e12),
        ("TPU v5p", 459e12),
        ("TPU v6 lite", 918e12),
        ("cpu", None),
    ],
)
def test_one_peak_table_knows_the_benchmarked_devices(device_kind, peak):
    assert devices.peak_flops_of_kind(device_kind) == peak


def test_peak_memory_is_stated_unavailable_on_cpu():
    assert jax.devices()[0].platform == "cpu"
    peak, note = bench.peak_memory()
    assert peak is None and note.startswith("unavailable: cpu")


@pytest.mark.parametrize("scan", [True, False])
def test_a_scanned_model_compiles_one_program_whatever_its_depth(tiny_config, scan):
    """Why compile time stays flat in depth: with scanned layers, 8 layers trace to the program of 2 (the layer
    body once, the layer count only in the loop bound); unrolled, the program grows with every layer."""

    def program_size(layers: int) -> int:
        config = tiny_config("", f"config.model.num_layers={layers}", f"config.model.scan_layers={scan}")
        return len(step_lib.lower_train_step(make_setup(config)).as_text())

    ratio = program_size(8) / program_size(2)
    if scan:
        assert ratio < 1.05, ratio
    else:
        assert ratio > 2.5, ratio


def test_bench_lowers_the_program_train_runs(tiny_config):
    """bench times `train`'s step on synthetic data of the same shapes: the same lowered program, for a config
    with frozen parameters, gradient accumulation and a skip policy (the parts a bench of its own would drift on)."""
    config = tiny_config(
        "",
        "config.freeze=^layers/",
        "config.optim.grad_accum=2",
        "config.batch_size=16",
        "config.nan_policy=skip",
        "config.mesh.fsdp=2",
    )
    trains = step_lib.lower_train_step(make_setup(config)).as_text()
    benches = step_lib.lower_train_step(make_setup(bench.synthetic(config))).as_text()
    assert benches == trains
