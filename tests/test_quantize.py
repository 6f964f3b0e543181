"""Post-training quantization (`bigjax quantize`, bigjax/compress/quantized.py): a trained tiny GPT quantized to int8
and int4 evaluates close to the float run, holds integers and scales on disk in less space, generates through the
KV cache as the quantized full forward says, restores onto another mesh; quantization off leaves the model as it
was; every bad combination is one `error:` line; the vision families quantize their Dense layers, not their convs.

How close is close: absmax rounding moves each int8 weight by at most 1/254 of the largest magnitude in its output
channel, and each int4 weight by at most 1/14 of the largest in its block of `sub_channel` inputs. Through a 2-layer
net, the logits move by about that fraction of their own size; the trained tiny model's logits are below 1 in
magnitude, and the cross-entropy moves by at most twice the largest logit change (log-sum-exp and the target's logit
are each 1-Lipschitz in the max norm). So the eval loss may move by about 2/254 < 0.01 nats for int8 and 2/14 < 0.15
for int4; the bounds below are those, and the loss must move at all (the integers, not the floats, are run).
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import copy_run, init_params, run_cli
from tolerance import assert_close_after_reordering, float32_sum_tolerance, lm_sum_lengths

from bigjax import config as config_lib
from bigjax import deploy, generate
from bigjax import params as params_lib
from bigjax.compress import quantize, quantized
from bigjax.errors import UserError
from bigjax.models import gpt
from bigjax.run import checkpoint
from bigjax.run.setup import make_setup
from bigjax.tasks import make_task

SUB_CHANNEL = 8  # divides the tiny GPT's widths (d_model 32, head_dim 8, mlp 128)
LOSS_BOUND = {8: 0.01, 4: 0.15}  # nats; see the module docstring
KERNELS = ["attention/key", "attention/out", "attention/query", "attention/value", "mlp/down", "mlp/up"]


@pytest.fixture(scope="module")
def runs(tiny_run, tmp_path_factory):
    """A trained tiny GPT (the session's tiny_run: 8 steps, 8 devices; a copy, as the evals here write into it),
    quantized to int8 and int4: {"float"|8|4: workdir}. The int8 run is `bigjax quantize` without --bits or --mode,
    in a process of its own: int8 weight-only, as documented (test_the_checkpoint_holds_...). The int4 run is what
    that command calls with --bits 4 --sub-channel 8, in this process (--bits 4 --sub-channel through the command
    line: test_bad_quantizations_...)."""
    root = tmp_path_factory.mktemp("quant")
    workdirs = {"float": copy_run(tiny_run, root / "float"), 8: root / "int8", 4: root / "int4"}
    run_cli("quantize", "--workdir", workdirs["float"], "--out", workdirs[8])
    quantize.quantize(workdirs["float"], workdirs[4], bits=4, sub_channel=SUB_CHANNEL)
    return workdirs


def eval_loss(cli, workdir, *overrides) -> float:
    """`bigjax eval --once` (through cli_in_process: the eval of a quantized run, not the process, is tested)."""
    out = cli("eval", "--workdir", workdir, "--once", *overrides).stdout + ""
    rows = [json.loads(line) for line in (workdir / "eval" / "metrics.jsonl").read_text().splitlines()]
    assert rows, out
    return rows[-1]["loss"]


def test_quantized_runs_evaluate_close_to_the_float_run(runs, cli_in_process):
    float_loss = eval_loss(cli_in_process, runs["float"])
    for bits in (8, 4):
        loss = eval_loss(cli_in_process, runs[bits])
        assert loss != float_loss, f"int{bits}: the same loss as the float run: were the integers run at all?"
        assert abs(loss - float_loss) < LOSS_BOUND[bits], (bits, loss, float_loss)


@pytest.mark.parametrize("bits", [8, 4])
def test_the_checkpoint_holds_integer_kernels_and_scales_in_less_space(runs, bits):
    workdir = runs[bits]
    config = config_lib.load_saved(workdir)
    assert (config.quant.bits, config.quant.mode) == (bits, "weight_only")
    step = checkpoint.committed_steps(workdir)[-1]
    mngr = checkpoint.manager(workdir, read_only=True)
    saved = {
        "/".join(path): (tuple(leaf.shape), str(leaf.dtype))
        for path, leaf in _flat(checkpoint.saved_tree(mngr, step)).items()
        if leaf is not None
    }
    layers, d, heads, head_dim, mlp = 2, 32, 4, 8, 128
    tiles = {8: 1, 4: d // SUB_CHANNEL}[bits]  # scales along the input channels: one (per-channel) or one per block
    assert saved["layers/attention/query/kernel/array/qvalue"] == ((layers, d, heads, head_dim), f"int{bits}")
    assert saved["layers/attention/query/kernel/array/scale"] == ((layers, tiles, heads, head_dim), "float32")
    mlp_tiles = {8: 1, 4: mlp // SUB_CHANNEL}[bits]
    assert saved["layers/mlp/down/kernel/array/qvalue"] == ((layers, mlp, d), f"int{bits}")
    assert saved["layers/mlp/down/kernel/array/scale"] == ((layers, mlp_tiles, d), "float32")
    for kernel in KERNELS:
        assert saved[f"layers/{kernel}/kernel/array/qvalue"][1] == f"int{bits}", kernel
    # What stays float: embeddings (the tied output layer), norms, biases.
    assert saved["embed/embedding"][1] == saved["position_embed/embedding"][1] == "float32"
    assert saved["final_norm/norm/scale"][1] == saved["layers/attention/query/bias"][1] == "float32"
    assert not any(dtype.startswith("int") for name, (_, dtype) in saved.items() if "qvalue" not in name)
    # No optimizer state: parameters alone.
    assert not (checkpoint.step_dir(workdir, step) / "opt_state").exists()
    assert _size(checkpoint.step_dir(workdir, step) / "params") < _size(
        checkpoint.step_dir(runs["float"], step) / "params"
    )
    source = json.loads((workdir / "quantized.json").read_text())
    assert source["step"] == step and source["bits"] == bits
    assert sorted(source["kernels"]) == [f"layers/{kernel}/kernel" for kernel in KERNELS]


def _flat(tree, prefix=()):
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, (*prefix, key)))
        else:
            out[(*prefix, key)] = value
    return out


def _size(path) -> int:
    return sum(p.stat().st_size for p in pathlib.Path(path).rglob("*") if p.is_file())


def test_generation_runs_the_quantized_weights_through_the_kv_cache(runs, cli_in_process):
    """The cached decoding of the int4 run gives the logits of its full (quantized) forward pass, which differ from
    the float run's: the KV cache and the integer kernels work together."""
    generator = generate.load(runs[4])
    config = config_lib.load_saved(runs[4])
    task = make_task(config)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, (2, 24)).astype(np.int32)
    full = jax.jit(task.model.apply)({"params": generator.params}, tokens)
    float_generator = generate.load(runs["float"])
    float_full = jax.jit(make_task(config_lib.load_saved(runs["float"])).model.apply)(
        {"params": float_generator.params}, tokens
    )
    assert np.abs(np.asarray(full) - np.asarray(float_full)).max() > 1e-5  # the integers are what runs
    lengths = np.array([5, 11])
    logits, cache = generator.prefill([tokens[0, :5], tokens[1, :11]], columns=32)
    cached, expected = [logits], [full[[0, 1], lengths - 1]]
    for i in range(8):
        positions = lengths + i
        logits, cache = generator.decode_step(cache, tokens[[0, 1], positions], positions)
        cached.append(logits)
        expected.append(full[[0, 1], positions])
    tolerance = float32_sum_tolerance(*lm_sum_lengths(config, tokens=32))
    assert_close_after_reordering(np.stack(cached), np.stack(expected), tolerance, "cached logits")

    greedy = ["--max-new-tokens", 12, "--temperature", 0]
    result = cli_in_process("generate", "--workdir", runs[4], "--prompt", "ROMEO:", *greedy)
    assert result.stdout.startswith("ROMEO:")


