"""Pipeline parallelism (bigjax.parallel.pipeline): the layers cut into stages over the mesh axis `stage`, micro-batches
streamed through them, equal the layers run one after another on the whole batch.

Two levels. A toy stack (tanh layers of a few numbers: compiled in a second) runs every schedule on every stage count
and proves the planted bugs are caught. The tiny Llama then shows the same of the model: loss and every parameter's
gradient of the pipelined model equal the unpipelined one's on one device, beside the other mesh axes.

Every pipelined run here starts its bubble slots with NaN (pipeline.BUBBLE_FILL, as Praxis's tests do): a bubble that
leaked into a result or a gradient would make it NaN, so each equality below is also the proof that none does.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType
from tolerance import assert_close_after_reordering, float32_sum_tolerance, lm_sum_lengths

from bigjax.parallel import pipeline as pipeline_lib

# (stages, micro-batches, repeats): stage in {2, 4}, microbatches in {stage, 2 stage}, gpipe (1 pass) and circular (2).
SCHEDULES = [(s, m, r) for s in (2, 4) for m in (s, 2 * s) for r in (1, 2)]
LAYERS, ROWS, LENGTH, WIDTH = 8, 16, 3, 4


@pytest.fixture(autouse=True)
def nan_bubbles(monkeypatch):
    monkeypatch.setattr(pipeline_lib, "BUBBLE_FILL", float("nan"))


def toy_group(weights, x, slot, positions):
    """Consecutive tanh layers, each adding a little of the rows' positions (an extra that travels with them), and
    each layer's sum of squares over the rows: what a layer sums over the batch (as a MoE layer its router's)."""
    del slot

    def layer(x, w):
        y = jnp.tanh(x @ w) + 0.01 * positions[..., None]
        return y, jnp.sum(y**2)

    return jax.lax.scan(layer, x, weights)


def toy_inputs():
    weights = jax.random.normal(jax.random.key(0), (LAYERS, WIDTH, WIDTH)) * 0.5
    x = jax.random.normal(jax.random.key(1), (ROWS, LENGTH, WIDTH))
    positions = jnp.broadcast_to(jnp.arange(LENGTH, dtype=jnp.float32), (ROWS, LENGTH)) + jnp.arange(ROWS)[:, None]
    return weights, x, positions


def toy_result(run):
    """(output, the layers' sums, gradient of the weights, gradient of the input) of a sum of squares over the
    stack's output plus a function of each layer's sum that is not linear (as a router loss is not): a layer's sum
    must be the whole batch's, not one added per micro-batch of something else."""
    weights, x, positions = toy_inputs()

    def loss(w, x):
        out, sums = run(w, x, positions)
        return jnp.sum(out**2) + jnp.sum(jnp.sqrt(sums))

    return jax.device_get((*run(weights, x, positions), *jax.grad(loss, argnums=(0, 1))(weights, x)))


def pipelined_toy(stages, microbatches, repeats):
    mesh = jax.make_mesh((8 // stages, stages), ("data", "stage"), axis_types=(AxisType.Auto,) * 2)

    def run(w, x, positions):
        return pipeline_lib.pipeline(toy_group, w, x, (positions,), microbatches=microbatches, repeats=repeats)

    with jax.set_mesh(mesh):
        return toy_result(jax.jit(run))


# The toy's sums: the gradient of a weight adds over every row's tokens, a layer's sum over their values, and each
# layer's matmul adds WIDTH terms going forward and WIDTH going back. The pipeline adds none of its own (its psums add
# zeros to one stage's values; a layer's sum adds the micro-batches' partial sums: the same terms, in another order).
TOY_TOLERANCE = float32_sum_tolerance(ROWS * LENGTH, ROWS * LENGTH * WIDTH, *[WIDTH] * (2 * LAYERS))


@pytest.fixture(scope="module")
def toy_reference():
    return toy_result(jax.jit(lambda w, x, positions: toy_group(w, x, 0, positions)))


@pytest.mark.parametrize("stages, microbatches, repeats", SCHEDULES)
def test_toy_pipeline_equals_the_layers_in_order(toy_reference, stages, microbatches, repeats):
    result = pipelined_toy(stages, microbatches, repeats)
    what = f"stage={stages} microbatches={microbatches} repeats={repeats}"
    assert all(np.isfinite(leaf).all() for leaf in result), f"a NaN bubble leaked ({what})"
    assert_close_after_reordering(result, toy_reference, TOY_TOLERANCE, what)


def assert_differs(result, reference):
    """Some value further from the reference than the bound: the planted bug is seen."""
    with pytest.raises(AssertionError):
        assert_close_after_reordering(result, reference, TOY_TOLERANCE, "planted")


def test_planted_activations_sent_backwards(toy_reference, monkeypatch):
    backwards = lambda y, axis_name, stages: jax.lax.ppermute(
        y, axis_name, [(i, (i - 1) % stages) for i in range(stages)]
    )
    monkeypatch.setattr(pipeline_lib, "hand_on", backwards)
    assert_differs(pipelined_toy(4, 4, 1), toy_reference)


def test_planted_microbatch_counted_twice(toy_reference, monkeypatch):
    enter = pipeline_lib._Schedule.input
    twice = lambda self, t, state, xs, held: enter(self, t, state, xs.at[1].set(xs[0]), held)  # 0 enters as 1 too
    monkeypatch.setattr(pipeline_lib._Schedule, "input", twice)
    assert_differs(pipelined_toy(2, 4, 1), toy_reference)


def test_planted_circular_groups_out_of_order(toy_reference, monkeypatch):
    def consecutive(stacked, stages, repeats):  # stage s holds groups s*repeats ... (s+1)*repeats-1: gpipe's order
        per_group = jax.tree.leaves(stacked)[0].shape[0] // (stages * repeats)
        return jax.tree.map(lambda w: w.reshape(stages, repeats, per_group, *w.shape[1:]), stacked)

    monkeypatch.setattr(pipeline_lib, "stage_groups", consecutive)
    assert_close_after_reordering(pipelined_toy(2, 2, 1), toy_reference, TOY_TOLERANCE, "gpipe: one group per stage")
    assert_differs(pipelined_toy(2, 2, 2), toy_reference)


def add_sums_planted(bug: str):
    """_Schedule.add_sums with a bug: one stage's sums dropped, the bubble's counted, or each micro-batch's replacing
    the total (one micro-batch's sum standing for the batch's)."""
    add = pipeline_lib._Schedule.add_sums

    def planted(self, t, sums, group_sums):
        if bug == "stage dropped":
            return add(self, t, sums, jax.tree.map(lambda a: jnp.where(self.stage == 1, 0, a), group_sums))
        if bug == "bubble counted":
            return jax.tree.map(lambda total, new: total.at[self.pass_of(t)].add(new), sums, group_sums)
        replace = lambda total, new: total.at[self.pass_of(t)].set(jnp.where(self.working(t), new, total[0]))
        return jax.tree.map(replace, sums, group_sums)

    return planted


@pytest.mark.parametrize("bug", ["stage dropped", "bubble counted", "one micro-batch for all"])
def test_planted_layer_sums_wrong(toy_reference, monkeypatch, bug):
    monkeypatch.setattr(pipeline_lib._Schedule, "add_sums", add_sums_planted(bug))
    assert_differs(pipelined_toy(2, 4, 1), toy_reference)


def test_planted_bubble_computed_on_what_its_slot_held(toy_reference, monkeypatch):
    """A bubble slot's layers run on whatever its slot held (NaN here) rather than zeros: its results are never
    selected, yet 0 x NaN puts NaN into the weights' gradients."""
    unmasked = lambda self, t, state, xs, held: jnp.where(
        self.stage == 0, jnp.where(t < self.microbatches, xs[t % self.microbatches], held[t % self.microbatches]), state
    )
    monkeypatch.setattr(pipeline_lib._Schedule, "input", unmasked)
    output, _, weight_grads, _ = pipelined_toy(2, 2, 1)
    assert np.isfinite(output).all() and not np.isfinite(weight_grads).all()


# --------------------------------------------------------------------------------------------------
# The model: the tiny Llama with 8 layers, pipelined beside the other axes, against itself on one device.


@pytest.fixture(scope="module")
def llama_config():
    from bigjax import config as config_lib

    overrides = ["--config.model.num_layers=8", "--config.batch_size=16", "--config.data.seq_len=16"]
    return config_lib.load("experiments/tiny.py:llama=True", overrides)


@pytest.fixture(scope="module")
def one_device(llama_config):
    from conftest import model_loss_and_grads

    config = llama_config.copy_and_resolve_references()
    config.mesh.update(dict(data=1))
    return model_loss_and_grads(config, jax.devices()[:1])[:3]


def handoffs(compiled, mesh) -> list:
    """The pipeline's hand-offs in the compiled program (the collective-permutes of its jax.lax.ppermute, going
    forward and, transposed, back), each source-target pair as the mesh axes its two devices differ in. (XLA's
    resharding elsewhere makes collective-permutes of its own.)"""
    coordinates = {int(d.id): c for c, d in np.ndenumerate(mesh.devices)}
    axes = []
    for line in compiled.as_text().splitlines():
        found = re.search(r"collective-permute\(.*source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}.*/ppermute\"", line)
        for a, b in re.findall(r"\{(\d+),(\d+)\}", found.group(1) if found else ""):
            ca, cb = coordinates[int(a)], coordinates[int(b)]
            axes.append(tuple(name for name, i, j in zip(mesh.axis_names, ca, cb, strict=True) if i != j))
    return axes


@pytest.mark.parametrize(
    "mesh, microbatches, schedule",
    [
        (dict(data=4, stage=2), 4, "gpipe"),
        (dict(data=2, stage=4), 4, "circular"),
        (dict(fsdp=2, tensor=2, stage=2), 2, "circular"),
        (dict(fsdp=2, stage=4), 8, "gpipe"),
    ],
)
def test_pipelined_llama_equals_one_device(llama_config, one_device, mesh, microbatches, schedule):
    """The loss and every parameter's gradient within tolerance.py's bound for the Transformer's sums (the pipeline
    splits the batch's sum into micro-batches, a reordering that bound already counts, and adds no sum of its own);
    the program hands activations on with collective-permutes over `stage` alone."""
    from conftest import model_loss_and_grads

    from bigjax.parallel import mesh as mesh_lib

    loss, grads, params = one_device
    config = llama_config.copy_and_resolve_references()
    config.mesh.update({"data": 1, **mesh})
    config.model.pipeline.update(
        dict(microbatches=microbatches, schedule=schedule, repeats=2 if schedule == "circular" else 1)
    )
    pipelined_loss, pipelined_grads, _, compiled = model_loss_and_grads(config, jax.devices(), params)

    tolerance = float32_sum_tolerance(*lm_sum_lengths(config, tokens=config.batch_size * config.data.seq_len))
    np.testing.assert_allclose(pipelined_loss, loss, rtol=tolerance, err_msg=f"loss on {mesh}")
    assert_close_after_reordering(pipelined_grads, grads, tolerance, f"gradients on {mesh} ({schedule})")
    passes = handoffs(compiled, mesh_lib.make_mesh(config))
    assert passes and set(passes) == {("stage",)}, passes


def test_pipelined_moe_beside_experts_equals_one_device_and_counts_every_micro_batch(tiny_config, monkeypatch):
    """A mixture of experts, both stacks (2 dense layers, then 2 MoE layers) pipelined over stage=2 beside expert=2
    and data=2: the training loss (cross-entropy and both router losses, whose sums the pipeline adds over the
    micro-batches into the whole batch's), every router statistic and every gradient, the router's and the experts'
    included, within the bound of the MoE model's sums. With one micro-batch's router sums standing for the batch's
    (planted), the statistics are off."""
    from test_moe import MOE_STACKS, fixed_batch, loss_grads_and_stats, moe_sum_lengths, one_device_moe

    from bigjax.run.setup import make_setup

    config = tiny_config("llama=True", *MOE_STACKS)
    config.model.pipeline.microbatches = 4
    batch = fixed_batch(config)
    params, (loss, grads, stats) = one_device_moe()  # the one-device run of this config, shared with test_moe

    config.mesh.update(dict(data=2, fsdp=1, tensor=1, expert=2, context=1, stage=2))
    pipelined = make_setup(config, jax.devices())
    params = jax.device_put(params, pipelined.state_shardings.params)
    pipelined_loss, pipelined_grads, pipelined_stats = loss_grads_and_stats(pipelined, params, batch)
    tolerance = float32_sum_tolerance(*moe_sum_lengths(config, tokens=batch["weights"].size))
    np.testing.assert_allclose(pipelined_loss, loss, rtol=tolerance, err_msg="loss")
    assert sorted(stats) == ["moe_aux_loss", "moe_dropped", "moe_load_max", "moe_load_min", "moe_z_loss"]
    assert_close_after_reordering(pipelined_stats, stats, tolerance, "router statistics")
    assert_close_after_reordering(pipelined_grads, grads, tolerance, "gradients")

    monkeypatch.setattr(pipeline_lib._Schedule, "add_sums", add_sums_planted("one micro-batch for all"))
    with pytest.raises(AssertionError, match=r"planted: \['moe_"):
        assert_close_after_reordering(loss_grads_and_stats(pipelined, params, batch)[2], stats, tolerance, "planted")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["--config.mesh.stage=4", "--config.model.pipeline.schedule=circular", "--config.model.pipeline.repeats=2"],
            "num_layers=2 does not split into config.mesh.stage=4 x config.model.pipeline.repeats=2",
        ),
        (["--config.mesh.stage=2", "--config.model.pipeline.repeats=2"], "needs schedule='circular'"),
        (["--config.mesh.stage=2", "--config.model.pipeline.schedule=1f1b"], "is not one of gpipe, circular"),
        (["--config.mesh.stage=2", "--config.model.pipeline.microbatches=3"], "does not split into"),
        (["--config.mesh.stage=2", "--config.model.scan_layers=False"], "scan_layers=True"),
        (
            ["--config.mesh.stage=2", "--config.model.moe.num_experts=4", "--config.model.moe.first_dense_layers=1"],
            "config.model.moe.first_dense_layers=1 does not split into config.mesh.stage=2",
        ),
    ],
)
def test_a_pipeline_that_cannot_be_is_a_config_error(tiny_config, overrides, message):
    from bigjax import config as config_lib

    config = tiny_config("", *overrides)
    with pytest.raises(config_lib.ConfigError, match=re.escape(message)):
        config_lib.check_against_devices(config, 8)


