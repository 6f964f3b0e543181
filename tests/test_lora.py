"""Training through quantization and adapters (bigjax/compress/quantized.py, bigjax/compress/lora.py):
quantization-aware
training (`config.quant.qat`), LoRA (`config.lora`) and QLoRA (both, the base held as int4).

What is proven: QAT's forward pass runs the kernels rounded as post-training int8 quantization rounds them, and a
QAT run quantizes as it trained; a LoRA run starts as its base, trains the adapters alone (the base bit for bit
unchanged, optimizer state for the adapters only); one train step of QAT, LoRA and QLoRA gives the same loss and
parameters on every mesh (within tests/tolerance.py's bounds); QAT and QLoRA runs resume bit for bit; the adapters
save and load on their own and merge into the base; a QLoRA run restores onto another mesh; every bad combination
is one error.
"""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import test_hf
import test_sharding
from conftest import TINY, copy_run, init_params, run_cli
from test_hf import tokenizer_file  # noqa: F401  (the fixture: a small byte-level BPE)
from tolerance import (
    assert_sgd_params_close_after_reordering,
    float32_sum_tolerance,
    lm_sum_lengths,
)

from bigjax import config as config_lib
from bigjax import hf
from bigjax import params as params_lib
from bigjax.compress import lora, quantize, quantized
from bigjax.compress.variant import Variant
from bigjax.config import ConfigError
from bigjax.errors import UserError
from bigjax.ops import metrics
from bigjax.run import checkpoint, finetune, train
from bigjax.run import step as step_lib
from bigjax.run.setup import make_setup
from bigjax.tasks import make_task

SUB_CHANNEL = 8  # divides the tiny GPT's widths (d_model 32, head_dim 8, mlp 128)
# QAT tiles attention's output kernel [heads, head_dim, d_model] along its heads (4), PTQ along head_dim (8).
QAT_SUB_CHANNEL = 4
QAT = ("config.quant.bits=8", "config.quant.qat=True")
LORA = ("config.lora.rank=4",)
QLORA = ("config.lora.rank=4", "config.quant.bits=4", f"config.quant.sub_channel={SUB_CHANNEL}")
VARIANTS = {"qat": QAT, "lora": LORA, "qlora": QLORA}


@pytest.fixture
def base(tiny_run):
    """A trained tiny GPT (8 steps; the session's, only read): the base every LoRA run here adapts."""
    return tiny_run


@pytest.fixture(scope="module")
def qlora_run(tiny_run, tmp_path_factory):
    """A QLoRA run of the base, 8 steps (checkpoints 4 and 8): (its config, its workdir), only read."""
    config = config_lib.load(TINY, [*QLORA, f"config.init_from.workdir={tiny_run}"])
    workdir = tmp_path_factory.mktemp("qlora") / "run"
    assert train.train(config, workdir).step == 8
    return config, workdir


@pytest.fixture(scope="module")
def lora_run(tiny_run, tmp_path_factory):
    """A LoRA run of the base, 4 steps (one checkpoint, at 4; the adapters well away from zero): only read."""
    config = config_lib.load(f"{TINY}:steps=4", [*LORA, f"config.init_from.workdir={tiny_run}"])
    workdir = tmp_path_factory.mktemp("lora") / "run"
    assert train.train(config, workdir).step == 4
    assert checkpoint.committed_steps(workdir) == [4]
    return workdir


def adapted(tiny_config, base, *overrides):
    return tiny_config("", *overrides, f"config.init_from.workdir={base}")


def started(setup):
    """A run's state as `bigjax train` starts it from scratch: fresh, then init_from's and the adapters' weights."""
    state = finetune.load_pretrained_into(setup, setup.init_state())
    return lora.load(state, setup) if setup.config.lora.adapters else state


def saved_params(workdir, config=None, step=None, setup=None):
    setup = setup or make_setup(config or config_lib.load_saved(workdir))
    step = step or checkpoint.committed_steps(workdir)[-1]
    return jax.device_get(lora.restore(setup, workdir, step)[0])


