"""Model details: FLOPs accounting matches the real parameters, presets, sampling."""

import flax.linen as nn
import jax
import numpy as np
import pytest
from conftest import REPO

from bigjax import config as config_lib
from bigjax import generate
from bigjax.models.gpt import GPTConfig, parameter_count
from bigjax.tasks.causal_lm import CausalLM, flops_per_token


@pytest.mark.parametrize("arg", ["", "llama=True"])
def test_matmul_parameter_count_matches_the_initialized_model(tiny_config, arg):
    config = tiny_config(arg)
    task = CausalLM(config)
    params = nn.unbox(jax.eval_shape(lambda: task.init_params(jax.random.key(0))))
    sizes = {jax.tree_util.keystr(path): leaf.size for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    kernels = sum(size for name, size in sizes.items() if "kernel" in name)
    embedding = sizes["['embed']['embedding']"]
    # A tied embedding does matmul work as the output projection; an untied one is only a lookup.
    assert parameter_count(task.model_config)["matmul"] == kernels + (embedding if config.model.tie_embeddings else 0)


def test_gpt2_124m_preset_has_124m_parameters_and_known_flops():
    config = config_lib.load(str(REPO / "experiments" / "gpt2_124m.py"))
    cfg = GPTConfig.from_config(config.model)
    counts = parameter_count(cfg)
    total = counts["layers"] + counts["embedding"]
    assert cfg.vocab_size == 50304
    assert 123e6 < total < 125.5e6
    # nanoGPT's estimate for the same model: 6N + 12*L*H*Q*T with N = all weights less positions.
    expected = 6 * (counts["layers"] + 50304 * 768) + 12 * 12 * 12 * 64 * 1024
    assert flops_per_token(cfg, 1024) == expected


def test_llama_1b_preset_is_about_a_billion_parameters():
    config = config_lib.load(str(REPO / "experiments" / "llama_1b.py"))
    counts = parameter_count(GPTConfig.from_config(config.model))
    assert 1.05e9 < counts["layers"] + counts["embedding"] < 1.15e9  # TinyLlama: 1.1B


def test_greedy_sampling_follows_the_argmax_and_never_emits_padding(tiny_config):
    config = tiny_config()
    task = CausalLM(config)
    params = nn.unbox(task.init_params(jax.random.key(0)))
    prompt = np.array([10, 20, 30], np.int32)
    out = generate.sample(task, params, prompt, 5, temperature=0.0, top_k=0, seed=0, valid_vocab=200)
    tokens = list(prompt)
    for token in out:  # recompute each step by hand
        logits = task.model.apply({"params": params}, np.array([tokens], np.int32))[0, -1]
        assert token == int(np.argmax(np.asarray(logits)[:200]))
        tokens.append(token)
    sampled = generate.sample(task, params, prompt, 50, temperature=2.0, top_k=0, seed=1, valid_vocab=200)
    assert max(sampled) < 200
