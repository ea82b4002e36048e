"""Evaluation: held-out reply loss, lm-evaluation-harness tasks and the transfer measure."""
