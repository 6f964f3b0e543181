"""Evaluation people compare models by: EleutherAI's lm-evaluation-harness on a run (harness), its model (model)."""