def batch_on(setup, seed=0):
    return setup.sharding.global_batch(test_sharding.fixed_batch(setup.config, seed))


def mean_loss(setup, params, seed=0):
    with setup.sharding.activate():
        sums = jax.jit(lambda p, b: setup.task.loss_sums(p, {}, b)[0])(params, batch_on(setup, seed))
    return float(sums["loss"] / sums["count"])


def loss_tolerance(config) -> float:
    return float32_sum_tolerance(*lm_sum_lengths(config, tokens=config.batch_size * config.data.seq_len))


# --------------------------------------------------------------------------------------------------
# Quantization-aware training


def test_qat_runs_the_kernels_rounded_as_int8_quantization_rounds_them(tiny_config):
    """The QAT model on float weights gives the logits of the post-training int8 model on those weights quantized
    (the same per-channel absmax grid; the sums in another order), not the float model's: those differ by more than
    ten times the bound of another order of the sums. And its gradient reaches every kernel through the rounding
    (straight through)."""
    qat = make_setup(tiny_config("", *QAT))
    ptq = make_setup(tiny_config("", "config.quant.bits=8"))
    plain = make_setup(tiny_config())
    params = init_params(plain.task)
    tokens = test_sharding.fixed_batch(plain.config)["inputs"]
    # Each as one program (op by op, every operation would be a compile of its own).
    ptq_params = jax.jit(functools.partial(quantized.quantize_params, abstract_params=ptq.boxed_params()))(params)
    logits = {
        "qat": jax.jit(qat.task.model.apply)({"params": params}, tokens),
        "ptq": jax.jit(ptq.task.model.apply)({"params": ptq_params}, tokens),
        "float": jax.jit(plain.task.model.apply)({"params": params}, tokens),
    }
    scale, tolerance = float(np.abs(logits["float"]).max()), loss_tolerance(qat.config)
    assert float(np.abs(logits["qat"] - logits["ptq"]).max()) <= tolerance * scale
    assert float(np.abs(logits["qat"] - logits["float"]).max()) > 10 * tolerance * scale, "no rounding in QAT"

    batch = batch_on(qat)
    grads = jax.jit(jax.grad(lambda p: qat.task.loss_sums(p, {}, batch)[0]["loss"]))(params)
    for name, grad in params_lib.by_path(grads).items():
        if name.endswith("kernel"):
            assert np.all(np.isfinite(grad)) and np.any(grad != 0), name


def test_a_qat_run_resumes_bit_exact_and_quantizes_as_it_trained(tiny_config, tmp_path):
    config = tiny_config(
        "", "config.quant.bits=4", "config.quant.qat=True", f"config.quant.sub_channel={QAT_SUB_CHANNEL}"
    )
    assert train.train(config, tmp_path / "straight").step == 8
    assert_resumes_bit_exact(config, tmp_path / "straight", tmp_path / "resumed")

    done = quantize.quantize(tmp_path / "straight", tmp_path / "int4")  # no flags: the settings it trained for
    assert (done["bits"], done["mode"]) == (4, "weight_only")
    saved = config_lib.load_saved(tmp_path / "int4")
    assert (saved.quant.bits, saved.quant.sub_channel, saved.quant.qat) == (4, QAT_SUB_CHANNEL, False)
    with pytest.raises(quantize.QuantizeError, match="another rounding than it learned"):
        quantize.quantize(tmp_path / "straight", tmp_path / "int8", bits=8)


def assert_resumes_bit_exact(config, straight, resumed):
    """`config` trained to step 4 and resumed to 8 in `resumed`, as it was trained straight to 8 in `straight`."""
    assert train.train(config, resumed, stop_at_step=4).status == "preempted"
    assert train.train(config, resumed).step == 8
    losses = lambda workdir: {
        r["step"]: r["loss"] for r in metrics.read_jsonl(workdir / "metrics.jsonl") if "loss" in r
    }  # noqa: E731
    assert losses(resumed) == losses(straight)  # every step, bitwise
    setup = make_setup(config)
    states = [
        jax.device_get(
            checkpoint.restore_train_state(checkpoint.manager(w, read_only=True), 8, setup.state_target()).state
        )
        for w in (resumed, straight)
    ]
    jax.tree.map(np.testing.assert_array_equal, *states)  # params (integers too), adapters' moments, counts
    return setup


