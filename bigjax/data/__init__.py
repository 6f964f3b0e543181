"""Data: sources (bundled, local files, TFDS, synthetic), tokenizers, tokenized caches, packing, images, and
per-host batches that resume exactly."""

from bigjax.data.errors import DataError
from bigjax.data.pipeline import EvalData, HostBatches, eval_data, state_before_any_batch, train_batches
from bigjax.data.prefetch import DeviceBatches
from bigjax.data.tokenizers import make_tokenizer

__all__ = [
    "DataError",
    "DeviceBatches",
    "EvalData",
    "HostBatches",
    "eval_data",
    "state_before_any_batch",
    "train_batches",
    "make_tokenizer",
]
