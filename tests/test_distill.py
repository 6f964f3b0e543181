"""Distillation (config.distill, bigjax.compress.distill): the loss's formula, the same loss and gradients on every
mesh,
alpha=0 and distillation off as the plain run, a teacher outside the state and its checkpoints, a bit-exact resume
that keeps its teacher step, the command line for causal and masked LMs, classification, and clear refusals.

Tolerances: fp32 throughout; values computed in another order (another mesh, pieces of the sequence, numpy's float64)
agree within tests/tolerance.py's bounds for the sums they went through. The distilled loss goes through the
student's sums and, by the teacher's logits, the teacher's: the bounds of both add.
"""

import json
import shutil

import jax
import numpy as np
import pytest
from conftest import REPO, TINY, init_params, run_cli
from test_sharding import fixed_batch, on_mesh
from test_train import final_params, losses_by_step
from tolerance import (
    assert_close_after_reordering,
    assert_sgd_params_close_after_reordering,
    float32_sum_tolerance,
    lm_sum_lengths,
)

from bigjax import config as config_lib
from bigjax import data
from bigjax.compress import distill
from bigjax.config import ConfigError
from bigjax.ops import metrics
from bigjax.params import by_path
from bigjax.run import checkpoint, train
from bigjax.run import step as step_lib
from bigjax.run.setup import make_setup

BERT = str(REPO / "experiments" / "bert_tiny_mlm.py") + ":layers=2,d=32,seq=32,steps=2"
BERT_SMALL = ["config.batch_size=8", "config.log_every=1", "config.optim.warmup_steps=0"]
# A teacher wider and deeper than the tiny student (2 layers of 32, 4 heads): its hidden states cannot stand in for
# the student's anywhere by mistake.
LM_TEACHER = ["config.model.num_layers=3", "config.model.d_model=64", "config.model.num_heads=2"]
SGD = ["config.optim.name=sgd", "config.optim.clip=0"]


@pytest.fixture(scope="module")
def lm_teacher(tmp_path_factory):
    """The tiny GPT at 3 layers of 64 (2 heads), trained 8 steps on the 8-device data-parallel mesh: checkpoints
    at steps 4 and 8."""
    workdir = tmp_path_factory.mktemp("lm_teacher") / "teacher"
    train.train(config_lib.load(TINY, LM_TEACHER), workdir)
    return workdir


def student(teacher, *overrides, arg: str = ""):
    """The tiny GPT distilled from `teacher`."""
    return config_lib.load(TINY + (f":{arg}" if arg else ""), [f"config.distill.teacher={teacher}", *overrides])


