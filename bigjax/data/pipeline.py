"""From a source to host-local batches: the layout the task needs, shuffling, per-host slices, exact resume.

    split (records) -> layout (fixed-shape examples) -> shuffled, repeated -> HostBatches (this host's rows)

The layout follows config.task.name (see bigjax.data.packing for the text layouts and bigjax.data.images for the
image one):

    causal_lm            inputs, targets int32 [B, T]; weights float32 [B, T]; positions int32 [B, T] in zig-zag order
    masked_lm            tokens, segment_ids, positions int32 [B, T]
    classification text  tokens, segment_ids, positions int32 [B, T]; labels int32 [B, S]; label_weights [B, S]
    classification image image float32 [B, H, W, C]; labels int32 [B]; label_weights float32 [B]

Grain's MapDataset gives random access to a shuffled, repeated view of a split's examples, reshuffled each epoch
from the seed, so global example k of the run is always the same example (and, for images, the same
augmentation). Step s's global batch is examples [s*B, (s+1)*B), and host p of P reads only its contiguous
slice of it. The iterator's whole state is the step: a resumed run, on any number of hosts, sees exactly the
batches it would have seen.

Zig-zag order (config.data.context_load_balance, a causal LM whose sequence config.mesh.context splits): each
example's sequence is reordered here, once, so that each device of the context axis holds an early and a late chunk
of it (bigjax.parallel.context). Every per-token array moves: the targets and weights with their inputs, so that the
loss and the metrics, sums over tokens, are those of the original order; and the tokens' original positions, which
the model's position embeddings and causal mask read.
"""

from __future__ import annotations

import dataclasses

import grain
import jax
import numpy as np

from bigjax import config as config_lib
from bigjax import families
from bigjax.data import images, packing, sources, tokenized, tokenizers
from bigjax.data.errors import DataError
from bigjax.data.packing import window_dataset  # noqa: F401  (re-exported: the causal-LM layout)
from bigjax.ops import metrics
from bigjax.parallel.context import zigzag

# The arrays of an example (or a batch) whose last axis is the sequence: what zig-zag order moves.
SEQUENCE_KEYS = ("inputs", "targets", "weights", "positions")

TEXT_TASKS = ("causal_lm", "masked_lm", "classification")


class HostBatches:
    """This host's share of each global batch, as numpy; checkpointable through get_state/set_state."""

    def __init__(
        self, examples: grain.MapDataset, global_batch: int, process_index: int, process_count: int, data: str = ""
    ):
        if global_batch % process_count:
            raise DataError(f"config.batch_size={global_batch} does not divide across {process_count} processes")
        self.examples = examples
        self.global_batch = global_batch
        self.host_batch = global_batch // process_count
        self.offset = process_index * self.host_batch
        self.step = 0
        self.data = data  # names the examples: a resumed run on other data is told so

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
        # Global example k does not depend on the number of hosts, so neither does the state.
        return {"step": self.step, "data": self.data}

    def set_state(self, state: dict) -> None:
        self.step = int(state["step"])
        saved = state.get("data", self.data)
        if saved != self.data and self.step > 0:  # before the first batch, no data was read to differ from
            metrics.say(
                f"data: resuming on other data than the checkpoint's (was {saved!r}, now {self.data!r}): the batches "
                "from here on are not those an uninterrupted run would have seen"
            )


def state_before_any_batch() -> dict:
    """The state of a pipeline that has read nothing yet, for a checkpoint made without one (`bigjax import`): no
    data is named, as none was read, and building the pipeline would tokenize the whole training set for nothing."""
    return {"step": 0, "data": ""}


@dataclasses.dataclass(frozen=True)
class EvalData:
    batches: list[dict]  # host-local; the same fixed batches at every evaluation
    stats: dict  # what the task's metrics need to know of the data, e.g. bytes_per_token


def train_batches(config, process_index: int | None = None, process_count: int | None = None) -> HostBatches:
    """This process's iterator over the shuffled, repeated training examples (another process's, if given)."""
    if config.data.source == "synthetic":
        examples, name = synthetic_dataset(config, config.seed), "synthetic"
    else:
        base, augment, _ = split_examples(config, "train")
        name = f"{config.data.source}: {len(base)} examples"
        examples = base.shuffle(seed=config.seed).repeat()
        if augment is not None:  # after repeat: the index is the global example index, epoch included
            examples = examples.map_with_index(augment)
    examples = in_context_order(examples, config)
    return HostBatches(examples, config.batch_size, *_process(process_index, process_count), data=name)


