"""A bigjax causal LM as an lm-evaluation-harness model (an `lm_eval.api.model.TemplateLM`), on the run's own mesh.

    lm = BigjaxLM(generate.load(workdir, mesh={}), batch_size=16)
    lm_eval.simple_evaluate(model=lm, tasks=["wikitext"])

Imported only where lm-eval is installed (bigjax.eval.harness checks first).

The three kinds of request:

* `loglikelihood` (multiple choice): lm-eval's TemplateLM splits each (context, continuation) into tokens as its
  own `hf` model does (the context's trailing spaces go to the continuation; an empty context is the prefix token);
  each pair is scored as one row: (context + continuation)[-(max_len + 1):], inputs the row less its last token,
  the continuation's tokens weighted.
* `loglikelihood_rolling` (perplexity): each text cut into lm-eval's own disjoint windows of max_len tokens (the
  first after the prefix token), each window a row as above, the window sums added.
* `generate_until`: bigjax.generate's KV-cache sampler, with the task's stop strings, max_gen_toks and sampling
  settings, the prompt left-cut to leave max_gen_toks of room in the context (as the `hf` model does).

Several processes (a multi-host job): process 0 drives lm-eval; before each step it takes on the mesh it sends
the step's inputs to the others (`Followers`), which take the same step with it until it says stop.

Rows are sorted by length and scored `batch_size` at a time in one jitted step split over the mesh (rows over the
data axes, parameters as the run shards them), padded to `batch_size` rows and to a width from a few fixed ones
(a power of two from 16, at most max_len: generate.prefill_width): the step compiles once per width used.

The prefix token (an empty context, the start of a rolling text) is eos: the token that precedes every record in
bigjax's training data. Probabilities are normalized over the model's vocabulary (config.model.vocab_size), not the
ids it pads the output layer with, which no text ever holds (an exported model has the former alone).
"""

from __future__ import annotations

import collections
import json

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec
from lm_eval import utils as lm_eval_utils
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import normalize_gen_kwargs, postprocess_generated_text

from bigjax import generate
from bigjax.compress.quantized import quantized
from bigjax.errors import UserError
from bigjax.models import gpt
from bigjax.parallel import mesh as mesh_lib
from bigjax.parallel import pipeline as pipeline_lib

MAX_GEN_TOKS = 256  # lm-eval's default for a task that names none (its `hf` model's)