# --------------------------------------------------------------------------------------------------
# LoRA


def test_a_lora_run_starts_as_its_base_and_trains_the_adapters_alone(tiny_config, base):
    config = adapted(tiny_config, base, *LORA)
    setup = make_setup(config)
    state = started(setup)
    params = params_lib.by_path(jax.device_get(state.params))
    adapters = sorted(name for name in params if name.endswith(("_lora_a", "_lora_b")))
    assert len(adapters) == 12  # a pair for each of q, k, v, out, up, down
    plain = make_setup(config_lib.load_saved(base))
    base_params = saved_params(base, setup=plain)
    assert mean_loss(setup, state.params) == mean_loss(plain, jax.device_put(base_params, plain.state_shardings.params))

    # Optimizer state for the adapters alone: every array in it belongs to one (the rest are AdamW's step counts).
    moments = {name for name, leaf in params_lib.by_path(state.opt_state).items() if np.ndim(leaf) > 0}
    assert moments and all(name.endswith(("_lora_a", "_lora_b")) for name in moments), sorted(moments)

    step, _ = step_lib.compile_train_step(setup)
    for seed in range(3):
        state, _ = step(state, batch_on(setup, seed))
    after = params_lib.by_path(jax.device_get(state.params))
    for name, value in params_lib.by_path(base_params).items():
        np.testing.assert_array_equal(after[name], value, err_msg=f"{name} changed: the base must stay frozen")
    assert all(np.any(after[name] != params[name]) for name in adapters)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_one_train_step_matches_on_every_mesh(tiny_config, variant):
    """One SGD step from the same weights (the adapters random, so that both A and B have a gradient) on each mesh:
    the same loss, and the same parameters up to the order of the sums. The quantized kernels are the same integers
    on every mesh (absmax and rounding of the same weights), so only the sums move."""
    config = tiny_config("", *VARIANTS[variant], "config.optim.name=sgd", "config.optim.clip=0")
    reference = None
    for shape in test_sharding.MESHES:
        setup = test_sharding.on_mesh(config, shape)
        if reference is None:  # one fresh state, placed on every mesh (its optimizer state holds no weights)
            start = jax.device_get(setup.init_state())
            initial = with_random_adapters(start.params)
            start = start.replace(params=initial)
        state = jax.device_put(start, setup.state_shardings)
        step, _ = step_lib.compile_train_step(setup)
        state, m = step(state, batch_on(setup))
        result = float(m["loss"]), trained(setup, jax.device_get(state.params))
        if reference is None:
            reference = result
            continue
        tolerance = loss_tolerance(config)
        assert result[0] == pytest.approx(reference[0], rel=tolerance, abs=0), f"loss on mesh {shape}"
        assert_sgd_params_close_after_reordering(
            result[1], reference[1], trained(setup, initial), tolerance, 1, f"params on mesh {shape}"
        )


def with_random_adapters(params):
    rng = np.random.default_rng(0)
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: (
            rng.normal(0, 0.1, leaf.shape).astype(leaf.dtype)
            if params_lib.param_path(path).endswith("_lora_b")
            else leaf
        ),
        params,
    )


def trained(setup, params) -> dict:
    """What a step changes: every float parameter of a QAT run; a LoRA run's adapters."""
    flat = params_lib.by_path(params)
    if not setup.variant.lora:
        return flat
    return {name: flat[name] for name in lora.trained_names(setup.variant, setup.config.freeze, params)}