def test_a_quantized_run_restores_onto_another_mesh(runs, cli_in_process):
    """Saved on 8 x 1 x 1 (replicated), read onto 1 x 4 x 2: the integers and their scales split over fsdp and
    tensor as their kernels' logical names say, and the eval loss is the same up to the order of the sums."""
    mesh = ["--config.mesh.data=1", "--config.mesh.fsdp=4", "--config.mesh.tensor=2"]
    config = config_lib.load_saved(runs[4], [override[2:] for override in mesh])
    setup = make_setup(config)
    step = checkpoint.committed_steps(runs[4])[-1]
    mngr = checkpoint.manager(runs[4], read_only=True)
    variables = checkpoint.restore_variables(mngr, step, setup.variables_target())
    query = variables["params"]["layers"]["attention"]["query"]["kernel"].array
    assert query.qvalue.dtype == jnp.int4
    spec = tuple(query.qvalue.sharding.spec)
    assert spec[1:3] == ("fsdp", "tensor"), spec  # [layers, embed, heads, kv]
    assert tuple(query.scale.sharding.spec)[1:3] == ("fsdp", "tensor")
    assert query.qvalue.addressable_shards[0].data.shape == (2, 32 // 4, 4 // 2, 8)

    on_8x1x1 = eval_loss(cli_in_process, runs[4])
    on_1x4x2 = eval_loss(cli_in_process, runs[4], *mesh)
    assert abs(on_1x4x2 - on_8x1x1) <= 1e-5 * abs(on_8x1x1), (on_1x4x2, on_8x1x1)


def test_quantization_off_builds_the_model_and_state_of_today(tiny_config):
    """config.quant.bits=0 (the default): the task's model is the plain GPT module, not a Qwix-wrapped class, and
    the state (parameters, optimizer moments) has the paths, shapes and dtypes the model alone gives; the loss is
    that of the model applied directly."""
    config = tiny_config()
    assert config.quant.bits == 0
    task = make_task(config)
    assert type(task.model) is gpt.GPT
    assert task.variant.kind == "float" and quantized.quantized(task.model, task.variant) is task.model
    plain = jax.eval_shape(lambda: gpt.GPT(task.model_config).init(jax.random.key(0), jnp.zeros((1, 32), jnp.int32)))
    setup = make_setup(config)
    shapes = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype), tree)  # noqa: E731
    import flax.linen as nn

    assert shapes(setup.abstract_state.params) == shapes(nn.unbox(plain)["params"])
    assert len(jax.tree.leaves(setup.abstract_state.opt_state)) > 2 * len(jax.tree.leaves(plain))  # adamw moments
    params = init_params(task)
    batch = {
        "inputs": jnp.ones((2, 32), jnp.int32),
        "targets": jnp.ones((2, 32), jnp.int32),
        "weights": jnp.ones((2, 32), jnp.float32),
    }
    from bigjax.tasks.causal_lm import token_loss_sums

    def both(params):  # one program, not op by op
        logits = gpt.GPT(task.model_config).apply({"params": params}, batch["inputs"])
        return task.loss_sums(params, {}, batch)[0], token_loss_sums(logits, batch["targets"], batch["weights"])

    sums, direct = jax.jit(both)(params)
    assert float(sums["loss"]) == float(direct["loss"])
    deploy.check_exportable(config, "onnx", "a float run")  # quant.bits=0 is no quantized run to the exporters