# --------------------------------------------------------------------------------------------------
# Training: the checkpoint of a pipelined run is any run's, so it resumes onto its own mesh bit for bit and onto no
# pipeline within the bound of the sums; the command line logs the losses of the unpipelined run.


def losses_by_step(workdir) -> dict:
    from bigjax.ops import metrics

    return {row["step"]: row["loss"] for row in metrics.read_jsonl(workdir / "metrics.jsonl") if "loss" in row}


def test_pipelined_run_resumes_bitwise_on_its_mesh_and_onto_no_pipeline_within_the_bound(tiny_config, tmp_path):
    """Tiny GPT-2, circular over stage=2 with gradient accumulation and remat; SGD without clipping, whose update is
    linear in the gradient, so that the run resumed without a pipeline is held to the bound of test_train's resume
    onto another mesh."""
    import shutil

    from conftest import init_params
    from test_train import LINEAR_UPDATES, final_params
    from tolerance import assert_sgd_params_close_after_reordering

    from bigjax.run import train
    from bigjax.tasks import make_task

    common = ["config.log_every=1", "config.total_steps=4", "config.optim.grad_accum=2", "config.model.remat=full"]
    common += [*LINEAR_UPDATES, "config.model.num_layers=4", "config.mesh.data=-1"]
    pipelined = tiny_config(
        "",
        *common,
        "config.mesh.stage=2",
        "config.model.pipeline.schedule=circular",
        "config.model.pipeline.repeats=2",
        "config.model.pipeline.microbatches=2",
    )
    straight, resumed, unpipelined = tmp_path / "straight", tmp_path / "resumed", tmp_path / "unpipelined"
    train.train(pipelined, straight)
    train.train(pipelined, resumed, stop_at_step=2)
    shutil.copytree(resumed, unpipelined)
    train.train(pipelined, resumed)
    one_stage = tiny_config("", *common, "config.mesh.stage=1", "config.mesh.tensor=2")
    train.train(one_stage, unpipelined)

    assert losses_by_step(resumed) == losses_by_step(straight)
    reference = final_params(straight, one_stage)
    jax.tree.map(np.testing.assert_array_equal, final_params(resumed, one_stage), reference)
    tolerance = float32_sum_tolerance(*lm_sum_lengths(pipelined, tokens=pipelined.batch_size * pipelined.data.seq_len))
    steps = range(1, 5)
    np.testing.assert_allclose(
        [losses_by_step(unpipelined)[s] for s in steps], [losses_by_step(straight)[s] for s in steps], rtol=tolerance
    )
    initial = jax.device_get(init_params(make_task(pipelined), pipelined.seed))
    params = final_params(unpipelined, one_stage)
    assert_sgd_params_close_after_reordering(params, reference, initial, tolerance, 4, "parameters at step 4")