def test_lora_dropout_drops_the_adapters_inputs_anew_for_each_rng(tiny_config):
    """With lora.dropout, two training passes with different rngs give different losses (and the same rng the same
    loss); with lora.dropout=0 the rng changes nothing (the tiny model has no dropout of its own). The adapters are
    random: with B at zero they add nothing, dropped or not."""
    params = None
    for rate in (0.5, 0.0):
        config = tiny_config("", *LORA, f"config.lora.dropout={rate}")
        task = make_task(config)
        params = params or with_random_adapters(init_params(task))  # the same parameters at either rate
        batch = test_sharding.fixed_batch(config)
        loss = jax.jit(lambda rng: task.loss_sums(params, {}, batch, rng, train=True)[0]["loss"])  # noqa: B023
        first, again, other = (float(loss(jax.random.key(seed))) for seed in (0, 0, 1))
        assert first == again
        assert (first != other) == (rate > 0), (rate, first, other)


def test_a_qlora_run_resumes_bit_exact_holding_int4(qlora_run, tmp_path):
    config, straight = qlora_run
    setup = assert_resumes_bit_exact(config, straight, tmp_path / "resumed")
    params = params_lib.by_path(saved_params(straight, setup=setup))
    assert params["layers/mlp/up/kernel/array/qvalue"].dtype == jnp.int4


# --------------------------------------------------------------------------------------------------
# The command line: save, load, merge, restore elsewhere


@pytest.mark.parametrize("variant", ["lora", "qlora"])
def test_adapters_save_load_and_merge_from_the_command_line(
    tiny_config, base, lora_run, qlora_run, cli_in_process, tmp_path, variant
):
    """`lora save` and `lora merge` run as processes for LoRA (the commands' tests through a process), through
    cli.main in this process for QLoRA, as eval and generate do here (tested as processes elsewhere). Of a copy of
    the module's LoRA run (4 steps: adapters well away from zero) or QLoRA run (8 steps): the eval writes into it."""
    lora_cli = run_cli if variant == "lora" else cli_in_process
    trained_run = lora_run if variant == "lora" else qlora_run[1]
    run, adapters, merged = copy_run(trained_run, tmp_path), tmp_path / "adapters", tmp_path / "merged"
    lora_cli("lora", "save", "--workdir", run, "--out", adapters)
    shapes = json.loads((adapters / lora.SETTINGS_FILE).read_text())["shapes"]
    saved, trained_params = config_lib.load_saved(run), saved_params(run)
    assert sorted(shapes) == sorted(lora.trained_names(Variant.of(saved), saved.freeze, trained_params))

    # A new run from the same base and the saved adapters starts where the LoRA run ended.
    again = make_setup(adapted(tiny_config, base, *VARIANTS[variant], f"config.lora.adapters={adapters}"))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(started(again).params), trained_params)

    lora_cli("lora", "merge", "--workdir", run, "--out", merged)
    merged_config = config_lib.load_saved(merged)
    assert Variant.of(merged_config).kind == "float"
    assert not any(name.endswith("_lora_a") for name in params_lib.by_path(saved_params(merged)))
    lora_loss, merged_loss = eval_loss(cli_in_process, run), eval_loss(cli_in_process, merged)
    # x (W + s A B) against x W + s (x A) B: the same sums in another order.
    assert merged_loss == pytest.approx(lora_loss, rel=loss_tolerance(merged_config), abs=0)
    if variant == "lora":
        generated = cli_in_process("generate", "--workdir", run, "--prompt", "ROMEO", "--max-new-tokens", 4).stdout
        assert "ROMEO" in generated


def test_a_merged_run_fine_tunes_like_any_run(lora_run, tmp_path):
    """`bigjax lora merge`'s run trains on in its workdir: from the merged step, with a fresh optimizer, on the data
    where the LoRA run stopped."""
    run, merged = lora_run, tmp_path / "merged"
    lora.merge(run, merged)
    summary = train.train(config_lib.load_saved(merged, ["config.total_steps=6", "config.checkpoint_every=2"]), merged)
    assert (summary.step, summary.status) == (6, "finished")
    data_at = lambda workdir, step: checkpoint.saved_json(checkpoint.manager(workdir, read_only=True), step, "data")
    assert data_at(merged, 4) == data_at(run, 4) and data_at(merged, 6)["step"] == 6


