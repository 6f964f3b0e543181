"""`bigjax plan` and the shardings it counts: per-device bytes under FSDP and tensor parallelism, XLA's figures
for the devices present, the model for devices that are not, and the advice it prints."""

import json
import math
import re

import jax
import pytest
from conftest import REPO

from bigjax import plan
from bigjax.run.setup import make_setup

GPT2, LLAMA = str(REPO / "experiments" / "gpt2_124m.py"), str(REPO / "experiments" / "llama_1b.py")


def real_state(config):
    """The train state as training creates it, on the 8 simulated devices, and its shardings."""
    setup = make_setup(config)
    return setup.init_state(), setup.state_shardings


def bytes_on_device_0(tree) -> int:
    device = jax.devices()[0]
    return sum(
        shard.data.nbytes
        for leaf in jax.tree.leaves(tree)
        for shard in leaf.addressable_shards
        if shard.device == device
    )


def test_fsdp_8_keeps_an_eighth_of_parameters_and_optimizer_state_per_device(tiny_config):
    config = tiny_config("", "config.mesh.data=1", "config.mesh.fsdp=8")
    state, shardings = real_state(config)
    trees = (state.params, state.opt_state)
    total = sum(leaf.nbytes for tree in trees for leaf in jax.tree.leaves(tree))
    replicated = {
        jax.tree_util.keystr(path): leaf
        for tree, tree_shardings in zip(trees, (shardings.params, shardings.opt_state), strict=True)
        for (path, leaf), sharding in zip(
            jax.tree_util.tree_flatten_with_path(tree)[0], jax.tree.leaves(tree_shardings), strict=True
        )
        if sharding.is_fully_replicated
    }
    # Only small leaves stay whole: biases over heads or MLP units (the tensor axis is 1) and Adam's step counts.
    assert replicated and all(re.search(r"\['bias'\]$|\.count$", name) for name in replicated), list(replicated)
    small = sum(leaf.nbytes for leaf in replicated.values())
    on_device = bytes_on_device_0(trees)
    assert on_device <= total / 8 + small
    assert small < 0.02 * total
    # `bigjax plan` counts exactly what the device holds.
    report = plan.make_plan(config)
    assert report.per_device["parameters"] + report.per_device["optimizer_state"] == on_device


def test_bfloat16_first_moment_shrinks_the_planned_optimizer_state_by_a_quarter(tiny_config):
    fp32 = plan.make_plan(tiny_config("", "config.mesh.data=1", "config.mesh.fsdp=8"))
    bf16 = plan.make_plan(tiny_config("", "config.mesh.data=1", "config.mesh.fsdp=8", "config.optim.mu_dtype=bfloat16"))
    # AdamW keeps mu and nu per parameter: 4 + 4 bytes, now 2 + 4; the step counts are a few bytes more.
    assert bf16.per_device["optimizer_state"] == pytest.approx(0.75 * fp32.per_device["optimizer_state"], rel=1e-3)
    assert bf16.per_device["parameters"] == fp32.per_device["parameters"]
    # XLA's compiled step takes the smaller state as its input (its temporaries on CPU are another matter).
    saved = fp32.per_device["optimizer_state"] - bf16.per_device["optimizer_state"]
    assert fp32.xla["arguments"] - bf16.xla["arguments"] == saved


def test_tensor_2_splits_the_mlp_and_attention_weights(tiny_config):
    config = tiny_config("", "config.mesh.data=4", "config.mesh.tensor=2")
    state, _ = real_state(config)
    layers = state.params["layers"]  # scanned: the leading axis is the layer
    split = {  # weight -> the dimension holding heads or MLP units
        ("mlp", "up", "kernel"): 2,
        ("mlp", "down", "kernel"): 1,
        ("attention", "query", "kernel"): 2,
        ("attention", "key", "kernel"): 2,
        ("attention", "value", "kernel"): 2,
        ("attention", "out", "kernel"): 1,
    }
    for path, dim in split.items():
        weight = layers[path[0]][path[1]][path[2]]
        assert weight.sharding.spec[dim] == "tensor", path
        shard_shape = weight.addressable_shards[0].data.shape
        assert shard_shape[dim] == weight.shape[dim] // 2, path
        assert math.prod(shard_shape) * 2 == weight.size, path


def test_compiled_plan_counts_the_step_inputs_exactly_and_models_activations_near_xla(tiny_config):
    config = tiny_config()
    compiled = plan.make_plan(config)
    assert compiled.source == "compiled" and compiled.num_devices == 8
    per_device = compiled.per_device
    step_counter = 4  # the int32 step
    assert compiled.xla["arguments"] == (
        per_device["parameters"] + per_device["optimizer_state"] + per_device["batch"] + step_counter
    )
    assert per_device["total"] == compiled.xla["peak"]
    assert compiled.xla_flops_per_device > 0

    # The same layout planned for devices that are not here: the exact parts agree, activations roughly.
    modelled = plan.make_plan(config, num_devices=8, device_kind="h100")
    assert modelled.source == "model" and modelled.device_kind == "NVIDIA H100 80GB HBM3"
    for key in ("parameters", "optimizer_state", "gradients", "batch"):
        assert modelled.per_device[key] == per_device[key], key
    assert 0.3 < modelled.per_device["activations"] / per_device["activations"] < 3
    assert modelled.fits is True and modelled.usable_memory == 0.75 * 80 * 2**30


