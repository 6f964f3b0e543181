"""Generation with a KV cache: cached logits equal the full forward's, greedy follows the argmax (also past the
model's context), batches give each row what it gets alone, sampling filters, stops, special ids, compiles."""

import dataclasses
import functools
import json

import jax
import numpy as np
import pytest
from conftest import TINY, init_params
from tolerance import assert_close_after_reordering, float32_sum_tolerance, lm_sum_lengths

from bigjax import config as config_lib
from bigjax import generate
from bigjax.data import tokenizers
from bigjax.generate import Sampling
from bigjax.tasks.causal_lm import CausalLM

BYTES = tokenizers.ByteTokenizer()
GREEDY = Sampling(max_new_tokens=40, temperature=0.0)


def tiny_generator(arg="", *overrides):
    """(task, Generator) of the tiny experiment's model (max_len 32) at random init (seed 0), with the byte tokenizer:
    one per config for every test of this module, which only read it (a Generator keeps nothing of a call but its
    compiled programs), so that each prompt width and cache size is traced and compiled once, not once per test."""
    return generator_of(config_lib.to_json(config_lib.load(TINY + (f":{arg}" if arg else ""), list(overrides))))


@functools.cache
def generator_of(config_json: str):
    task = CausalLM(config_lib.from_dict(json.loads(config_json)))
    return task, generate.Generator(task.model_config, init_params(task), BYTES)


@functools.cache
def full_forward(task):
    """The task's model as one compiled program (a jit per call would trace it again)."""
    return jax.jit(task.model.apply)


def random_prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, n).tolist() for n in lengths]


@pytest.mark.parametrize("scan", [True, False])
@pytest.mark.parametrize("arg", ["", "llama=True"])  # learned positions; RoPE with grouped-query attention
def test_prefill_and_cached_steps_give_the_logits_of_the_full_forward(tiny_config, arg, scan):
    task, generator = tiny_generator(arg, f"config.model.scan_layers={scan}")
    tokens = np.asarray(random_prompts([24, 24]), np.int32)
    full = full_forward(task)({"params": generator.params}, tokens)
    lengths = np.array([5, 11])  # one prefill of two right-padded prompts, then one token a row a step
    logits, cache = generator.prefill([tokens[0, :5], tokens[1, :11]], columns=32)
    cached, expected = [logits], [full[[0, 1], lengths - 1]]
    for i in range(12):
        positions = lengths + i
        logits, cache = generator.decode_step(cache, tokens[[0, 1], positions], positions)
        cached.append(logits)
        expected.append(full[[0, 1], positions])
    cached, expected = np.stack(cached), np.stack(expected)
    assert np.abs(expected).max() > 0.01  # logits that say something
    # The cache's attention runs over its 32 columns, the full forward's over the row's tokens, and one token's
    # matmuls are shaped otherwise than a row's: the same sums in another order.
    tolerance = float32_sum_tolerance(*lm_sum_lengths(tiny_config(arg), tokens=32))
    assert_close_after_reordering(cached, expected, tolerance, "cached logits")


def greedy_by_full_forward(task, params, prompt, new_tokens: int, context: int) -> list[int]:
    """The documented rule, recomputed without a cache: each token is the argmax of a full forward pass over
    the row's context; a prompt is cut to its last `context` tokens, and a context that outgrows the model's
    to its last context/2."""
    apply = full_forward(task)
    samplable = generate.samplable_ids(BYTES, task.model_config.vocab_size)
    tokens, start = list(prompt), max(0, len(prompt) - context)
    for _ in range(new_tokens):
        if len(tokens) - start > context:
            start = len(tokens) - context // 2
        window = np.zeros((1, context), np.int32)  # right padding: invisible to a causal model
        window[0, : len(tokens) - start] = tokens[start:]
        logits = np.asarray(apply({"params": params}, window)[0, len(tokens) - start - 1])
        tokens.append(int(np.argmax(np.where(samplable, logits, -np.inf))))
    return tokens[len(prompt) :]


@pytest.mark.parametrize("arg", ["", "llama=True"])
def test_greedy_follows_the_full_forward_argmax_in_a_batch_and_past_the_context(arg):
    task, generator = tiny_generator(arg)
    # 3 and 20 tokens, and 40: longer than the context (32) already. 40 new tokens take every row past it.
    prompts = random_prompts([3, 20, 40])
    batch = generator.generate_ids(prompts, GREEDY)
    for prompt, row in zip(prompts, batch, strict=True):
        assert row == greedy_by_full_forward(task, generator.params, prompt, 40, context=32)
        assert row == generator.generate_ids([prompt], GREEDY)[0]  # alone


