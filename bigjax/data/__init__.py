"""Data: sources (bundled corpus, synthetic), tokenizers, packing, per-host batches."""

from bigjax.data.pipeline import EvalData, HostBatches, eval_data, train_batches
from bigjax.data.tokenizers import make_tokenizer

__all__ = ["EvalData", "HostBatches", "eval_data", "train_batches", "make_tokenizer"]
