"""BERT and the text classifiers: masking, packed rows equal examples alone, sharded equivalence, learning."""

import jax
import numpy as np
import pytest
from conftest import init_params
from test_sharding import loss_and_grads, on_mesh
from tolerance import assert_close_after_reordering, float32_sum_tolerance, lm_sum_lengths

from bigjax import config as config_lib
from bigjax import data
from bigjax.run import step as step_lib
from bigjax.run.setup import make_setup
from bigjax.tasks import make_task
from bigjax.tasks.masked_lm import mask_tokens

TOKENIZER = data.make_tokenizer("byte")
CLS, PAD = TOKENIZER.special_ids["cls"], TOKENIZER.special_ids["pad"]


def tiny(family: str, task: str, seq_len: int = 32, **model):
    """A toy BERT or GPT for masked_lm or classification, as an experiment file would build it."""
    c = config_lib.defaults(model=family, task=task)
    c.total_steps, c.batch_size, c.log_every = 8, 8, 1
    c.model.update(dict(num_layers=2, d_model=32, num_heads=4, max_len=seq_len, vocab_size=260, **model))
    c.data.update(dict(seq_len=seq_len, max_segments=4))
    c.task.num_classes = 3
    c.optim.update(dict(lr=3e-3, warmup_steps=0))
    config_lib.check_values(c)
    return c


def pack(examples, seq_len, labels=None, max_segments=4):
    """Examples (token lists, each starting with cls) packed into rows, first fit, as the data layout says."""
    rows, row = [], []
    for i, ex in enumerate(examples):
        if sum(len(e) for _, e in row) + len(ex) > seq_len or len(row) == max_segments:
            rows.append(row)
            row = []
        row.append((i, ex))
    rows.append(row)
    b = len(rows)
    batch = {k: np.zeros((b, seq_len), np.int32) for k in ("tokens", "segment_ids", "positions")}
    batch["tokens"][:] = PAD
    batch["labels"] = np.zeros((b, max_segments), np.int32)
    batch["label_weights"] = np.zeros((b, max_segments), np.float32)
    for r, row in enumerate(rows):
        at = 0
        for k, (i, ex) in enumerate(row):
            batch["tokens"][r, at : at + len(ex)] = ex
            batch["segment_ids"][r, at : at + len(ex)] = k + 1
            batch["positions"][r, at : at + len(ex)] = np.arange(len(ex))
            if labels is not None:
                batch["labels"][r, k], batch["label_weights"][r, k] = labels[i], 1.0
            at += len(ex)
    if labels is None:
        del batch["labels"], batch["label_weights"]
    return batch


def random_examples(rng, count, low=4, high=14):
    return [[CLS, *rng.integers(0, 256, rng.integers(low, high))] for _ in range(count)]


def fixed_batch(config, seed=0):
    rng = np.random.default_rng(seed)
    examples = random_examples(rng, 40)
    labels = rng.integers(0, config.task.num_classes, len(examples))
    batch = pack(examples, config.data.seq_len, labels if config.task.name == "classification" else None)
    return {k: v[: config.batch_size] for k, v in batch.items()}


# --------------------------------------------------------------------------------------------------
# Masking


