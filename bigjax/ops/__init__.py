"""Operating a run: library logs, metric writers (console, JSONL, TensorBoard), `bigjax plot`, accelerator facts,
XLA flags."""