def test_dynamic_mode_also_quantizes_the_activations(tiny_config):
    """mode=dynamic runs the int8 kernels on int8 activations: its logits differ from weight-only's on the same
    integer weights by far more than another order of the sums would, and stay close to the float model's."""
    float_task = make_task(tiny_config())
    params = init_params(float_task)
    tokens = np.random.default_rng(0).integers(0, 256, (2, 32)).astype(np.int32)
    logits = {"float": np.asarray(jax.jit(float_task.model.apply)({"params": params}, tokens))}
    integers = None  # the same integer weights for both modes
    for mode in ("weight_only", "dynamic"):
        setup = make_setup(tiny_config("", "config.quant.bits=8", f"config.quant.mode={mode}"))
        if integers is None:
            boxed = setup.boxed_params()
            integers = jax.jit(lambda p: quantized.quantize_params(p, boxed))(params)  # noqa: B023
        logits[mode] = np.asarray(jax.jit(setup.task.model.apply)({"params": integers}, tokens))
    scale = np.abs(logits["float"]).max()
    tolerance = float32_sum_tolerance(*lm_sum_lengths(tiny_config(), tokens=tokens.size))
    assert np.abs(logits["dynamic"] - logits["weight_only"]).max() > 10 * tolerance * scale, "no activation rounding"
    assert np.abs(logits["dynamic"] - logits["float"]).max() < 0.05 * scale