def test_masking_chooses_15_percent_of_ordinary_tokens_and_corrupts_them_80_10_10():
    rng = np.random.default_rng(0)
    batch = pack(random_examples(rng, 600, 20, 60), 128)
    special = np.array(sorted(TOKENIZER.special_ids.values()), np.int32)
    ordinary = np.setdiff1d(np.arange(TOKENIZER.vocab_size), special)
    max_predictions = int(np.ceil(0.15 * 128))
    corrupted, at, targets, weights = jax.device_get(
        jax.jit(mask_tokens, static_argnums=(3, 4, 5))(
            jax.random.key(0), batch["tokens"], batch["segment_ids"], 0.15, max_predictions,
            TOKENIZER.special_ids["mask"], special, ordinary,
        )
    )  # fmt: skip
    tokens, chosen = batch["tokens"], weights > 0
    eligible = (batch["segment_ids"] > 0) & ~np.isin(tokens, special)
    np.testing.assert_array_equal(chosen.sum(1), np.clip(np.round(0.15 * eligible.sum(1)), 1, max_predictions))
    rows = np.arange(len(tokens))[:, None]
    assert eligible[np.broadcast_to(rows, at.shape)[chosen], at[chosen]].all()  # never cls, padding or special
    assert len(set(map(tuple, np.stack([np.broadcast_to(rows, at.shape)[chosen], at[chosen]], 1)))) == chosen.sum()
    np.testing.assert_array_equal(targets, np.take_along_axis(tokens, at, 1))

    # Only chosen positions change; of the chosen, ~80% become the mask, ~10% another token, ~10% stay.
    changed = corrupted != tokens
    chosen_grid = np.zeros_like(changed)
    chosen_grid[np.broadcast_to(rows, at.shape)[chosen], at[chosen]] = True
    assert not (changed & ~chosen_grid).any()
    new = corrupted[chosen_grid]
    masked = np.mean(new == TOKENIZER.special_ids["mask"])
    kept = np.mean(new == tokens[chosen_grid])
    # Hoeffding: the fraction of n independent draws is more than t from its probability with probability at most
    # 2 exp(-2 n t^2); this t makes that 1e-8: a correct masking fails for fewer than one seed in 10^8.
    t = np.sqrt(np.log(2e8) / (2 * len(new)))
    assert abs(masked - 0.8) < t and abs(kept - 0.1) < t, (masked, kept, t)
    assert np.isin(new[new != TOKENIZER.special_ids["mask"]], ordinary).all()


def test_masks_differ_between_steps_and_repeat_for_the_same_step():
    config = tiny("bert", "masked_lm")
    task = make_task(config)
    params = init_params(task)
    batch = fixed_batch(config)
    loss = jax.jit(lambda rng: task.loss_sums(params, {}, batch, rng, train=True)[0]["loss"])
    assert loss(jax.random.key(1)) == loss(jax.random.key(1))
    assert loss(jax.random.key(1)) != loss(jax.random.key(2))
    evaluate = jax.jit(lambda b: task.loss_sums(params, {}, b)[0]["loss"])
    assert evaluate(batch) == evaluate(batch)  # eval masks are a function of the batch alone


# --------------------------------------------------------------------------------------------------
# Packing: attention stays inside each example


def forward_tolerance(config):
    """Packed or alone, an example's logits come from the same sums but for the attention's and the pooling's, which
    run over the row's 32 positions (the other examples' behind a mask) in another order."""
    return float32_sum_tolerance(*lm_sum_lengths(config, tokens=config.data.seq_len))


@pytest.mark.parametrize("norm_position", ["post", "pre"])
def test_a_packed_row_gives_each_example_the_masked_lm_logits_it_gets_alone(norm_position):
    config = tiny("bert", "masked_lm", norm_position=norm_position, type_vocab_size=2)
    task = make_task(config)
    params = init_params(task)
    examples = random_examples(np.random.default_rng(0), 3, 4, 10)
    apply = jax.jit(lambda b, at: task.model.apply({"params": params}, **b, predict_at=at))

    packed = pack(examples, 32)
    assert packed["tokens"].shape[0] == 1 and packed["segment_ids"].max() == 3
    together = apply(packed, np.arange(32)[None].astype(np.int32))[0]
    start = 0
    for example in examples:
        alone = apply(pack([example], 32), np.arange(32)[None].astype(np.int32))[0]
        got, want = together[start : start + len(example)], alone[: len(example)]
        assert_close_after_reordering(got, want, forward_tolerance(config), "an example's logits packed and alone")
        start += len(example)


@pytest.mark.parametrize("family", ["bert", "gpt"])
def test_a_packed_row_gives_each_example_the_class_logits_it_gets_alone(family):
    config = tiny(family, "classification")
    task = make_task(config)
    params = init_params(task)
    noise = np.random.default_rng(0)
    # The head starts at zero: random weights make the logits informative (a constant shift would give all classes
    # the same logit).
    params = jax.tree.map(lambda p: p + 0.1 * noise.normal(size=p.shape).astype(p.dtype), params)
    examples = random_examples(np.random.default_rng(1), 4, 3, 8)
    apply = jax.jit(lambda b: task.model.apply({"params": params}, b["tokens"], b["segment_ids"], b["positions"]))

    together = apply(pack(examples, 32))
    assert together.shape == (1, 4, 3)
    tolerance = forward_tolerance(config)
    for k, example in enumerate(examples):
        alone = apply(pack([example], 32))
        assert_close_after_reordering(together[0, k], alone[0, 0], tolerance, f"example {k}'s logits packed and alone")
    # Changing an example's first real token changes its own logits and no other example's.
    changed = [list(e) for e in examples]
    changed[1][1] = (changed[1][1] + 1) % 256
    moved = apply(pack(changed, 32))
    assert np.abs(moved[0, 1] - together[0, 1]).max() > tolerance * np.abs(together[0, 1]).max()  # beyond rounding
    assert_close_after_reordering(np.delete(moved[0], 1, 0), np.delete(together[0], 1, 0), tolerance, "the others")