@pytest.fixture(scope="module")
def pipelined_run(tmp_path_factory):
    """experiments/tiny.py as it is (8 steps, checkpoints 4 and 8, losses logged every 2 steps: the session's
    tiny_run but for the pipeline) trained through the command line, gpipe over stage=2 with 4 micro-batches:
    (workdir, stdout). Read it; copy it (conftest.copy_run) before changing anything in it.

    The command runs as conftest's `cli_in_process` runs it (cli.main in this process), here for the whole module:
    what is tested is what it prints and trains, not its process."""
    import contextlib
    import io

    from conftest import TINY, cli_main

    workdir = tmp_path_factory.mktemp("pipelined") / "run"
    args = ["--config.mesh.stage=2", "--config.model.pipeline.microbatches=4"]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        returncode = cli_main("train", "--config", TINY, "--workdir", workdir, *args)
    assert returncode == 0, stdout.getvalue()[-3000:]
    return workdir, stdout.getvalue()


def test_command_line_pipelined_run_logs_the_losses_of_the_unpipelined_one(pipelined_run, tiny_run):
    """The unpipelined run is the session's tiny_run: the same experiment, its mesh data=8."""
    workdir, stdout = pipelined_run
    said = "pipeline: gpipe over stage=2, 4 micro-batches x 1 pass(es), 1 layers per stage; bubble fraction 20.0%"
    assert stdout.count(said) == 1, stdout
    pipelined, unpipelined = losses_by_step(workdir), losses_by_step(tiny_run)
    assert sorted(pipelined) == sorted(unpipelined) == [2, 4, 6, 8]
    np.testing.assert_allclose([pipelined[s] for s in unpipelined], list(unpipelined.values()), rtol=1e-4)


