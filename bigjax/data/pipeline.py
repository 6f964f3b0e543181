"""From a token stream to host-local batches: pack, shuffle, shard per host, resume exactly.

Causal-LM examples are packed by concatenate-and-chunk: the split's tokens form one stream, and example i
is the window stream[i*T : i*T + T + 1] (inputs and the targets shifted by one). Grain's MapDataset gives
random access to a shuffled, repeated view of those windows, reshuffled each epoch from the seed.

Global example k of the run is always the same window, whatever the number of hosts: step s's global batch
is examples [s*B, (s+1)*B), and host p of P reads only its contiguous slice of it. The iterator's whole
state is the step, so a resumed run (on any number of hosts) sees exactly the batches it would have seen.
"""

from __future__ import annotations

import dataclasses

import grain
import jax
import numpy as np

from bigjax.data import corpus, tokenizers


@dataclasses.dataclass(frozen=True)
class TokenStream:
    tokens: np.ndarray  # int32
    bytes_per_token: float | None
    chars_per_token: float | None


def load_stream(config, split: str) -> TokenStream:
    """The tokens of one split of the configured source."""
    if config.data.source == "shakespeare":
        text = corpus.shakespeare_split(split, config.data.eval_fraction)
        tokens = tokenizers.make_tokenizer(config.data.tokenizer).encode(text)
        return TokenStream(tokens, len(text.encode("utf-8")) / len(tokens), len(text) / len(tokens))
    raise ValueError(f"source {config.data.source!r} is not a token stream")


def window_dataset(tokens: np.ndarray, seq_len: int) -> grain.MapDataset:
    num_windows = (len(tokens) - 1) // seq_len
    if num_windows < 1:
        raise ValueError(f"the split has {len(tokens)} tokens, fewer than one sequence of {seq_len + 1}")

    def window(i):
        chunk = tokens[i * seq_len : i * seq_len + seq_len + 1]
        return {"inputs": chunk[:-1], "targets": chunk[1:], "weights": np.ones(seq_len, np.float32)}

    return grain.MapDataset.range(num_windows).map(window)


def synthetic_dataset(seq_len: int, vocab_size: int, seed: int) -> grain.MapDataset:
    """Random tokens, a pure function of (seed, example index): for benchmarks, not learnable."""

    def example(i):
        tokens = np.random.default_rng((seed, i)).integers(0, vocab_size, seq_len + 1, dtype=np.int32)
        return {"inputs": tokens[:-1], "targets": tokens[1:], "weights": np.ones(seq_len, np.float32)}

    # Long enough never to run out; random access means nothing is materialized.
    return grain.MapDataset.range(2**40).map(example)


class HostBatches:
    """This host's share of each global batch, as numpy; checkpointable through get_state/set_state."""

    def __init__(self, examples: grain.MapDataset, global_batch: int, process_index: int, process_count: int):
        if global_batch % process_count:
            raise ValueError(f"batch_size={global_batch} does not divide across {process_count} processes")
        self.examples = examples
        self.global_batch = global_batch
        self.host_batch = global_batch // process_count
        self.offset = process_index * self.host_batch
        self.step = 0

    def batch_at(self, step: int) -> dict:
        first = step * self.global_batch + self.offset
        rows = [self.examples[first + j] for j in range(self.host_batch)]
        return {key: np.stack([row[key] for row in rows]) for key in rows[0]}

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = self.batch_at(self.step)
        self.step += 1
        return batch

    def get_state(self) -> dict:
        return {"step": self.step}

    def set_state(self, state: dict) -> None:
        self.step = int(state["step"])


@dataclasses.dataclass(frozen=True)
class EvalData:
    batches: list[dict]  # host-local; the same fixed batches at every evaluation
    stats: dict  # what the task's metrics need to know of the data, e.g. bytes_per_token


def train_batches(config) -> HostBatches:
    """This process's iterator over the shuffled, repeated training examples."""
    if config.data.source == "synthetic":
        examples = synthetic_dataset(config.data.seq_len, config.model.vocab_size, config.seed)
    else:
        tokens = load_stream(config, "train").tokens
        examples = window_dataset(tokens, config.data.seq_len).shuffle(seed=config.seed).repeat()
    return HostBatches(examples, config.batch_size, jax.process_index(), jax.process_count())


def eval_data(config) -> EvalData:
    """The first `eval_batches` batches of the eval split, in order, for this process."""
    if config.data.source == "synthetic":
        examples = synthetic_dataset(config.data.seq_len, config.model.vocab_size, config.seed + 1)
        stats = {}
    else:
        stream = load_stream(config, "eval")
        # repeat(): a small split with many eval batches wraps around rather than failing
        examples = window_dataset(stream.tokens, config.data.seq_len).repeat()
        stats = {"bytes_per_token": stream.bytes_per_token, "chars_per_token": stream.chars_per_token}
    batches = HostBatches(examples, config.batch_size, jax.process_index(), jax.process_count())
    return EvalData([batches.batch_at(i) for i in range(config.eval_batches)], stats)
