"""Fusion training: the pivot fine-tuned with ``λ·CLM + (1−λ)·fusion loss`` under the HF Trainer.

Losses (MinCE and its variants) are pure torch; the rest adapts them to ``Trainer``:
configuration, the dataset over aligned stores, checkpoints, progress and the published target.
"""
