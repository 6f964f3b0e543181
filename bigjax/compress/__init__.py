"""Compression over the library: post-training quantization, QAT through Qwix, LoRA/QLoRA adapters, pruning,
distillation."""