def test_gpt2_and_llama_on_h100(tiny_config):
    from bigjax import config as config_lib

    gpt2 = plan.make_plan(config_lib.load(GPT2), num_devices=1, device_kind="h100")
    assert gpt2.parameters == 124_475_904  # GPT-2 small with the vocabulary padded to 50304
    assert gpt2.per_device["parameters"] == 4 * gpt2.parameters
    assert gpt2.per_device["optimizer_state"] == pytest.approx(8 * gpt2.parameters, abs=64)  # Adam's two moments
    assert gpt2.fits

    llama = plan.make_plan(config_lib.load(LLAMA), num_devices=1, device_kind="h100")
    no_remat = plan.make_plan(config_lib.load(LLAMA + ":remat=none"), num_devices=1, device_kind="h100")
    assert llama.fits and no_remat.per_device["activations"] > 3 * llama.per_device["activations"]
    # Without remat, 4x the batch cannot fit one 80 GB GPU: the plan says so before any queue.
    too_big = plan.make_plan(config_lib.load(LLAMA + ":batch=32,remat=none"), num_devices=1, device_kind="h100")
    assert too_big.fits is False
    # FSDP over 8 devices divides the state by 8.
    fsdp = plan.make_plan(
        config_lib.load(LLAMA, ["config.mesh.data=1", "config.mesh.fsdp=8"]), num_devices=8, device_kind="v5p"
    )
    assert fsdp.per_device["parameters"] == pytest.approx(llama.per_device["parameters"] / 8, rel=1e-3)
    assert fsdp.usable_memory == 95 * 2**30 and not fsdp.warnings


def test_warns_when_data_parallelism_replicates_what_fsdp_would_shard(cli_in_process):
    result = cli_in_process(
        "plan", "--config", LLAMA, "--devices", "8", "--device-kind", "a100", "--config.mesh.data=8"
    )
    warning = re.search(
        r"warning: parameters and optimizer state \(([\d.]+) GiB per device\) .* data=8; "
        r"--config.mesh.data=1 --config.mesh.fsdp=8 would shard them to ([\d.]+) GiB",
        result.stdout,
    )
    assert warning, result.stdout
    assert float(warning[1]) / float(warning[2]) == pytest.approx(8, rel=0.01)
    assert "fits: yes" in result.stdout and "NVIDIA A100-SXM4-80GB" in result.stdout


def test_plan_command_line(cli, cli_in_process):
    result = cli(
        "plan",
        "--config",
        LLAMA,
        "--devices",
        "64",
        "--device-kind",
        "v5e",
        "--config.mesh.data=1",
        "--config.mesh.fsdp=-1",
        "--config.batch_size=64",
        "--json",
    )
    report = json.loads(result.stdout)
    assert report["mesh"] == {"data": 1, "fsdp": 64, "tensor": 1, "context": 1, "expert": 1, "stage": 1}
    assert report["source"] == "model"
    assert report["fits"] is True and report["per_device"]["total"] < 16 * 2**30

    # The refusals: the same one-line errors, asked in this process.
    unknown = cli_in_process("plan", "--config", LLAMA, "--device-kind", "h7", check=False)
    assert unknown.returncode == 2 and "unknown --device-kind 'h7'; known: h200, h100" in unknown.stderr
    measure = cli_in_process("plan", "--config", LLAMA, "--measure", check=False)
    assert measure.returncode == 2 and "a CPU does not" in measure.stderr
    indivisible = cli_in_process("plan", "--config", LLAMA, "--devices", "3", "--device-kind", "h100", check=False)
    assert indivisible.returncode == 2 and "does not divide across data*fsdp*expert=3" in indivisible.stderr


def test_byte_formatting():
    assert (
        plan.fmt_bytes(3 * 2**30) == "3.00 GiB" and plan.fmt_bytes(1536) == "1.50 KiB" and plan.fmt_bytes(12) == "12 B"
    )


def test_a_frozen_backbone_is_planned_with_the_optimizer_state_training_keeps(tiny_config):
    """`plan` builds the optimizer `train` builds: frozen parameters get no optimizer state (resnet50_transfer's
    backbone, here a tiny GPT's blocks), so the planned bytes are those of the real state, not AdamW's moments for
    every parameter."""
    config = tiny_config("", "config.freeze=^(layers|final_norm)/", "config.mesh.data=2", "config.mesh.fsdp=4")
    report = plan.make_plan(config)
    state, _ = real_state(config)
    assert report.per_device["optimizer_state"] == bytes_on_device_0(state.opt_state)
    everything_trained = real_state(tiny_config("", "config.mesh.data=2", "config.mesh.fsdp=4"))[0]
    assert bytes_on_device_0(state.opt_state) < bytes_on_device_0(everything_trained.opt_state) / 2


def test_cudnn_is_planned_as_xla_where_attention_needs_a_mask(tiny_config):
    """The plan counts the kernel each call runs (bigjax.models.layers.attention_kernel): cuDNN keeps no scores for
    causal unpacked rows, but packed rows (a masked LM) and a sequence split by all_gather run XLA's, which keeps
    them."""
    from bigjax import config as config_lib
    from bigjax import tasks

    mesh = dict(data=8, fsdp=1, tensor=1, context=1)

    def kept(config, kernel, **axes):
        return plan.activation_bytes(tasks.make_task(config), config, {**mesh, **axes}, kernel)

    causal = tiny_config()
    assert kept(causal, "cudnn") < kept(causal, "xla")
    gathered = tiny_config("", "config.model.context_parallel=all_gather")
    assert kept(gathered, "cudnn", data=2, context=4) == kept(gathered, "xla", data=2, context=4)
    packed = config_lib.load(str(REPO / "experiments" / "bert_tiny_mlm.py"))
    assert kept(packed, "cudnn") == kept(packed, "xla")
