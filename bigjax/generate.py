"""`bigjax generate`: sampling from a trained causal LM with a KV cache.

    generator = load(workdir)                      # the newest committed checkpoint (or step=N), one device
    texts = generator.complete(["ROMEO:", "JULIET:"], Sampling(max_new_tokens=100, temperature=0.8, top_k=40))

The KV cache
------------
Each attention layer keeps the keys and values of the tokens it has seen, so a new token costs the work of one
position rather than a pass over the whole text. The cache is Flax's "cache" collection of the same GPT with
`decode=True` (bigjax.models.gpt.decoding_model; the parameters are the trained ones, unchanged): per layer a
key and a value array [batch, columns, kv_heads, head_dim], stacked over layers like the weights when the
layers are scanned. Column c of a row holds its token at position c.

Generating is one prefill, then one step per new token:

* prefill: the prompts, right-padded into one [batch, width] array, go through the model in one call, which
  fills columns 0..width-1 of a new cache and returns each row's next-token logits at its last real token;
* step: each row's newest token goes in at its own position (the row's length so far), is written into that
  column, and attends to columns 0..position.

Prompts of different lengths are right-padded, and each row keeps its own length, rather than left-padded:
with a column being a position, no row needs a position offset (learned position embeddings and RoPE see what
they saw in training), and the padding after a short prompt is invisible by causality alone: a query at
position p sees columns <= p, and a row overwrites its padded columns with its own tokens before it reaches
them. No padding mask is needed. The price is that rows write different columns in a step, a per-row
dynamic_update_slice that XLA does as one scatter.

Compiled once per shape: the prefill's width is the longest prompt rounded up to a power of two (at least 16),
and the cache's columns are what the longest prompt and max_new_tokens need, rounded up to a multiple of 64,
at most the model's max_len. So the prefill compiles once per (batch, width, columns), the decode step once
per (batch, columns), and a new prompt length or a few more new tokens reuse them. The sampling settings are
arguments of the compiled sampler, not constants: another temperature, top-k or top-p compiles nothing.

Longer than the model's context (max_len): a prompt is cut to its last max_len tokens; a row whose text fills
the context is prefilled again from its last max_len/2 tokens and goes on. The other rows of the batch are
prefilled again at the same time from their whole context, which gives them back the cache they had. So a row's
logits do not depend on what else shares its batch, and greedy decoding gives each row what it gets alone (a
sampled row draws its noise from the step's one random key for the whole batch, so it depends on its place).

Sampling: temperature (0 = greedy), then top-k, then top-p (the smallest set of most likely tokens whose
probability reaches p), in Hugging Face's order. The tokenizer's pad, cls and mask ids, and the ids that pad
the model's vocabulary beyond the tokenizer's, are never sampled; eos may be, and ends its row. A row ends at a
stop token (eos) or once its new text contains a stop string; the completion leaves out the stop and what
follows it; the other rows go on. An empty prompt starts from eos, the token every training record followed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bigjax import config as config_lib
from bigjax import data, paths
from bigjax.compress.quantized import quantized
from bigjax.data import tokenizers
from bigjax.errors import UserError
from bigjax.models import gpt
from bigjax.run import checkpoint, compilation_cache
from bigjax.run.setup import make_setup

MIN_PREFILL_WIDTH = 16
CACHE_COLUMN_MULTIPLE = 64


class GenerateError(UserError):
    """A message for the user."""


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How each new token is chosen, and when a completion ends."""

    max_new_tokens: int = 200
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 40  # keep the k most likely tokens; 0 = no limit
    top_p: float = 1.0  # keep the smallest set of most likely tokens whose probability reaches p; 1 = no limit
    stop: tuple[str, ...] = ()  # a row ends once its new text contains one of these
    seed: int = 0

    def __post_init__(self):
        problems = []
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens={self.max_new_tokens}: ask for at least 1")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            problems.append(f"temperature={self.temperature}: use 0 (greedy) or a finite number above it")
        if self.top_k < 0:
            problems.append(f"top_k={self.top_k}: use 0 (no limit) or more")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p={self.top_p}: use a probability in (0, 1]; 1 = no limit")
        if any(stop == "" for stop in self.stop):
            problems.append("an empty stop string would end every completion at once")
        if problems:
            raise GenerateError("; ".join(problems))