class BigjaxLM(TemplateLM):
    """The lm-eval model of a loaded run: `generator` holds its parameters (split over its mesh) and tokenizer."""

    def __init__(self, generator: generate.Generator, batch_size: int = 16):
        super().__init__()
        self.generator = generator
        self.text_tokenizer = generator.tokenizer
        self.max_length = generator.context
        mesh = generator.sharding.mesh
        data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
        # Every device of the data axes gets whole rows, in every micro-batch of a pipelined mesh (the eval job's).
        pipelined = pipeline_lib.schedule_of(generator.run_config.model, mesh.shape["stage"])
        self.batch_size = gpt.round_up(batch_size, data_parallel * (pipelined["microbatches"] if pipelined else 1))
        self.score_step = make_score_step(generator)
        self.followers = Followers()

    # ----------------------------------------------------------------------------------------------
    # Tokens, as TemplateLM asks

    @property
    def eot_token_id(self) -> int:
        return int(self.text_tokenizer.special_ids["eos"])

    @property
    def prefix_token_id(self) -> int:
        return self.eot_token_id

    @property
    def max_gen_toks(self) -> int:
        return MAX_GEN_TOKS

    @property
    def tokenizer_name(self) -> str:
        return self.text_tokenizer.fingerprint

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        return [int(i) for i in self.text_tokenizer.encode(string)]

    # ----------------------------------------------------------------------------------------------
    # The three kinds of request

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: ((context, continuation), context tokens, continuation tokens) -> (log-likelihood, greedy)."""
        return self.score_pairs([(context, continuation) for _, context, continuation in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owners = [], []
        for index, request in enumerate(requests):
            tokens = self.tok_encode(request.args[0])
            for window in lm_eval_utils.get_rolling_token_windows(tokens, self.prefix_token_id, self.max_length, 1):
                windows.append(lm_eval_utils.make_disjoint_window(window))
                owners.append(index)
        totals = [0.0] * len(requests)
        for index, (logprob, _) in zip(owners, self.score_pairs(windows), strict=True):
            totals[index] += logprob
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Each request's completion; requests with the same generation settings are generated together."""
        results: list[str | None] = [None] * len(requests)
        groups = collections.defaultdict(list)
        for index, request in enumerate(requests):
            groups[json.dumps(request.args[1], sort_keys=True, default=str)].append(index)
        for indices in groups.values():
            sampling, stops = sampling_for(requests[indices[0]].args[1], self.max_length)
            room = self.max_length - sampling.max_new_tokens
            prompts = {i: self.tok_encode(requests[i].args[0])[-room:] or [self.eot_token_id] for i in indices}
            ordered = sorted(indices, key=lambda i: -len(prompts[i]))
            for start in range(0, len(ordered), self.batch_size):
                chunk = ordered[start : start + self.batch_size]
                self.followers.send_generate([prompts[i] for i in chunk], sampling)
                new_ids = self.generator.generate_ids([prompts[i] for i in chunk], sampling)
                for i, new in zip(chunk, new_ids, strict=True):
                    text = self.generator.completion_text(prompts[i], new)
                    results[i] = postprocess_generated_text(text, stops, None)
        return results

    # ----------------------------------------------------------------------------------------------
    # Scoring rows on the mesh

    def score_pairs(self, pairs) -> list[tuple[float, bool]]:
        """(context tokens, continuation tokens) pairs -> (the continuation's log-likelihood, whether greedy decoding
        gives it), the longest rows first, `batch_size` rows a step."""
        rows = [self.row(context, continuation) for context, continuation in pairs]
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        results = [None] * len(rows)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            logprobs, greedy = self.score_batch([rows[i] for i in chunk])
            for i, logprob, is_greedy in zip(chunk, logprobs, greedy, strict=True):
                results[i] = (float(logprob), bool(is_greedy))
        return results

    def row(self, context: list[int], continuation: list[int]) -> tuple[list[int], int]:
        """(the tokens the model reads, then predicts: at most max_len + 1 of them, cut from the left; how many of
        the last are scored)."""
        if not continuation:
            raise UserError("lm-eval asked for the log-likelihood of an empty continuation; check the task's choices")
        tokens = (context + continuation)[-(self.max_length + 1) :]
        return tokens, min(len(continuation), len(tokens) - 1)

    def score_batch(self, rows) -> tuple[np.ndarray, np.ndarray]:
        width = generate.prefill_width(max(len(tokens) - 1 for tokens, _ in rows), self.max_length)
        inputs = np.zeros((self.batch_size, width), np.int32)
        targets = np.zeros((self.batch_size, width), np.int32)
        weights = np.zeros((self.batch_size, width), np.float32)
        for r, (tokens, scored) in enumerate(rows):
            n = len(tokens) - 1
            inputs[r, :n], targets[r, :n] = tokens[:-1], tokens[1:]
            weights[r, n - scored : n] = 1
        self.followers.send(Followers.SCORE, [inputs, targets, weights])
        logprobs, greedy = self.score_step(self.generator.params, inputs, targets, weights)
        return np.asarray(logprobs)[: len(rows)], np.asarray(greedy)[: len(rows)]

    # ----------------------------------------------------------------------------------------------
    # The other processes of a job

    def follow(self) -> None:
        """On a process other than 0: take each step process 0 announces, with it, until it says stop."""
        while True:
            kind, arrays = self.followers.receive()
            if kind == Followers.STOP:
                return
            if kind == Followers.SCORE:
                self.score_step(self.generator.params, *arrays)
            else:
                prompts, sampling = Followers.generate_request(arrays)
                self.generator.generate_ids(prompts, sampling)