def test_a_pipelined_run_is_read_by_eval_generate_export_and_quantize_as_any_run(
    pipelined_run, cli_in_process, tmp_path, monkeypatch
):
    """Its checkpoint is any run's: the eval job on the run's own mesh (stage=2: a pipelined forward pass) scores it
    as one on stage=1 does, within the bound of the sums, on an lm-evaluation-harness task too (rows scored 2 at a
    time, on data=2 x tensor=2 x stage=2: the job pads them to whole micro-batches); generate samples from it (on one
    device); its Hugging Face export computes the logits of the checkpoint's model, its layers in their order; and
    its int8 quantization (a run of its own, on the same mesh) is scored by the pipelined eval job as by an
    unpipelined one."""
    import transformers
    from conftest import copy_run
    from test_hf import assert_logits_match, bigjax_logits, torch_logits

    from bigjax import config as config_lib
    from bigjax import hf
    from bigjax.compress import quantize
    from bigjax.run import evaluate

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the harness task's data is local
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")

    def eval_on_its_mesh_and_without_stages(workdir, harness=()):
        config = config_lib.load_saved(workdir, [f"config.eval.harness.{setting}" for setting in harness])
        assert config.mesh.stage == 2
        config.mesh.update(dict(data=2, tensor=2) if harness else {})
        pipelined = evaluate.run_eval_job(config, workdir, once=True)
        config.mesh.update(dict(stage=1, data=-1))
        unpipelined = evaluate.run_eval_job(config, workdir, once=True)
        tolerance = float32_sum_tolerance(*lm_sum_lengths(config, tokens=config.batch_size * config.data.seq_len))
        assert pipelined["step"] == unpipelined["step"] == 8
        np.testing.assert_allclose(pipelined["loss"], unpipelined["loss"], rtol=tolerance, err_msg=str(workdir))
        scores = {key: value for key, value in pipelined.items() if key.startswith("harness/")}
        assert len(scores) == len(harness and ["acc", "acc_norm", "sample_len"])
        assert scores == {key: unpipelined[key] for key in scores}
        return config

    harness = ["tasks=bigjax_choice", "include_path=tests/lm_eval_tasks", "limit=2", "batch_size=2"]
    workdir = copy_run(pipelined_run[0], tmp_path)  # the eval job writes its metrics into the run
    config = eval_on_its_mesh_and_without_stages(workdir, harness)
    assert quantize.quantize(workdir, tmp_path / "int8", bits=8)["step"] == 8
    eval_on_its_mesh_and_without_stages(tmp_path / "int8")

    sampled = cli_in_process("generate", "--workdir", workdir, "--prompt", "ROMEO:", "--max-new-tokens", "8")
    assert "generating from checkpoint 8" in sampled.stderr and sampled.stdout.startswith("ROMEO:")

    hf.export(workdir, tmp_path / "exported")
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported").eval()
    ids = list(b"ROMEO: But, soft!")
    assert_logits_match(bigjax_logits(workdir, ids), torch_logits(exported, ids), config.model.num_layers)