@pytest.mark.parametrize("variant", ["ptq", "qlora"])
def test_an_untied_output_layer_stays_float_and_gets_no_adapters(tiny_config, variant):
    overrides = {"ptq": ["config.quant.bits=8"], "qlora": ["config.quant.bits=8", "config.lora.rank=4"]}[variant]
    setup = make_setup(tiny_config("", "config.model.tie_embeddings=False", *overrides))
    names = params_lib.by_path(setup.abstract_state.params)
    assert {name for name in names if name.startswith("unembed/")} == {"unembed/kernel"}  # no adapter, no scale
    assert names["unembed/kernel"].dtype == jnp.float32
    assert names["layers/mlp/up/kernel/array/qvalue"].dtype == jnp.int8  # the other kernels are integers


@pytest.mark.parametrize("variant", ["ptq", "lora"])
def test_which_layers_stay_float_follows_their_class_not_their_name(variant):
    """A plain Dense named as an output layer once was ("head") is quantized and gets adapters; an output layer
    (layers.FloatDense) under a name no rule ever listed stays float and gets none."""
    from flax import linen as nn

    from bigjax.compress.variant import Lora, Quant, Variant
    from bigjax.models import layers

    class Renamed(nn.Module):
        @nn.compact
        def __call__(self, x):
            return layers.FloatDense(4, name="renamed_output")(nn.Dense(8, name="head")(x))

    quant, lora = Quant(bits=8, mode="weight_only", sub_channel=32, qat=False), Lora(4, 16.0, ".*", 0.0, "")
    model = quantized.quantized(Renamed(), Variant(quant=quant) if variant == "ptq" else Variant(lora=lora))
    names = params_lib.by_path(jax.eval_shape(model.init, jax.random.key(0), jnp.ones((2, 16)))["params"])
    assert {name for name in names if name.startswith("renamed_output/")} == {
        "renamed_output/kernel",
        "renamed_output/bias",
    }
    assert names["renamed_output/kernel"].dtype == jnp.float32
    if variant == "ptq":
        assert names["head/kernel/array/qvalue"].dtype == jnp.int8
    else:
        assert {"head/kernel_lora_a", "head/kernel_lora_b"} <= set(names)


def one_error_line(result) -> str:
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1, result.stderr[-2000:]
    return errors[0]


def test_bad_quantizations_are_one_error_line(runs, cli_in_process, tmp_path):
    float_run = runs["float"]
    bad_blocks = ["--out", tmp_path / "a", "--bits", 4, "--sub-channel", 12]
    line = one_error_line(run_cli("quantize", "--workdir", float_run, *bad_blocks, check=False))
    assert "config.quant.sub_channel=12 does not divide" in line and "layers/attention" in line
    assert not (tmp_path / "a").exists()

    # The other refusals are the same kind of error (a UserError, which the CLI prints as one line, as above and
    # below): asked in this process, each without a process of its own to start.
    untrained = tmp_path / "untrained"
    untrained.mkdir()
    (untrained / "config.json").write_text((float_run / "config.json").read_text())
    with pytest.raises(UserError, match="no committed checkpoint"):
        quantize.quantize(untrained, tmp_path / "b")

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(UserError, match="is not empty"):
        quantize.quantize(float_run, tmp_path / "full")
    (tmp_path / "a_file").write_text("mine")
    with pytest.raises(UserError, match="--out .*a_file is a file"):
        quantize.quantize(float_run, tmp_path / "a_file")
    assert (tmp_path / "a_file").read_text() == "mine"

    with pytest.raises(UserError, match="quantized run already"):
        quantize.quantize(runs[8], tmp_path / "c")
    assert not any((tmp_path / name).exists() for name in ("b", "c"))

    # `bigjax quantize` above ran as a process; train and export, each tested as a process elsewhere, in this one.
    train_it = ["train", "--config", runs[8] / "config.json", "--workdir", runs[8]]
    line = one_error_line(cli_in_process(*train_it, check=False))
    assert "config.quant.bits=8: this is a quantized run" in line

    for export_format in ("hf", "onnx"):
        export = ["export", "--workdir", runs[8], "--out", tmp_path / export_format, "--format", export_format]
        line = one_error_line(cli_in_process(*export, check=False))
        assert "is a quantized run" in line, line