def in_context_order(examples: grain.MapDataset, config) -> grain.MapDataset:
    """The examples in zig-zag order for config.mesh.context devices, with their positions, where
    config_lib.balances_context says so; as they are otherwise."""
    if not config_lib.balances_context(config):
        return examples
    ways = config.mesh.context
    if ways == -1:  # the rest of the devices: as the mesh will resolve it
        ways = config_lib.check_against_devices(config, jax.device_count())["context"]
    return examples.map(lambda example: context_order(example, ways))


def context_order(example: dict, ways: int) -> dict:
    """An example [T] (or a batch [B, T]) in zig-zag order for `ways` devices: every per-token array reordered
    alike, and the positions 0..T-1 of the original order added, reordered with their tokens."""
    length = example["inputs"].shape[-1]
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), example["inputs"].shape)
    example = {"positions": positions, **example}
    return {key: zigzag(value, ways, axis=-1) if key in SEQUENCE_KEYS else value for key, value in example.items()}


def _process(index: int | None, count: int | None) -> tuple[int, int]:
    return (jax.process_index() if index is None else index), (jax.process_count() if count is None else count)


def eval_data(config) -> EvalData:
    """The eval split in order, at most `eval_batches` batches of it, for this process. The last batch is padded
    with empty rows that weigh nothing, so no example counts twice."""
    if config.data.source == "synthetic":
        examples, stats = synthetic_dataset(config, config.seed + 1), {}
        count = config.eval_batches * config.batch_size
    else:
        base, augment, stats = split_examples(config, "eval")
        examples = base.map_with_index(augment) if augment is not None else base
        count = min(len(examples), config.eval_batches * config.batch_size)
    num_batches = -(-count // config.batch_size)
    padded = pad_with_empty_rows(in_context_order(examples, config), count, num_batches * config.batch_size)
    batches = HostBatches(padded, config.batch_size, jax.process_index(), jax.process_count())
    return EvalData([batches.batch_at(i) for i in range(num_batches)], stats)


def pad_with_empty_rows(examples: grain.MapDataset, count: int, total: int) -> grain.MapDataset:
    """The first `count` examples, then rows of zeros up to `total`.

    Zero is padding in every layout: weight 0 (causal LM, classification) and segment 0 (packed rows, which a masked
    LM scores by their segments, having no weights). A row of zeros is therefore scored by no task, where a copy of
    a real row with its weights zeroed would still be scored by the masked LM.
    """
    if count == total:
        return examples.slice(slice(0, count))
    empty = {key: np.zeros_like(value) for key, value in examples[0].items()}
    return grain.MapDataset.range(total).map(lambda i: examples[i] if i < count else empty)


# --------------------------------------------------------------------------------------------------
# Layouts


def split_examples(config, which: str):
    """(fixed examples of the split, the per-index augmentation or None, eval stats) for the configured task."""
    task = config.task.name
    if task not in TEXT_TASKS:
        raise DataError(f"config.task.name={task!r} has no data layout; bigjax.data knows {', '.join(TEXT_TASKS)}")
    split = sources.open_split(config, which)
    metrics.say(f"data: {which} split of {config.data.source}: {split.description}")
    if split.kind == "image":
        if task != "classification":
            raise DataError(f"{config.data.source} holds images; config.task.name={task!r} needs text")
        check_labels(config, split.num_classes, which)
        records = grain.MapDataset.source(split.records)
        return records, images.ImageExamples(config, train=which == "train"), {}
    tokenizer = tokenizers.make_tokenizer(config.data.tokenizer)
    if families.is_text(config.model.family):
        tokenizers.check_vocab(config.model.vocab_size, tokenizer, config.data.tokenizer)
    tokens = tokenized.load_or_tokenize(config, split, tokenizer)
    if task == "classification":
        check_labels(config, tokens.num_classes, which)
    if task == "causal_lm":
        if len(tokens.tokens) <= config.data.seq_len:
            raise DataError(
                f"the {which} split of {config.data.source} has {len(tokens.tokens)} tokens, fewer than one sequence "
                f"of {config.data.seq_len + 1}; use more data or a shorter config.data.seq_len"
            )
        return window_dataset(tokens.tokens, config.data.seq_len), None, tokens.stats()
    seed = config.seed if which == "train" else None
    rows = packing.packed_dataset(
        tokens,
        config.data.seq_len,
        tokenizer.special_ids,
        classify=task == "classification",
        max_segments=config.data.max_segments,
        shuffle_seed=seed,
    )
    return rows, None, {}


def check_labels(config, num_classes: int | None, which: str) -> None:
    """The head must have a class for every label of the source. More classes than the source has are allowed, but
    said (once, for the train split): a folder holding one class would otherwise train a 10-way head in silence."""
    if num_classes is None:
        raise DataError(
            f"{config.data.source} has no labels (config.data.label_field={config.data.label_field!r}); "
            "classification needs a labelled source"
        )
    if num_classes > config.task.num_classes:
        raise DataError(
            f"{config.data.source} has {num_classes} classes but config.task.num_classes="
            f"{config.task.num_classes}; set --config.task.num_classes={num_classes}"
        )
    if num_classes < config.task.num_classes and which == "train":
        metrics.say(f"warning: {fewer_classes(config, num_classes)}")


def fewer_classes(config, found: int) -> str:
    head = config.task.num_classes
    fewer = f"{config.data.source} has {found} class{'es' * (found != 1)} but config.task.num_classes={head}"
    if found < 2:
        layout = (
            "; an image folder needs one subfolder per class" if config.data.source.startswith("imagefolder:") else ""
        )
        return f"{fewer}: a classifier learns from 2 classes at least{layout}"
    return f"{fewer}: {head - found} of the head's classes never see an example; set --config.task.num_classes={found}"


# --------------------------------------------------------------------------------------------------
# Synthetic data: every layout, a pure function of (seed, example index); for benchmarks and tests.


def synthetic_dataset(config, seed: int) -> grain.MapDataset:
    """Random examples in the layout of config.task.name; long enough never to run out."""
    task, d = config.task.name, config.data
    if task == "classification" and families.is_image(config.model.family):
        shape = (d.image_size, d.image_size, d.channels)
        num_classes = config.task.num_classes

        def example(i):
            rng = np.random.default_rng((seed, i))
            return {
                "image": rng.standard_normal(shape, dtype=np.float32),
                "labels": np.int32(rng.integers(num_classes)),
                "label_weights": np.float32(1.0),
            }

    elif task == "causal_lm":
        vocab = config.model.vocab_size

        def example(i):
            tokens = np.random.default_rng((seed, i)).integers(0, vocab, d.seq_len + 1, dtype=np.int32)
            return {"inputs": tokens[:-1], "targets": tokens[1:], "weights": np.ones(d.seq_len, np.float32)}

    else:
        example = _synthetic_packed_row(config, seed)
    return grain.MapDataset.range(2**40).map(example)  # random access: nothing is materialized


def _synthetic_packed_row(config, seed: int):
    """Random packed rows: up to max_segments (or 4) segments of random tokens, each starting with cls."""
    d = config.data
    cls = tokenizers.make_tokenizer(d.tokenizer).special_ids["cls"]
    vocab = config.model.get("vocab_size", 256)
    classify = config.task.name == "classification"
    segments = d.max_segments if classify else 4

    def example(i):
        rng = np.random.default_rng((seed, i))
        count = int(rng.integers(1, segments + 1))
        cuts = np.sort(rng.choice(np.arange(1, d.seq_len), size=count - 1, replace=False)) if count > 1 else []
        starts = np.concatenate([[0], cuts]).astype(np.int64)
        segment_ids = np.cumsum(np.isin(np.arange(d.seq_len), starts)).astype(np.int32)
        positions = (np.arange(d.seq_len) - starts[segment_ids - 1]).astype(np.int32)
        tokens = rng.integers(0, vocab, d.seq_len, dtype=np.int32)
        tokens[starts] = cls
        row = {"tokens": tokens, "segment_ids": segment_ids, "positions": positions}
        if classify:
            labels = np.zeros(d.max_segments, np.int32)
            labels[:count] = rng.integers(0, config.task.num_classes, count)
            row.update(labels=labels, label_weights=(np.arange(d.max_segments) < count).astype(np.float32))
        return row

    return example