def test_plan_gives_the_bubble_and_a_stage_holds_its_share_of_the_layers():
    """GPT-2 124M (12 layers) planned for 64 H100s (shapes and shardings, nothing compiled): over stage=4 each device
    holds a quarter of the stacked layers' bytes, and the rest as without a pipeline; circular, 8 micro-batches, 3
    passes: bubble (4-1)/(3 x 8 + 4-1) = 1/9."""
    from conftest import REPO

    from bigjax import config as config_lib
    from bigjax import plan
    from bigjax.run.setup import make_setup

    def planned(*overrides):
        config = config_lib.load(str(REPO / "experiments" / "gpt2_124m.py"), ["config.batch_size=64", *overrides])
        return config, plan.make_plan(config, num_devices=64, device_kind="h100")

    config, flat = planned("config.mesh.data=-1")
    _, pipelined = planned(
        "config.mesh.data=-1",
        "config.mesh.stage=4",
        "config.model.pipeline.schedule=circular",
        "config.model.pipeline.repeats=3",
        "config.model.pipeline.microbatches=8",
    )
    params = make_setup(config, num_devices=64).abstract_state.params
    layers = plan.total_bytes(params["layers"])
    assert flat.pipeline is None
    assert pipelined.per_device["parameters"] == flat.per_device["parameters"] - layers + layers // 4
    assert pipelined.pipeline["bubble_fraction"] == 1 / 9
    assert "bubble fraction 11.1%" in plan.format_plan(pipelined, "gpt2_124m")


