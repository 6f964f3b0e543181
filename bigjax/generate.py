"""Sampling from a trained causal LM: greedy (temperature 0), temperature, top-k.

Each new token reruns the model over a fixed window of `seq_len` tokens, so one compiled function serves
every step; the window slides once the text is longer than it. (A KV cache replaces this with the
generation work of the model-families issue.)
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from bigjax import checkpoint, data, tasks
from bigjax import config as config_lib
from bigjax import mesh as mesh_lib
from bigjax import state as state_lib


class GenerateError(Exception):
    """A message for the user."""


def load_for_generation(workdir, step: int | None = None):
    """(task, params, config, step) from the newest (or given) checkpoint in workdir, on one device."""
    workdir = pathlib.Path(workdir)
    config_path = workdir / "config.json"
    if not config_path.exists():
        raise GenerateError(f"{config_path} not found; is {workdir} a bigjax workdir? Train first.")
    config = config_lib.from_json(config_path.read_text())
    mngr = checkpoint.manager(workdir, read_only=True) if checkpoint.checkpoint_dir(workdir).exists() else None
    step = step if step is not None else (mngr.latest_step() if mngr else None)
    if step is None:
        raise GenerateError(f"no checkpoint in {checkpoint.checkpoint_dir(workdir)} yet")
    # Sampling one prompt needs no data parallelism: one device, whatever the run was trained on.
    config.mesh.update(dict(data=1, fsdp=1, tensor=1))
    mesh = mesh_lib.make_mesh(config, devices=jax.devices()[:1])
    rules = mesh_lib.logical_rules(config)
    if config.task.name != "causal_lm":
        raise GenerateError(f"{workdir} trained a {config.task.name} model; generate samples from causal LMs only")
    task = tasks.make_task(config)
    abstract, shardings = state_lib.abstract_variables_and_shardings(task, config.seed, mesh, rules)
    params = checkpoint.restore_variables(mngr, step, state_lib.restore_target(abstract, shardings))["params"]
    return task, params, config, step


def sample(task, params, prompt_ids, max_new_tokens: int, temperature: float, top_k: int, seed: int, valid_vocab: int):
    """Token ids continuing `prompt_ids`."""
    window = task.seq_len
    next_token = _make_next_token(task, window, temperature, top_k, valid_vocab)
    tokens = [int(t) for t in prompt_ids]
    rng = jax.random.key(seed)
    for i in range(max_new_tokens):
        context = tokens[-window:]
        buffer = np.zeros((1, window), np.int32)
        buffer[0, : len(context)] = context  # right padding is invisible to a causal model
        token = next_token(params, buffer, len(context) - 1, jax.random.fold_in(rng, i))
        tokens.append(int(token))
    return tokens[len(prompt_ids) :]


def _make_next_token(task, window, temperature, top_k, valid_vocab):
    @jax.jit
    def next_token(params, buffer, last, rng):
        logits = task.model.apply({"params": params}, buffer)[0, last]
        # The padded tail of the vocabulary is never a real token.
        logits = jnp.where(jnp.arange(logits.shape[-1]) < valid_vocab, logits, -jnp.inf)
        if temperature == 0:
            return jnp.argmax(logits)
        logits = logits / temperature
        if top_k > 0:
            kth = jax.lax.top_k(logits, min(top_k, valid_vocab))[0][-1]
            logits = jnp.where(logits < kth, -jnp.inf, logits)
        return jax.random.categorical(rng, logits)

    return next_token


def generate_text(workdir, prompt: str, max_new_tokens=200, temperature=0.8, top_k=40, seed=0, step=None) -> str:
    task, params, config, _ = load_for_generation(workdir, step)
    tokenizer = data.make_tokenizer(config.data.tokenizer)
    prompt = prompt or "\n"  # the model needs at least one token to continue
    ids = sample(task, params, tokenizer.encode(prompt), max_new_tokens, temperature, top_k, seed, tokenizer.vocab_size)
    return prompt + tokenizer.decode(ids)
