"""Layouts: tokenized records -> fixed-shape examples.

Causal LM concatenates and chunks: the split's tokens (every record followed by eos) form one stream, and example i
is the window stream[i*T : i*T + T + 1], inputs and targets shifted by one.

Masked LM and text classification pack several records into one row of T tokens without letting them see each
other: each record becomes a segment that starts with the tokenizer's cls token, `segment_ids` number the
segments 1, 2, 3... (0 is padding) and `positions` count from 0 within each segment. A record longer than a row
is cut into pieces of T (masked LM) or truncated (classification: one label per record). Classification rows hold
at most `max_segments` records and carry `labels[k-1]`, the class of segment k, with `label_weights` 1 where
segment k exists.

Packing is greedy and in a fixed order (the records shuffled once by the seed), so row r of a split is the same
on every host and in every run: the rows are what the iterator shuffles, epoch by epoch.
"""

from __future__ import annotations

import dataclasses

import grain
import numpy as np

from bigjax.data.tokenized import Tokenized
from bigjax.ops import metrics


def window_dataset(tokens: np.ndarray, seq_len: int) -> grain.MapDataset:
    """Causal-LM windows of a token stream (any integer dtype, e.g. a uint16 memmap) as int32."""
    num_windows = (len(tokens) - 1) // seq_len
    if num_windows < 1:
        raise ValueError(f"the split has {len(tokens)} tokens, fewer than one sequence of {seq_len + 1}")

    def window(i):
        chunk = np.asarray(tokens[i * seq_len : i * seq_len + seq_len + 1], dtype=np.int32)
        return {"inputs": chunk[:-1], "targets": chunk[1:], "weights": np.ones(seq_len, np.float32)}

    return grain.MapDataset.range(num_windows).map(window)


@dataclasses.dataclass(frozen=True)
class PackingPlan:
    """Which pieces of which records fill each row. Piece j is tokens [start[j], start[j] + length[j]) of record
    record[j]; row r holds pieces row_start[r] .. row_start[r + 1] - 1, in order."""

    record: np.ndarray
    start: np.ndarray
    length: np.ndarray
    row_start: np.ndarray

    @property
    def num_rows(self) -> int:
        return len(self.row_start) - 1


def plan_packing(lengths: np.ndarray, order: np.ndarray, seq_len: int, max_segments: int, cut_long: bool):
    """Next-fit packing of records (taken in `order`) into rows of seq_len tokens, one cls token per piece.

    Returns (plan, truncated): how many records were longer than a row and were truncated (cut_long=False).
    """
    room = seq_len - 1  # a piece's tokens after its cls
    record, start, length, row_start = [], [], [], [0]
    used = segments = truncated = 0
    for i in order:
        n = int(lengths[i])
        if n > room and not cut_long:
            truncated += 1
        pieces = [(s, min(room, n - s)) for s in range(0, n, room)] if cut_long else [(0, min(room, n))]
        for piece_start, piece_length in pieces or [(0, 0)]:
            if used + 1 + piece_length > seq_len or segments == max_segments:
                row_start.append(len(record))
                used = segments = 0
            record.append(i)
            start.append(piece_start)
            length.append(piece_length)
            used += 1 + piece_length
            segments += 1
    if record:
        row_start.append(len(record))
    as_array = lambda x: np.asarray(x, np.int64)
    plan = PackingPlan(as_array(record), as_array(start), as_array(length), as_array(row_start))
    return plan, truncated


class PackedRows:
    """Random access to the packed rows of a tokenized split (for grain.MapDataset.source)."""

    def __init__(self, tokenized: Tokenized, plan: PackingPlan, seq_len: int, special_ids: dict, max_segments: int):
        self.tokenized = tokenized
        self.plan = plan
        self.seq_len = seq_len
        self.cls, self.pad = special_ids["cls"], special_ids["pad"]
        self.max_segments = max_segments  # 0: no labels (masked LM)

    def __len__(self) -> int:
        return self.plan.num_rows

    def __getitem__(self, r: int) -> dict:
        plan, t = self.plan, self.seq_len
        tokens = np.full(t, self.pad, np.int32)
        segment_ids = np.zeros(t, np.int32)
        positions = np.zeros(t, np.int32)
        at = 0
        pieces = range(plan.row_start[r], plan.row_start[r + 1])
        for k, j in enumerate(pieces):
            n = plan.length[j]
            ids = self.tokenized.record(plan.record[j])[plan.start[j] : plan.start[j] + n]
            tokens[at] = self.cls
            tokens[at + 1 : at + 1 + n] = ids
            segment_ids[at : at + 1 + n] = k + 1
            positions[at : at + 1 + n] = np.arange(n + 1)
            at += 1 + n
        row = {"tokens": tokens, "segment_ids": segment_ids, "positions": positions}
        if self.max_segments:
            labels = np.zeros(self.max_segments, np.int32)
            weights = np.zeros(self.max_segments, np.float32)
            for k, j in enumerate(pieces):
                labels[k] = self.tokenized.labels[plan.record[j]]
                weights[k] = 1.0
            row.update(labels=labels, label_weights=weights)
        return row


def packed_dataset(
    tokenized: Tokenized,
    seq_len: int,
    special_ids: dict,
    *,
    classify: bool,
    max_segments: int,
    shuffle_seed: int | None,
) -> grain.MapDataset:
    """Rows of packed records: masked-LM rows (classify=False) or text-classification rows with labels.

    shuffle_seed: the records are shuffled once by it before packing (training), so that a row mixes records from
    all over the split; None keeps the split's order (evaluation).
    """
    order = np.arange(len(tokenized))
    if shuffle_seed is not None:
        order = np.random.default_rng(shuffle_seed).permutation(len(tokenized))
    limit = max_segments if classify else seq_len
    plan, truncated = plan_packing(tokenized.lengths(), order, seq_len, limit, cut_long=not classify)
    if truncated:
        metrics.say(
            f"data: {truncated} of {len(tokenized)} examples are longer than a row of {seq_len} and were "
            "truncated (raise config.data.seq_len to keep them whole)"
        )
    rows = PackedRows(tokenized, plan, seq_len, special_ids, max_segments if classify else 0)
    return grain.MapDataset.source(rows)