def test_pipelined_bfloat16_llama_equals_one_device_within_the_rounding_of_its_partial_sums(llama_config):
    """Mixed precision (bfloat16 compute, float32 parameters): each row's values are computed by the same operations
    in both, and so are equal; a weight's gradient is a sum over the rows, which the pipeline cuts into one partial
    sum per micro-batch and data-parallel device, each rounded to bfloat16 (EPS_BF16/2 of the leaf's scale) and added
    over the data devices in bfloat16 (data - 1 roundings of EPS_BF16/2); the whole batch's sum on one device is
    rounded once. Beyond that, the float32 bound of the Transformer's sums."""
    from conftest import model_loss_and_grads

    eps_bf16 = float(jnp.finfo(jnp.bfloat16).eps)
    config = llama_config.copy_and_resolve_references()
    config.model.dtype = "bfloat16"
    config.mesh.update(dict(data=1))
    loss, grads, params, _ = model_loss_and_grads(config, jax.devices()[:1])
    microbatches, data = 4, 4
    config.mesh.update(dict(data=data, stage=2))
    config.model.pipeline.microbatches = microbatches
    pipelined_loss, pipelined_grads, _, _ = model_loss_and_grads(config, jax.devices(), params)

    tolerance = float32_sum_tolerance(*lm_sum_lengths(config, tokens=config.batch_size * config.data.seq_len))
    np.testing.assert_allclose(pipelined_loss, loss, rtol=tolerance, err_msg="bfloat16 loss")
    tolerance += (microbatches * data + data - 1 + 1) * eps_bf16 / 2
    assert_close_after_reordering(pipelined_grads, grads, tolerance, "bfloat16 gradients")