class Generator:
    """A causal LM ready to sample: its parameters on one device, the tokenizer it was trained with, and the
    compiled prefill, decode step and sampler (jitted once here; each compiles once per shape)."""

    def __init__(self, model_config: gpt.GPTConfig, params, tokenizer, step: int | None = None, run_config=None):
        tokenizers.check_vocab(model_config.vocab_size, tokenizer, "the run's tokenizer")
        # A quantized or LoRA run's parameters hold integer kernels or adapters: the decoding model runs them as the
        # run's config.quant and config.lora say.
        self.model = quantized(gpt.decoding_model(model_config), run_config)
        self.context = model_config.max_len
        self.params = params
        self.tokenizer = tokenizer
        self.step = step  # the checkpoint the parameters come from
        self.samplable = jnp.asarray(samplable_ids(tokenizer, model_config.vocab_size))
        self.compiled_prefill = jax.jit(self._prefill, static_argnames="columns")
        self.compiled_step = jax.jit(self._step, donate_argnames="cache")
        self.compiled_sample = jax.jit(sample_tokens)

    # ----------------------------------------------------------------------------------------------
    # Text in, text out

    def complete(self, prompts: Sequence[str], sampling: Sampling = Sampling()) -> list[str]:
        """Each prompt's completion (its new text alone), generated as one batch."""
        eos = self.tokenizer.special_ids["eos"]
        prompt_ids = [list(self.tokenizer.encode(prompt)) or [eos] for prompt in prompts]
        new_ids = self.generate_ids(prompt_ids, sampling)
        return [
            cut_at_stop(self.completion_text(prompt, new), sampling.stop)
            for prompt, new in zip(prompt_ids, new_ids, strict=True)
        ]

    def completion_text(self, prompt_ids, new_ids) -> str:
        """The text `new_ids` add after the prompt's. Decoded together with the prompt, so that a tokenizer that
        marks word starts (SentencePiece drops the space before a text's first word) spells it as running text."""
        before = self.tokenizer.decode(prompt_ids)
        whole = self.tokenizer.decode([*prompt_ids, *new_ids])
        return whole[len(before) :] if whole.startswith(before) else self.tokenizer.decode(new_ids)

    # ----------------------------------------------------------------------------------------------
    # Token ids in, token ids out

    def generate_ids(self, prompts: Sequence[Sequence[int]], sampling: Sampling, stop_tokens=()) -> list[list[int]]:
        """Each prompt's new token ids. A row ends at `stop_tokens` (and eos), left out, or with the token that
        completes a stop string of `sampling.stop` (the text is cut there by `complete`), or at max_new_tokens."""
        if not prompts or any(len(prompt) == 0 for prompt in prompts):
            raise GenerateError("every prompt needs at least one token (`complete` starts an empty one from eos)")
        stop_tokens = {*map(int, stop_tokens), self.tokenizer.special_ids["eos"]}
        rows = [
            Row([int(t) for t in prompt], len(prompt), start=max(0, len(prompt) - self.context)) for prompt in prompts
        ]
        columns = cache_columns(max(len(row.context) for row in rows), sampling.max_new_tokens, self.context)
        logits, cache = self.prefill([row.context for row in rows], columns)
        settings = (jnp.float32(sampling.temperature), jnp.int32(sampling.top_k), jnp.float32(sampling.top_p))
        key = jax.random.key(sampling.seed)
        for i in range(sampling.max_new_tokens):
            new = np.asarray(self.compiled_sample(logits, jax.random.fold_in(key, i), *settings, self.samplable))
            for row, token in zip(rows, new.tolist(), strict=True):
                if not row.done:
                    self._extend(row, token, stop_tokens, sampling.stop)
            if all(row.done for row in rows) or i + 1 == sampling.max_new_tokens:
                break
            full = [row for row in rows if not row.done and row.position == self.context]
            if full:
                for row in full:
                    row.start = len(row.tokens) - self.context // 2
                # A finished row takes one token: what it computes is never read.
                logits, cache = self.prefill([row.tokens[-1:] if row.done else row.context for row in rows], columns)
            else:
                # A finished row stands still, at a column that exists.
                positions = [min(row.position, columns - 1) for row in rows]
                logits, cache = self.decode_step(cache, new, positions)
        return [row.new_tokens for row in rows]

    def _extend(self, row: Row, token: int, stop_tokens: set[int], stop_strings: Sequence[str]) -> None:
        if token in stop_tokens:
            row.done = True
            return
        row.tokens.append(token)
        if stop_strings:
            new_text = self.completion_text(row.tokens[: row.prompt_length], row.new_tokens)
            row.done = any(stop in new_text for stop in stop_strings)

    def prefill(self, contexts: Sequence[Sequence[int]], columns: int):
        """A new cache of `columns` holding each row's context, and each row's next-token logits [batch, vocab]."""
        lengths = np.array([len(context) for context in contexts], np.int32)
        width = prefill_width(int(lengths.max()), self.context)
        assert width <= columns, (width, columns)
        tokens = np.full((len(contexts), width), self.tokenizer.special_ids["pad"], np.int32)
        for row, context in enumerate(contexts):
            tokens[row, : len(context)] = context
        return self.compiled_prefill(self.params, tokens, lengths, columns=columns)

    def decode_step(self, cache, tokens, positions):
        """Each row's token [batch] in at its position [batch]: (next-token logits [batch, vocab], the cache)."""
        return self.compiled_step(self.params, cache, np.asarray(tokens, np.int32), np.asarray(positions, np.int32))

    def _prefill(self, params, tokens, lengths, columns: int):
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        variables = {"params": params, "cache": self._empty_cache(tokens.shape[0], columns)}
        logits, updated = self.model.apply(
            variables, tokens, positions=positions, last_token=lengths - 1, mutable=["cache"]
        )
        return logits[:, 0], updated["cache"]

    def _step(self, params, cache, tokens, positions):
        variables = {"params": params, "cache": cache}
        logits, updated = self.model.apply(variables, tokens[:, None], positions=positions[:, None], mutable=["cache"])
        return logits[:, 0], updated["cache"]

    def _empty_cache(self, batch: int, columns: int):
        """Zeros in the cache's shapes, which model.init in decode mode sizes from a [batch, columns] input."""
        sizing = jax.eval_shape(self.model.init, jax.random.key(0), jnp.zeros((batch, columns), jnp.int32))
        return jax.tree.map(lambda leaf: jnp.zeros(leaf.shape, leaf.dtype), sizing["cache"])