def test_top_k_of_one_is_greedy():
    _, generator = tiny_generator()
    prompts = random_prompts([4, 9])
    greedy = generator.generate_ids(prompts, Sampling(max_new_tokens=20, temperature=0.0))
    top_1 = generator.generate_ids(prompts, Sampling(max_new_tokens=20, temperature=1.5, top_k=1, seed=7))
    sampled = generator.generate_ids(prompts, Sampling(max_new_tokens=20, temperature=1.5, top_k=0, seed=7))
    assert top_1 == greedy and sampled != greedy


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_sampling_draws_from_the_softmax_of_the_logits_divided_by_the_temperature(temperature):
    logits = np.array([0.0, 1.0, 2.0, 3.0], np.float32)
    draws = 100_000  # rows of the same logits: one draw each, all from one key
    sample = jax.jit(generate.sample_tokens)
    tokens = sample(np.tile(logits, (draws, 1)), jax.random.key(0), np.float32(temperature), 0, np.float32(1.0), True)
    frequencies = np.bincount(np.asarray(tokens), minlength=4) / draws
    want = np.exp(logits / temperature) / np.exp(logits / temperature).sum()
    # Hoeffding: the frequency of n independent draws is more than t from its probability with probability at most
    # 2 exp(-2 n t^2), 4e-9 for t = 0.01 and n = 1e5: a correct sampler passes for all but a few seeds in 10^8.
    # (Multiplying by the temperature instead moves some probability by 0.1 or more.)
    np.testing.assert_allclose(frequencies, want, rtol=0, atol=0.01)


def kept(probs, top_k=0, top_p=1.0) -> set[int]:
    logits = np.log(np.asarray(probs, np.float32))
    filtered = np.asarray(generate.keep_top_k_top_p(logits, top_k, np.float32(top_p)))
    return set(np.flatnonzero(np.isfinite(filtered)).tolist())


def test_top_p_keeps_the_smallest_set_of_most_likely_tokens_whose_mass_reaches_p():
    probs = [0.1, 0.4, 0.05, 0.3, 0.15]  # by rank: ids 1, 3, 4, 0, 2
    assert kept(probs, top_p=0.3) == {1}
    assert kept(probs, top_p=0.65) == {1, 3}  # 0.4 < 0.65 <= 0.4 + 0.3
    assert kept(probs, top_p=0.75) == {1, 3, 4}
    assert kept(probs, top_p=0.97) == {0, 1, 2, 3, 4}
    assert kept(probs, top_p=1.0) == {0, 1, 2, 3, 4}
    assert kept(probs, top_k=2) == {1, 3}
    # top-k first, then the nucleus of the renormalized rest: 0.4/0.85 < 0.75 <= 0.7/0.85
    assert kept(probs, top_k=3, top_p=0.75) == {1, 3}
    # Rows of a batch are filtered each on its own.
    other = [0.05, 0.05, 0.6, 0.2, 0.1]
    batch = generate.keep_top_k_top_p(np.log(np.array([probs, other], np.float32)), 0, np.float32(0.65))
    assert [set(np.flatnonzero(np.isfinite(row)).tolist()) for row in np.asarray(batch)] == [{1, 3}, {2, 3}]


def test_special_and_padded_vocabulary_ids_are_never_sampled():
    task, generator = tiny_generator()
    prompts = random_prompts([2, 7, 13, 30])
    # At a high temperature the ids that must never come out hold much of the probability: the test has teeth.
    logits, _ = generator.prefill(prompts, columns=32)
    never = ~generate.samplable_ids(BYTES, task.model_config.vocab_size)
    never[BYTES.special_ids["eos"]] = False
    probs = jax.nn.softmax(np.asarray(logits) / 3.0, axis=-1)
    assert float(probs[:, never].sum(axis=-1).min()) > 0.2
    rows = generator.generate_ids(prompts, Sampling(max_new_tokens=60, temperature=3.0, top_k=0, seed=1))
    assert sum(map(len, rows)) > 100
    # Byte ids alone: no pad/cls/mask, nothing past the tokenizer's 260, and eos ends a row without showing.
    assert all(0 <= token < 256 for row in rows for token in row)


def test_a_stop_token_ends_its_row_and_the_others_go_on():
    _, generator = tiny_generator()
    prompts = random_prompts([5, 8])
    sampling = Sampling(max_new_tokens=24, temperature=1.0, top_k=0, seed=3)
    free = generator.generate_ids(prompts, sampling)
    assert all(len(row) == 24 for row in free)
    stop = next(token for token in free[0][3:] if token not in free[1])
    stopped = generator.generate_ids(prompts, sampling, stop_tokens=[stop])
    assert stopped == [free[0][: free[0].index(stop)], free[1]]