def vision_task(family: str, bits: int):
    from test_vision import vision_config

    config = vision_config(family, f"config.quant.bits={bits}", "config.quant.sub_channel=8")
    return config, make_task(config)


@pytest.mark.parametrize("family", ["vit", "cnn"])
def test_vision_families_quantize_their_dense_layers_and_keep_convolutions_float(family):
    config, task = vision_task(family, 8)
    float_task = make_task(config_lib.from_dict({**config.to_dict(), "quant": {"bits": 0}}))
    boxed = jax.eval_shape(task.init_variables, jax.random.key(0))
    kernels = quantized.quantized_paths(boxed["params"])
    expected = {
        "vit": [f"layers/{kernel}/kernel" for kernel in KERNELS],  # not patch_embed (a conv), not head
        "cnn": ["hidden/kernel"],  # not conv1, conv2, head
    }[family]
    assert sorted(kernels) == expected
    float_params = init_params(float_task)
    # The head starts at zero, and so would every logit: give it values (it stays float in both models).
    head = float_params["head"]["kernel"]
    float_params["head"]["kernel"] = jax.random.normal(jax.random.key(2), head.shape, head.dtype)
    params = jax.jit(lambda p: quantized.quantize_params(p, boxed["params"]))(float_params)
    for kernel in kernels:
        *parents, leaf = kernel.split("/")
        node = params
        for key in parents:
            node = node[key]
        assert node[leaf].array.qvalue.dtype == jnp.int8, kernel
    images = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))
    logits = np.asarray(jax.jit(task.model.apply)({"params": params}, images))  # one program each, not op by op
    float_logits = np.asarray(jax.jit(float_task.model.apply)({"params": float_params}, images))
    assert np.abs(float_logits).max() > 0.1
    difference = np.abs(logits - float_logits).max()
    assert 0 < difference < 0.02 * np.abs(float_logits).max(), difference


def test_a_model_with_nothing_to_quantize_is_refused(tmp_path):
    from test_vision import vision_config

    from bigjax.compress.quantize import QuantizeError, quantize

    config = vision_config("resnet")
    workdir = tmp_path / "resnet"
    workdir.mkdir()
    (workdir / "config.json").write_text(config_lib.to_json(config))
    (workdir / "checkpoints" / "1").mkdir(parents=True)
    (workdir / "checkpoints" / "1" / checkpoint.COMMIT_MARKER).write_text("")
    with pytest.raises(QuantizeError, match="no layer of this model is quantized"):
        quantize(workdir, tmp_path / "out", bits=8)


@pytest.mark.parametrize("bits", [8, 4])
def test_bench_times_the_forward_pass_of_a_quantized_run(runs, bits):
    """No figure is checked (timings are not tests): that a quantized run's config is benchmarked as the eval step
    on its integer weights, int4 included (which jax's ahead-of-time executable refuses on the CPU)."""
    from bigjax import bench

    result = bench.bench(config_lib.load_saved(runs[bits]), steps=2, warmup=1, windows=1)
    assert result["step"] == "eval (forward only)" and result["quant"]["bits"] == bits
    assert result["tokens_per_second"] > 0