def log_softmax64(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def kl_terms64(student_logits, teacher_logits, temperature):
    """The terms p_t (log p_t - log p_s) of KL(teacher || student) at temperature T, in float64: [..., vocab]."""
    log_s, log_t = log_softmax64(student_logits / temperature), log_softmax64(teacher_logits / temperature)
    return np.exp(log_t) * (log_t - log_s)


# --------------------------------------------------------------------------------------------------
# The loss


def test_the_distilled_loss_is_alpha_t2_kl_of_the_teacher_plus_the_rest_hard_over_the_weighted_positions():
    rng = np.random.default_rng(0)
    student_logits, teacher_logits = rng.normal(size=(2, 6, 4, 50)).astype(np.float32) * 3
    weights = np.array([[1, 1, 0, 1]] * 6, np.float32)  # one position in four is padding
    temperature, alpha, hard = 2.5, 0.3, np.float32(7.0)
    teacher = distill.TeacherInStep(None, {}, temperature, alpha)
    sums = jax.device_get(
        teacher.distilled_sums({"loss": hard, "count": 18.0}, student_logits, teacher_logits, weights)
    )

    terms = kl_terms64(student_logits, teacher_logits, temperature) * weights[..., None]
    # Terms of either sign: the bound is relative to the sum of their magnitudes (18 positions x 50 entries).
    atol = float32_sum_tolerance(18, 50) * np.abs(terms).sum()
    np.testing.assert_allclose(sums["distill_kl"], terms.sum(), rtol=0, atol=atol)
    want = alpha * temperature**2 * terms.sum() + (1 - alpha) * hard
    np.testing.assert_allclose(sums["loss"], want, rtol=0, atol=alpha * temperature**2 * atol + 1e-6 * want)
    assert sums["hard_loss"] == hard and sums["count"] == 18.0
    # Not a vacuous comparison: the padded positions' KL alone is far outside the bound.
    assert kl_terms64(student_logits, teacher_logits, temperature)[:, 2].sum() > 100 * atol


def sums_and_grads(setup, params, teacher_variables, batch):
    """The distilled loss sums and the gradient of their mean, jitted on the setup's mesh."""

    def mean_loss(p, t, b):
        sums, _ = setup.task.loss_sums(p, {}, b, teacher=setup.teacher.in_step(t))
        return sums["loss"] / sums["count"], sums

    shardings = (setup.state_shardings.params, setup.teacher.variable_shardings, setup.sharding.batch)
    fn = jax.jit(jax.grad(mean_loss, has_aux=True), in_shardings=shardings)
    with setup.sharding.activate():
        grads, sums = fn(params, teacher_variables, setup.sharding.global_batch(batch))
    return jax.device_get((sums, grads))


def test_distilled_loss_and_gradients_match_numpy_and_every_mesh_in_one_piece_or_chunked(lm_teacher):
    """1x1x1 against numpy from the two models' logits (the teacher's read from its checkpoint); then 8x1x1, 2x4x1
    and 2x2x2, the teacher restored onto each mesh, and 2x2x2 with the loss taken 8 positions at a time."""
    knobs = ("config.distill.temperature=2", "config.distill.alpha=0.7")
    config = student(lm_teacher, *knobs)
    batch = fixed_batch(config)  # with 5 padded tokens
    setup = on_mesh(config, (1, 1, 1))
    host_params = jax.device_get(init_params(setup.task))
    teacher_variables = setup.teacher.load()
    want_sums, want_grads = sums_and_grads(setup, host_params, teacher_variables, batch)

    tokens = batch["weights"].size
    tolerance = float32_sum_tolerance(*lm_sum_lengths(config, tokens), *lm_sum_lengths(setup.teacher.config, tokens))
    student_logits = jax.jit(setup.task.logits)(host_params, batch["inputs"])
    teacher_logits = jax.jit(setup.teacher.task.logits)(teacher_variables["params"], batch["inputs"])
    terms = kl_terms64(student_logits, teacher_logits, 2.0) * batch["weights"][..., None]
    np.testing.assert_allclose(want_sums["distill_kl"], terms.sum(), rtol=0, atol=tolerance * np.abs(terms).sum())
    np.testing.assert_allclose(
        want_sums["loss"], 0.7 * 4 * want_sums["distill_kl"] + 0.3 * want_sums["hard_loss"], rtol=tolerance
    )

    for shape, chunk in [((8, 1, 1), 0), ((2, 4, 1), 0), ((2, 2, 2), 0), ((2, 2, 2), 8)]:
        setup = on_mesh(student(lm_teacher, *knobs, f"config.task.loss_chunk={chunk}"), shape)
        params = jax.device_put(host_params, setup.state_shardings.params)
        teacher_variables = setup.teacher.load()
        what = f"mesh {shape}, loss_chunk={chunk}"
        # Restored into its shards, each by its logical names as the student's are: the embedding as the student's.
        teacher_params, wanted = by_path(teacher_variables["params"]), by_path(setup.teacher.variable_shardings)
        assert all(array.sharding == wanted[f"params/{name}"] for name, array in teacher_params.items()), what
        embedding = by_path(setup.state_shardings.params)["embed/embedding"]
        assert teacher_params["embed/embedding"].sharding.spec == embedding.spec != jax.sharding.PartitionSpec(), what
        sums, grads = sums_and_grads(setup, params, teacher_variables, batch)
        assert sums.keys() == want_sums.keys(), what
        for key in ("loss", "hard_loss", "distill_kl"):  # sums of terms >= 0: relative to themselves
            np.testing.assert_allclose(sums[key], want_sums[key], rtol=tolerance, err_msg=f"{key} on {what}")
        assert sums["count"] == want_sums["count"], what
        assert_close_after_reordering(grads, want_grads, tolerance, f"gradients on {what}")


def two_steps(config):
    """2 steps of the compiled train step of `config` (a teacher's loaded for it) from its fresh state on the
    2x2x2 mesh: (the metrics of each, the parameters after them, the parameters before them)."""
    setup = on_mesh(config, (2, 2, 2))
    state = setup.init_state()
    initial = jax.device_get(state.params)
    step, _ = step_lib.compile_train_step(setup)
    if setup.teacher is not None:
        step = step_lib.with_teacher(step, setup.teacher.load())
    outputs = []
    for seed in range(2):
        state, step_metrics = step(state, setup.sharding.global_batch(fixed_batch(config, seed)))
        outputs.append(step_metrics)
    return (*jax.device_get((outputs, state.params)), initial)


def test_alpha_zero_trains_as_the_plain_run(lm_teacher, tiny_config):
    """The teacher runs, but weighs nothing: the same losses and parameters after 2 steps, within the bounds of a
    reordering (XLA fuses the two programs differently, which may round their sums apart: seen, 3 of 12288 weights
    an ulp off with the tests' XLA flags); a teacher that weighed anything would be off by its whole gradient."""
    plain_config = tiny_config("", *SGD)
    plain_metrics, plain_params, initial = two_steps(plain_config)
    metrics_, params, distilled_initial = two_steps(student(lm_teacher, *SGD, "config.distill.alpha=0"))
    jax.tree.map(np.testing.assert_array_equal, distilled_initial, initial)  # the same start
    tokens = plain_config.batch_size * plain_config.data.seq_len
    tolerance = float32_sum_tolerance(*lm_sum_lengths(plain_config, tokens))
    for plain, distilled in zip(plain_metrics, metrics_, strict=True):
        assert distilled["loss"] == distilled["hard_loss"] and distilled["distill_kl"] > 0
        np.testing.assert_allclose(distilled["loss"], plain["loss"], rtol=tolerance)
        np.testing.assert_allclose(distilled["grad_norm"], plain["grad_norm"], rtol=tolerance)
    assert_sgd_params_close_after_reordering(params, plain_params, initial, tolerance, 2, "params")


def lowered_text(config) -> str:
    setup = make_setup(config)
    return step_lib.lower_train_step(setup).as_text(debug_info=False)


def test_distillation_off_is_the_step_of_today_whatever_its_other_knobs(tiny_config):
    """teacher="" builds no teacher and the same program as a config that never heard of distillation: the
    other knobs are not read. (Against the code before distillation existed, the branch's note records the
    same parameters after 3 steps, bit for bit, for GPT with dropout, chunked Llama with grad_accum and BERT.)"""
    plain = tiny_config("")
    knobs = tiny_config("", "config.distill.temperature=3", "config.distill.alpha=0.9", "config.distill.step=4")
    assert make_setup(knobs).teacher is None
    assert lowered_text(knobs) == lowered_text(plain)


# --------------------------------------------------------------------------------------------------
# Training: state, checkpoints, resume


def test_resume_is_bit_exact_with_the_teacher_step_it_started_with_and_the_teacher_is_never_saved(
    lm_teacher, tmp_path, tiny_config
):
    """The student starts while its teacher has only step 4, stops at 4; the teacher then has step 8 too. The
    resumed run still distills from step 4: its every loss and final parameters equal, bit for bit, those of an
    uninterrupted run told distill.step=4."""
    teacher = tmp_path / "teacher"
    shutil.copytree(lm_teacher, teacher)
    shutil.move(teacher / "checkpoints" / "8", tmp_path / "held")
    config = student(teacher, "config.log_every=1")
    assert train.train(config, tmp_path / "resumed", stop_at_step=4).status == "preempted"
    assert config_lib.load_saved(tmp_path / "resumed").distill.step == 4  # pinned in the run's config
    shutil.move(tmp_path / "held", teacher / "checkpoints" / "8")
    assert train.train(config, tmp_path / "resumed").step == 8
    straight = student(teacher, "config.log_every=1", "config.distill.step=4")
    train.train(straight, tmp_path / "straight")

    assert losses_by_step(tmp_path / "resumed") == losses_by_step(tmp_path / "straight")
    jax.tree.map(
        np.testing.assert_array_equal,
        final_params(tmp_path / "resumed", config),
        final_params(tmp_path / "straight", config),
    )
    rows = [row for row in metrics.read_jsonl(tmp_path / "straight" / "metrics.jsonl") if "loss" in row]
    assert all(row["distill_kl"] > 0 and row["loss"] < row["hard_loss"] for row in rows)

    # The teacher has no optimizer state and is not in the checkpoints: they hold exactly a plain run's arrays.
    plain = make_setup(tiny_config(""))
    assert jax.tree.structure(make_setup(config).abstract_state) == jax.tree.structure(plain.abstract_state)
    for step in (4, 8):
        path = checkpoint.step_dir(tmp_path / "resumed", step)
        assert checkpoint.layout_differences(path, plain.abstract_state) == [], step
        assert not [p.name for p in path.iterdir() if "teacher" in p.name]


# --------------------------------------------------------------------------------------------------
# The command line, and the other tasks


def test_cli_distills_a_causal_lm_and_its_eval_never_needs_the_teacher(lm_teacher, cli_in_process, tmp_path):
    """The training through the command line in this process; the eval, which must not need the teacher, in a
    process of its own (nothing of the teacher loaded before can help it)."""
    workdir = tmp_path / "student"
    distilling = [f"--config.distill.teacher={lm_teacher}", "--config.distill.temperature=2"]
    out = cli_in_process("train", "--config", TINY, "--workdir", workdir, *distilling, "--config.eval_every=4").stdout
    assert f"distill: teacher {lm_teacher} step 8" in out
    rows = metrics.read_jsonl(workdir / "metrics.jsonl")
    trained = [row for row in rows if "loss" in row]
    assert [row["step"] for row in trained] == [2, 4, 6, 8]
    assert all({"hard_loss", "distill_kl"} <= row.keys() for row in trained)
    evaluated = [row for row in rows if "eval/loss" in row]
    assert [row["step"] for row in evaluated] == [4, 8] and not any("eval/distill_kl" in row for row in evaluated)
    assert json.loads((workdir / "config.json").read_text())["distill"]["step"] == 8

    shutil.move(lm_teacher, tmp_path / "away")  # eval reads the student alone
    try:
        eval_out = run_cli("eval", "--workdir", workdir, "--once").stdout
    finally:
        shutil.move(tmp_path / "away", lm_teacher)
    assert "loss=" in eval_out


def test_cli_distills_a_masked_lm_whose_teacher_reads_the_students_masks(cli_in_process, tmp_path):
    """A student that starts as its teacher (init_from the same run) sees the teacher's own distribution at the
    positions it predicts, so the first step's KL is 0: the teacher got the same corrupted rows and positions."""
    teacher = tmp_path / "teacher"
    train.train(config_lib.load(BERT, BERT_SMALL), teacher)
    flags = [f"--config.init_from.workdir={teacher}", f"--config.distill.teacher={teacher}"]
    cli_in_process(
        "train", "--config", BERT, "--workdir", tmp_path / "student", *flags, *[f"--{o}" for o in BERT_SMALL]
    )
    first, second = [row for row in metrics.read_jsonl(tmp_path / "student" / "metrics.jsonl") if "loss" in row]
    assert first["step"] == 1 and abs(first["distill_kl"]) < 1e-6
    assert first["loss"] == pytest.approx(0.5 * first["hard_loss"], rel=1e-6)
    assert second["distill_kl"] > 1e-6  # one step of the student's own later, they differ


@pytest.fixture(scope="module")
def genre_teacher(tmp_path_factory):
    """A tiny GPT classifying the genre of speeches (2 classes), trained 4 steps (its head, which starts at 0, has
    moved: its soft targets are not uniform)."""
    workdir = tmp_path_factory.mktemp("genre") / "teacher"
    train.train(genre_config(), workdir)
    return workdir


def genre_config(*overrides):
    c = config_lib.defaults(model="gpt", task="classification")
    c.total_steps, c.batch_size, c.log_every, c.checkpoint_every = 4, 8, 1, 0
    c.optim.update(dict(lr=1e-2, warmup_steps=0))
    c.model.update(dict(num_layers=2, d_model=32, num_heads=4, max_len=32, vocab_size=260))
    c.task.num_classes = 2
    c.data.update(dict(source="shakespeare_genre", seq_len=32, max_segments=2))
    config = config_lib.from_dict(c.to_dict())
    for override in overrides:
        config_lib.apply_override(config, override)
    config_lib.check_values(config)
    return config


def test_classification_distills_over_the_weighted_examples_and_trains(genre_teacher, tmp_path):
    config = genre_config(f"config.distill.teacher={genre_teacher}", "config.distill.temperature=3")
    setup = on_mesh(config, (2, 2, 2))
    teacher_variables = setup.teacher.load()
    batch = next(data.train_batches(config))
    assert 0 < batch["label_weights"].sum() < batch["label_weights"].size  # some segments are padding

    # One program for both students below (a jit made inside kl_sum would trace and compile again for each).
    loss_sums = jax.jit(lambda p, t, b: setup.task.loss_sums(p, {}, b, teacher=setup.teacher.in_step(t))[0])

    def kl_sum(params):
        with setup.sharding.activate():
            return jax.device_get(loss_sums(params, teacher_variables, setup.sharding.global_batch(batch)))

    # A student near the teacher, not at it: both give logits that are far from uniform and differ.
    noise = np.random.default_rng(0)
    teacher_params = jax.device_get(teacher_variables["params"])
    fresh = jax.tree.map(lambda p: p + 0.3 * noise.normal(size=p.shape).astype(p.dtype), teacher_params)
    student_logits = jax.jit(setup.task.model.apply)({"params": fresh}, *setup.task._inputs(batch))
    teacher_logits = jax.jit(setup.teacher.task.logits)(jax.device_get(teacher_variables), batch)
    terms = kl_terms64(student_logits, teacher_logits, 3.0) * batch["label_weights"][..., None]
    tokens = batch["tokens"].size  # the student's sums and the teacher's (the same model), and the 2 classes'
    tolerance = float32_sum_tolerance(*lm_sum_lengths(config, tokens), *lm_sum_lengths(setup.teacher.config, tokens), 2)
    np.testing.assert_allclose(kl_sum(fresh)["distill_kl"], terms.sum(), rtol=0, atol=tolerance * np.abs(terms).sum())
    assert kl_sum(teacher_params)["distill_kl"] < 1e-6 < terms.sum()  # the teacher as the student: nothing to learn

    assert train.train(config, tmp_path / "student").status == "finished"
    rows = [row for row in metrics.read_jsonl(tmp_path / "student" / "metrics.jsonl") if "loss" in row]
    assert len(rows) == 4 and all(row["distill_kl"] > 0 for row in rows)


# --------------------------------------------------------------------------------------------------
# Refusals


def test_distilling_from_another_vocabulary_is_one_error_line_on_the_command_line(lm_teacher, cli_in_process, tmp_path):
    result = cli_in_process(
        "train",
        "--config",
        TINY,
        "--workdir",
        tmp_path / "student",
        f"--config.distill.teacher={lm_teacher}",
        "--config.model.vocab_size=300",
        check=False,
    )
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr
    assert "has another vocabulary: model.vocab_size=260, this run's 300" in errors[0]
    assert not (tmp_path / "student").exists()  # refused before anything was written


def test_each_bad_combination_is_a_clear_error(lm_teacher, genre_teacher, tmp_path, tiny_config):
    (tmp_path / "untrained").mkdir()
    (tmp_path / "untrained" / "config.json").write_text(config_lib.to_json(tiny_config("")))

    def refused(config, message, workdir=None):
        with pytest.raises(ConfigError, match=message):
            if workdir is not None:
                config = distill.pin_teacher_step(config, workdir)
            _ = make_setup(config).teacher

    refused(student(tmp_path / "nothing"), r"config.json not found: no run has saved its config")
    refused(student(tmp_path / "untrained"), r"no committed checkpoint in .*untrained/checkpoints; train first")
    refused(student("hf:/models/gpt2"), r"`bigjax import --hf /models/gpt2 --workdir DIR` first")
    refused(student(lm_teacher), r"is this run's own workdir", workdir=lm_teacher)
    step_5 = r"checkpoint 5 is not a committed checkpoint .*committed: 4, 8 \(config.distill.step=0 takes the newest\)"
    refused(student(lm_teacher, "config.distill.step=5"), step_5)
    refused(student(genre_teacher), r"trained for task.name='classification', this run for 'causal_lm'")
    refused(student(lm_teacher, "config.data.tokenizer=sentencepiece:x.model"), r"another vocabulary: its tokenizer")
    refused(student(lm_teacher, "config.model.vocab_multiple=64"), r"pads its vocabulary to 384.*to 320")
    longer = ("config.data.seq_len=64", "config.model.max_len=64")
    refused(student(lm_teacher, *longer), r"reads at most 32 positions \(model.max_len\)")
    refused(genre_config(f"config.distill.teacher={genre_teacher}", "config.task.num_classes=3"), r"has 2 classes")
    on_tensor_4 = ("config.mesh.data=2", "config.mesh.tensor=4")  # the student's 4 heads split, the teacher's 2 not
    refused(student(lm_teacher, *on_tensor_4), r"the teacher's params/layers/attention/key/bias has size 2 .*tensor=4")
    with pytest.raises(ConfigError, match=r"temperature must be > 0"):
        tiny_config("", "config.distill.temperature=0")
    with pytest.raises(ConfigError, match=r"alpha must be in \[0, 1\]"):
        tiny_config("", "config.distill.alpha=1.5")