def test_a_stop_string_ends_its_row_and_is_left_out():
    _, generator = tiny_generator()
    prompts = ["to be, or", "not to be:"]
    sampling = Sampling(max_new_tokens=24, temperature=1.0, top_k=0, seed=5)
    free = generator.complete(prompts, sampling)
    # A two-character piece of row 0's text, from its middle, that row 1 never writes.
    stop = next(
        free[0][i : i + 2]
        for i in range(4, len(free[0]) - 1)
        if "\ufffd" not in free[0][i : i + 2] and free[0][i : i + 2] not in free[1]
    )
    stopped = generator.complete(prompts, dataclasses.replace(sampling, stop=("never written", stop)))
    assert stopped == [free[0][: free[0].index(stop)], free[1]]
    assert len(stopped[0]) < len(free[0])


def test_prefill_and_step_compile_once_per_shape():
    task, shared = tiny_generator()
    generator = generate.Generator(task.model_config, shared.params, BYTES)  # its own programs: none compiled yet
    generator.generate_ids(random_prompts([3, 9]), Sampling(max_new_tokens=10, temperature=0.0))
    samplers = generator.compiled_sample._cache_size()  # jit's cache of sample_tokens, shared by every Generator
    generator.generate_ids(random_prompts([5, 14], seed=1), Sampling(max_new_tokens=12, temperature=0.9, top_p=0.9))
    # Both prompt sets fit a prefill of 16 columns, and 10 or 12 new tokens the same cache: one compile each.
    assert generator.compiled_prefill._cache_size() == 1
    assert generator.compiled_step._cache_size() == 1
    assert generator.compiled_sample._cache_size() == samplers  # the sampling settings are arguments, not constants
    generator.generate_ids(random_prompts([20, 2], seed=2), Sampling(max_new_tokens=10, temperature=0.0))
    assert generator.compiled_prefill._cache_size() == 2  # 20 tokens: the next width, 32
    assert generator.compiled_step._cache_size() == 1


def test_an_empty_prompt_starts_from_eos():
    _, generator = tiny_generator()
    sampling = Sampling(max_new_tokens=8, temperature=0.0)
    assert generator.complete([""], sampling) == [BYTES.decode(generator.generate_ids([[256 + 3]], sampling)[0])]


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(temperature=-1.0), "temperature=-1.0"),
        (dict(temperature=float("nan")), "temperature=nan"),
        (dict(temperature=float("inf")), "temperature=inf"),
        (dict(top_p=float("nan")), "top_p=nan"),
        (dict(top_k=-2), "top_k=-2"),
        (dict(top_p=0.0), "top_p=0.0"),
        (dict(top_p=1.5), "top_p=1.5"),
        (dict(max_new_tokens=0), "max_new_tokens=0"),
        (dict(stop=("",)), "empty stop string"),
    ],
)
def test_bad_sampling_settings_are_one_clear_error(settings, message):
    with pytest.raises(generate.GenerateError, match=message):
        Sampling(**settings)


def test_prompts_come_from_the_command_line_then_the_file(tmp_path):
    lines = tmp_path / "prompts.txt"
    lines.write_text("ROMEO:\n\nJULIET:\n")
    assert generate.read_prompts(["HAMLET:"], str(lines)) == ["HAMLET:", "ROMEO:", "JULIET:"]
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text('{"prompt": "ROMEO:\\nO, she doth"}\n"JULIET:"\n')
    assert generate.read_prompts([], str(jsonl)) == ["ROMEO:\nO, she doth", "JULIET:"]
    assert generate.read_prompts([], None) == [""]
    jsonl.write_text('{"text": "x"}\n')
    with pytest.raises(generate.GenerateError, match="prompts.jsonl:1 has no prompt"):
        generate.read_prompts([], str(jsonl))
    with pytest.raises(generate.GenerateError, match="not found"):
        generate.read_prompts([], str(tmp_path / "missing.txt"))
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("ROMEO:\nJULIETTE, où es-tu?\n".encode("latin-1"))
    with pytest.raises(generate.GenerateError, match="latin1.txt is not UTF-8 text .*; save it as UTF-8"):
        generate.read_prompts([], str(latin1))


def test_no_prompt_is_said_to_sample_unconditionally_in_the_help_and_the_output(tmp_path, capsys):
    from bigjax import cli

    with pytest.raises(SystemExit):
        cli.parse_args(["generate", "--help"])
    assert "no prompt at all: one unconditional sample" in " ".join(capsys.readouterr().out.split())
    assert generate.read_prompts([], None) == [""]
    assert "no prompt given: one unconditional sample" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert generate.read_prompts([], str(empty)) == [""]
    assert "no prompt given" in capsys.readouterr().err
    generate.read_prompts(["ROMEO:"], None)
    assert capsys.readouterr().err == ""