class Followers:
    """Process 0's announcements to the other processes of the job: a kind and up to 4 arrays (of at most 2 axes), as
    a fixed-size header (kind, count, then dtype, rows, columns of each) and then the arrays, each broadcast from
    process 0. A no-op in a job of one process."""

    STOP, SCORE, GENERATE = 0, 1, 2
    DTYPES = (np.int32, np.float32, np.uint8)
    MAX_ARRAYS = 4

    def __init__(self):
        self.leader, self.many = jax.process_index() == 0, jax.process_count() > 1

    def send(self, kind: int, arrays=()) -> None:
        if not self.many:
            return
        header = np.zeros(2 + 3 * self.MAX_ARRAYS, np.int32)
        header[:2] = kind, len(arrays)
        for i, array in enumerate(arrays):
            array = np.atleast_2d(array) if array.ndim < 2 else array
            header[2 + 3 * i : 5 + 3 * i] = self.DTYPES.index(array.dtype.type), *array.shape
        multihost_utils.broadcast_one_to_all(header, is_source=True)
        if arrays:
            multihost_utils.broadcast_one_to_all(tuple(np.atleast_2d(a) for a in arrays), is_source=True)

    def receive(self) -> tuple[int, list[np.ndarray]]:
        header = multihost_utils.broadcast_one_to_all(np.zeros(2 + 3 * self.MAX_ARRAYS, np.int32), is_source=False)
        kind, count = int(header[0]), int(header[1])
        shapes = [header[2 + 3 * i : 5 + 3 * i] for i in range(count)]
        templates = tuple(np.zeros((rows, columns), self.DTYPES[dtype]) for dtype, rows, columns in shapes)
        arrays = multihost_utils.broadcast_one_to_all(templates, is_source=False) if count else ()
        return kind, [np.asarray(array) for array in arrays]

    def stop(self) -> None:
        self.send(self.STOP)

    def send_generate(self, prompts, sampling: generate.Sampling) -> None:
        if not self.many:
            return
        tokens = np.zeros((len(prompts), max(map(len, prompts))), np.int32)
        for row, prompt in enumerate(prompts):
            tokens[row, : len(prompt)] = prompt
        lengths = np.array([list(map(len, prompts))], np.int32)
        numbers = [sampling.max_new_tokens, sampling.temperature, sampling.top_k, sampling.top_p, sampling.seed]
        stops = np.frombuffer(json.dumps(list(sampling.stop)).encode(), np.uint8)[None]
        self.send(self.GENERATE, [tokens, lengths, np.array([numbers], np.float32), stops])

    @staticmethod
    def generate_request(arrays) -> tuple[list[list[int]], generate.Sampling]:
        tokens, lengths, numbers, stops = arrays
        prompts = [row[:length].tolist() for row, length in zip(tokens, lengths[0], strict=True)]
        max_new, temperature, top_k, top_p, seed = numbers[0].tolist()
        stop = tuple(json.loads(bytes(stops[0]).decode()))
        sampling = generate.Sampling(int(max_new), temperature, int(top_k), top_p, stop, int(seed))
        return prompts, sampling


def make_score_step(generator: generate.Generator):
    """(params, inputs, targets, weights) [batch, width] -> each row's summed log-probability of its weighted targets
    and whether each is the most likely token there [batch]; one jit over the generator's mesh."""
    config = generator.run_config
    model = quantized(gpt.GPT(gpt.GPTConfig.from_config(config.model)), generator.variant)
    vocab = config.model.vocab_size  # before padding: the ids of real tokens

    def score(params, inputs, targets, weights):
        logits = model.apply({"params": params}, inputs).astype(jnp.float32)
        logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab, logits, -jnp.inf)
        picked = jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], axis=-1)[..., 0]
        scored = weights > 0
        greedy = (jnp.argmax(logits, axis=-1) == targets) | ~scored
        return jnp.where(scored, picked, 0.0).sum(axis=-1), greedy.all(axis=-1)

    sharding = generator.sharding
    rows = NamedSharding(sharding.mesh, PartitionSpec(mesh_lib.BATCH_AXES))
    param_shardings = jax.tree.map(lambda leaf: leaf.sharding, generator.params)
    step = jax.jit(score, in_shardings=(param_shardings, rows, rows, rows), out_shardings=sharding.replicated)

    def run(params, *arrays):
        # Every process holds the whole batch: each puts in the rows its devices hold.
        arrays = [jax.make_array_from_process_local_data(rows, array, array.shape) for array in arrays]
        with sharding.activate():
            return jax.device_get(step(params, *arrays))

    return run


def sampling_for(gen_kwargs: dict, max_length: int) -> tuple[generate.Sampling, list[str]]:
    """A task's generation settings (lm-eval's `until`, `max_gen_toks`, `do_sample`, `temperature`, `top_k`,
    `top_p`) as generate.Sampling, and the stop strings."""
    kwargs = normalize_gen_kwargs(gen_kwargs, MAX_GEN_TOKS)
    until = kwargs.get("until") or []
    stops = [until] if isinstance(until, str) else [stop for stop in until if stop]
    max_new = int(kwargs["max_gen_toks"])
    if max_new >= max_length:
        raise UserError(
            f"the task asks for up to {max_new} new tokens (max_gen_toks) but the model's context is {max_length} "
            "tokens: nothing would be left for the prompt; lower generation_kwargs.max_gen_toks below it"
        )
    sampling = generate.Sampling(
        max_new_tokens=max_new,
        temperature=float(kwargs["temperature"]) if kwargs.get("do_sample") else 0.0,
        top_k=int(kwargs.get("top_k") or 0),
        top_p=float(kwargs.get("top_p") or 1.0),
        stop=tuple(stops),
        seed=int(kwargs.get("seed") or 0),
    )
    return sampling, stops