def eval_loss(cli, workdir, *overrides) -> float:
    cli("eval", "--workdir", workdir, "--once", *overrides)
    rows = [json.loads(line) for line in (workdir / "eval" / "metrics.jsonl").read_text().splitlines()]
    return rows[-1]["loss"]


def test_a_qlora_run_restores_onto_another_mesh(qlora_run):
    """Trained on 8 x 1 x 1, read onto 1 x 4 x 2: the int4 base and the adapters split as their logical names say,
    and the loss is the same up to the order of the sums."""
    config, run = qlora_run
    losses = []
    for shape in [(8, 1, 1), (1, 4, 2)]:
        setup = test_sharding.on_mesh(config_lib.load_saved(run), shape)
        params = lora.restore(setup, run, 8)[0]
        if shape == (1, 4, 2):
            a = params["layers"]["attention"]["query"]["kernel_lora_a"]  # [layers, embed, rank]
            # The layer axis follows "stage" (size 1 here): whole on every device; the embed axis splits 4 ways.
            assert a.addressable_shards[0].data.shape == (a.shape[0], a.shape[1] // 4, a.shape[2]), a.sharding.spec
            assert tuple(a.sharding.spec)[1] == "fsdp", a.sharding.spec
            qvalue = params["layers"]["attention"]["query"]["kernel"].array.qvalue
            assert qvalue.addressable_shards[0].data.shape == (2, 32 // 4, 4 // 2, 8)
        losses.append(mean_loss(setup, params))
    assert losses[1] == pytest.approx(losses[0], rel=loss_tolerance(config), abs=0)


# --------------------------------------------------------------------------------------------------
# Refusals


def test_bad_combinations_are_one_error(tiny_config, base, lora_run, cli_in_process, tmp_path):
    with pytest.raises(ConfigError, match="freezes the LoRA adapters layers/attention"):
        make_setup(tiny_config("", *LORA, "config.freeze=attention"))
    with pytest.raises(ConfigError, match="matches no layer that takes adapters"):
        make_setup(tiny_config("", *LORA, "config.lora.targets=nothing_is_called_this"))
    with pytest.raises(ConfigError, match="names layers/mlp/down/kernel/array/qvalue, .*held as int4"):
        make_setup(tiny_config("", *QLORA, "config.lora.train=layers/mlp/"))
    with pytest.raises(ConfigError, match="QLoRA holds its frozen base as integers"):
        tiny_config("", *QLORA, "config.quant.qat=True")
    with pytest.raises(ConfigError, match="config.lora.rank must be >= 0"):
        tiny_config("", "config.lora.rank=-1")
    # The tiny GPT's adapted kernels are at least 32 wide on each side: a rank above that adds nothing.
    with pytest.raises(ConfigError, match=r"config.lora.rank=33 .*the largest useful rank here is 32"):
        make_setup(tiny_config("", "config.lora.rank=33"))
    with pytest.raises(lora.LoraError, match="is not a LoRA run"):
        lora.save(base, tmp_path / "adapters")

    run, adapters = lora_run, tmp_path / "adapters"
    lora.save(run, adapters)
    # Readable as any file this user writes (safetensors writes 0600): a server running as another user loads it.
    umask = os.umask(0o022)
    os.umask(umask)
    assert (adapters / lora.WEIGHTS_FILE).stat().st_mode & 0o777 == 0o666 & ~umask
    # Saved adapters are never replaced, nor a file overwritten: --out must be new or empty.
    saved = {p.name: p.read_bytes() for p in adapters.iterdir()}
    (tmp_path / "a_file").write_text("mine")
    for out, message in ((adapters, "is not empty"), (tmp_path / "a_file", "is a file")):
        with pytest.raises(UserError, match=f"--out {out} {message}"):
            lora.save(run, out)
    assert {p.name: p.read_bytes() for p in adapters.iterdir()} == saved
    assert (tmp_path / "a_file").read_text() == "mine"
    other_rank = make_setup(
        adapted(tiny_config, base, "config.lora.rank=2", f"config.lora.adapters={tmp_path}/adapters")
    )
    with pytest.raises(lora.LoraError, match="lora.rank: 4 there, 2 here"):
        started(other_rank)
    # `bigjax train` refuses them before it writes anything: no workdir, no empty checkpoints/ in it.
    with pytest.raises(lora.LoraError, match="lora.rank: 4 there, 2 here"):
        train.train(other_rank.config, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    other_alpha = make_setup(
        adapted(tiny_config, base, *LORA, "config.lora.alpha=32.0", f"config.lora.adapters={tmp_path}/adapters")
    )
    with pytest.raises(lora.LoraError, match="lora.alpha: 16.0 there, 32.0 here"):
        started(other_alpha)
    with pytest.raises(quantize.QuantizeError, match="merge its adapters first"):
        quantize.quantize(run, tmp_path / "int8")

    # On the command line (cli.main, in this process): one `error:` line, exit 2; the run refused is left as it was.
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    result = cli_in_process("export", "--workdir", run, "--out", tmp_path / "hf", check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "bigjax lora merge" in errors[0], result.stderr[-2000:]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before


def test_lora_and_qlora_start_from_a_hugging_face_model(tokenizer_file, tmp_path):  # noqa: F811 (the fixture)
    """init_from.workdir=hf:PATH under LoRA: the base's weights are the HF model's (imported as `bigjax import`
    reads them), bit for bit, the adapters fresh; under QLoRA its kernels are those weights quantized, exactly as
    post-training quantization quantizes them."""
    hf_dir, imported = tmp_path / "hf", tmp_path / "imported"
    test_hf.save(test_hf.llama_model(), hf_dir, tokenizer_file)
    hf.import_hf(hf_dir, imported)
    expected = saved_params(imported)

    for overrides in (LORA, QLORA):
        config = config_lib.load_saved(imported, [*overrides, f"config.init_from.workdir=hf:{hf_dir}"])
        setup = make_setup(config)
        params = params_lib.by_path(jax.device_get(started(setup).params))
        want = expected
        if setup.variant.quant:
            quantize = functools.partial(quantized.quantize_params, abstract_params=setup.boxed_params())
            want = jax.device_get(jax.jit(quantize)(expected))  # one program, not one compile per operation
        for name, value in params_lib.by_path(want).items():
            np.testing.assert_array_equal(params[name], value, err_msg=f"{name} ({' '.join(overrides)})")
        assert all(not np.any(value) for name, value in params.items() if name.endswith("_lora_b"))


@pytest.mark.parametrize("variant", ["lora", "qlora"])
def test_a_bert_classifier_adapts_with_its_new_head_and_pooler_trained_float(variant):
    """A text classifier under LoRA/QLoRA: the encoder's projections take adapters (int4 under QLoRA), the new head
    and BERT's pooler (lora.train's default) stay float and train whole; a train step moves them and the adapters,
    and nothing else."""
    import test_text_models

    config = test_text_models.tiny("bert", "classification")
    for override in VARIANTS[variant]:
        config_lib.apply_override(config, override)
    config_lib.check_values(config)
    setup = make_setup(config)
    state = setup.init_state()
    before = params_lib.by_path(jax.device_get(state.params))
    trains = set(lora.trained_names(setup.variant, config.freeze, state.params))
    assert {"classifier/kernel", "pooler/kernel"} <= trains and any(n.endswith("_lora_b") for n in trains)
    # Three steps: the head starts at zero, so the encoder has a gradient from step 2, and A (B starting at zero) from
    # step 3.
    step, _ = step_lib.compile_train_step(setup)
    for seed in range(3):
        state, m = step(state, setup.sharding.global_batch(test_text_models.fixed_batch(config, seed)))
        assert np.isfinite(float(m["loss"]))
    after = params_lib.by_path(jax.device_get(state.params))
    for name, value in before.items():
        assert bool(np.any(after[name] != value)) == (name in trains), name