@dataclasses.dataclass
class Row:
    """One prompt's generation: its tokens (the prompt, then the new ones) and where its cached context begins."""

    tokens: list[int]
    prompt_length: int
    start: int  # tokens[start:] is in the cache, or goes there with the next step (the newest token)
    done: bool = False

    @property
    def context(self) -> list[int]:
        return self.tokens[self.start :]

    @property
    def position(self) -> int:
        """Where the newest token goes in: how many tokens of the row the cache holds."""
        return len(self.tokens) - 1 - self.start

    @property
    def new_tokens(self) -> list[int]:
        return self.tokens[self.prompt_length :]


# --------------------------------------------------------------------------------------------------
# Sampling


def sample_tokens(logits, key, temperature, top_k, top_p, samplable):
    """[batch, vocab] logits -> [batch] token ids, among the `samplable` ids only; greedy at temperature 0."""
    logits = jnp.where(samplable, logits, -jnp.inf)
    greedy = jnp.argmax(logits, axis=-1)
    scaled = logits / jnp.where(temperature > 0, temperature, 1.0)
    sampled = jax.random.categorical(key, keep_top_k_top_p(scaled, top_k, top_p), axis=-1)
    return jnp.where(temperature > 0, sampled, greedy)


def keep_top_k_top_p(logits, top_k, top_p):
    """`logits` [..., vocab] with -inf outside the k most likely tokens (k = 0: no limit), and then outside the
    nucleus: the smallest set of the most likely tokens whose probability, renormalized after top-k, reaches
    top_p (1: no limit). Tokens tied with the least likely one kept are kept too."""
    vocab = logits.shape[-1]
    descending = jnp.flip(jnp.sort(logits, axis=-1), axis=-1)
    rank = jnp.arange(vocab)
    in_top_k = rank < jnp.where(top_k > 0, top_k, vocab)
    descending = jnp.where(in_top_k, descending, -jnp.inf)
    probs = jax.nn.softmax(descending, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # of the more likely tokens
    kept = in_top_k & ((mass_before < top_p) | (top_p >= 1))
    threshold = jnp.min(jnp.where(kept, descending, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits >= threshold, logits, -jnp.inf)


def samplable_ids(tokenizer, model_vocab: int) -> np.ndarray:
    """[model_vocab] booleans: the tokenizer's ids less pad, cls and mask. Eos stays: sampled, it ends its row."""
    samplable = np.arange(model_vocab) < tokenizer.vocab_size
    for name in ("pad", "cls", "mask"):
        samplable[tokenizer.special_ids[name]] = False
    return samplable


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """`text` up to the first stop string in it (the stop left out)."""
    return text[: min((text.find(stop) for stop in stops if stop in text), default=len(text))]


# --------------------------------------------------------------------------------------------------
# Shapes


def prefill_width(longest: int, context: int) -> int:
    """A prefill's columns: the longest context rounded up to a power of two (at least 16), at most max_len."""
    return min(context, max(MIN_PREFILL_WIDTH, 1 << (longest - 1).bit_length()))


def cache_columns(longest: int, max_new_tokens: int, context: int) -> int:
    """The cache's columns: room for the longest prompt and the new tokens, rounded up to a multiple of 64 so
    that a few more new tokens reuse the compiled step; at most max_len (a row that fills it is prefilled again)."""
    needed = gpt.round_up(longest + max_new_tokens, CACHE_COLUMN_MULTIPLE)
    return min(context, max(prefill_width(longest, context), needed))


# --------------------------------------------------------------------------------------------------
# Loading a trained run


def load(workdir, step: int | None = None) -> Generator:
    """A Generator with the parameters of WORKDIR's newest committed checkpoint that reads back (or of `step`).

    Only committed checkpoints are considered (checkpoint.committed_steps): Orbax's own latest step may be one a
    trainer is still writing, or one it never finished. One that cannot be read is reported and skipped; nothing
    in the workdir is moved or changed. Each checkpoint's model and tokenizer come from the config saved in it:
    config.json says what the workdir's latest run was, which may have been another model.
    """
    workdir = paths.workdir(workdir)
    config = check_causal_lm(config_lib.load_saved(workdir), workdir)  # before any checkpoint is read
    compilation_cache.use(config, workdir, reads_only=True)
    committed = checkpoint.committed_steps(workdir)
    if not committed:
        raise GenerateError(
            f"no committed checkpoint in {checkpoint.checkpoint_dir(workdir)} yet; train first, or wait for the "
            "first save (config.checkpoint_every)"
        )
    if step is not None and step not in committed:
        raise GenerateError(
            f"checkpoint {step} is not a committed checkpoint of {workdir}; committed: {', '.join(map(str, committed))}"
        )
    mngr = checkpoint.manager(workdir, read_only=True)
    for candidate in [step] if step is not None else reversed(committed):
        try:
            config, task, params = read_checkpoint(mngr, candidate, workdir)
        except GenerateError:
            raise
        except Exception as error:  # a truncated or missing file; Orbax and tensorstore raise many kinds
            why = f"checkpoint {candidate} at {checkpoint.step_dir(workdir, candidate)} cannot be read"
            if step is not None:
                raise GenerateError(f"{why}: {checkpoint.describe(error)}") from error
            note(f"{why} ({checkpoint.describe(error)}); trying the one before it")
            continue
        note(f"generating from checkpoint {candidate} of {workdir}")
        tokenizer = data.make_tokenizer(config.data.tokenizer)
        return Generator(task.model_config, params, tokenizer, candidate, run_config=config)
    raise GenerateError(f"none of the committed checkpoints of {workdir} can be read: {', '.join(map(str, committed))}")


def read_checkpoint(mngr, step: int, workdir):
    """(config, task, params) of a checkpoint, its model built from the config saved with it."""
    config = config_lib.from_dict(checkpoint.saved_config(mngr, step).to_dict())  # upgraded like config.json
    check_causal_lm(config, checkpoint.step_dir(workdir, step))
    # Sampling needs no parallelism: one device, whatever mesh the run used.
    config.mesh.update(dict(data=1, fsdp=1, tensor=1, context=1))
    setup = make_setup(config, devices=jax.devices()[:1])
    params = checkpoint.restore_variables(mngr, step, setup.variables_target())["params"]
    return config, setup.task, params


def check_causal_lm(config, where):
    if config.task.name != "causal_lm":
        raise GenerateError(f"{where} trained a {config.task.name} model; generate samples from causal LMs only")
    return config


def read_prompts(prompts: Sequence[str], prompts_file: str | None) -> list[str]:
    """The --prompt texts, then the file's: one prompt a line, or in a .jsonl file one {"prompt": TEXT} (or a JSON
    string) a line, for prompts that span lines. Blank lines are skipped. No prompt at all: one empty prompt (an
    unconditional sample, from eos), said on stderr."""
    prompts = list(prompts)
    if prompts_file:
        path = pathlib.Path(prompts_file)
        if not path.is_file():
            raise GenerateError(f"--prompts-file {path} not found")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise GenerateError(f"--prompts-file {path} is not UTF-8 text ({error}); save it as UTF-8") from None
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                prompts.append(_jsonl_prompt(line, path, number) if path.suffix == ".jsonl" else line)
    if not prompts:
        note("no prompt given: one unconditional sample, starting from eos (the token that ends every record)")
    return prompts or [""]


def _jsonl_prompt(line: str, path: pathlib.Path, number: int) -> str:
    try:
        value = json.loads(line)
    except json.JSONDecodeError as error:
        raise GenerateError(f'{path}:{number} is not JSON ({error}); write one {{"prompt": TEXT}} a line') from None
    prompt = value.get("prompt") if isinstance(value, dict) else value
    if not isinstance(prompt, str):
        raise GenerateError(f'{path}:{number} has no prompt; write one {{"prompt": TEXT}} (or a JSON string) a line')
    return prompt


def generate_text(workdir, prompt: str, max_new_tokens=200, temperature=0.8, top_k=40, seed=0, step=None) -> str:
    """The prompt and its completion, from WORKDIR's newest committed checkpoint: one call, for notebooks."""
    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, seed=seed)
    return prompt + load(workdir, step).complete([prompt], sampling)[0]


def note(message: str) -> None:
    """A line for the user on stderr: stdout holds the completions alone."""
    print(message, file=sys.stderr)