def test_classifier_backbone_has_the_pretraining_parameter_names():
    shapes = lambda task: jax.eval_shape(task.init_variables, jax.random.key(0))["params"]
    for family, pretraining in (("bert", "masked_lm"), ("gpt", "causal_lm")):
        lm = shapes(make_task(tiny(family, pretraining)))
        classifier = shapes(make_task(tiny(family, "classification")))
        paths = lambda tree: {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}
        head = {p for p in paths(classifier) if "classifier" in p or "pooler" in p}
        assert paths(classifier) - head <= paths(lm), family
        assert head  # and the head is new


# --------------------------------------------------------------------------------------------------
# Sharding


@pytest.mark.parametrize(
    "family,task_name", [("bert", "masked_lm"), ("bert", "classification"), ("gpt", "classification")]
)
def test_loss_and_gradients_match_on_every_mesh(family, task_name):
    config = tiny(family, task_name)
    task, batch = make_task(config), fixed_batch(config)
    host_params = jax.tree.map(lambda p: p + 0.01, jax.device_get(init_params(task)))  # a nonzero head
    reference = None
    for shape in [(1, 1, 1), (2, 2, 2)]:  # (2, 2, 2) caught an XLA partitioning bug: see bert.py
        setup = on_mesh(config, shape)
        params = jax.device_put(host_params, setup.state_shardings.params)
        result = jax.device_get(loss_and_grads(setup, params, batch))
        if reference is None:
            reference = result
            continue
        # A mean of terms >= 0 and its gradients: within the bound of the sums they went through.
        tolerance = float32_sum_tolerance(*lm_sum_lengths(config, tokens=batch["tokens"].size))
        np.testing.assert_allclose(result[0], reference[0], rtol=tolerance, err_msg=f"loss on mesh {shape}")
        assert_close_after_reordering(result[1], reference[1], tolerance, f"gradients on mesh {shape}")


# --------------------------------------------------------------------------------------------------
# Learning


def train_steps(config, batches):
    setup = make_setup(config)
    state = setup.init_state()
    step, _ = step_lib.compile_train_step(setup)
    losses = []
    for batch in batches:
        state, m = step(state, setup.sharding.global_batch(batch))
        losses.append(float(m["loss"]))
    return losses


def shakespeare_lines(count, seed=0):
    from bigjax.data import corpus

    lines = [line for line in corpus.shakespeare_split("train", 0.1).splitlines() if 12 < len(line) < 30]
    picked = np.random.default_rng(seed).choice(len(lines), count, replace=False)
    return [[CLS, *TOKENIZER.encode(lines[i])] for i in picked]


def test_masked_lm_loss_falls_on_shakespeare():
    config = tiny("bert", "masked_lm", norm_position="pre")
    config.total_steps = 40
    examples = shakespeare_lines(16)
    batch = {k: v[:8] for k, v in pack(examples, 32).items()}
    losses = train_steps(config, [batch] * config.total_steps)
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:5]), losses


@pytest.mark.parametrize("family", ["bert", "gpt"])
def test_text_classifier_learns_which_lines_end_with_a_question(family):
    config = tiny(family, "classification", 64, **({"norm_position": "pre"} if family == "bert" else {}))
    config.total_steps = 40
    examples = shakespeare_lines(24, seed=1)
    texts = [TOKENIZER.decode(e[1:]) for e in examples]
    labels = [int(t.rstrip().endswith("?")) + int(t[0] in "AEIOU") for t in texts]
    batch = {k: v[:8] for k, v in pack(examples, 64, labels).items()}
    assert batch["label_weights"].sum() >= 16
    losses = train_steps(config, [batch] * config.total_steps)
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:3]), losses
