"""Moved to ``fusion.train.trainer``; this re-export stays for one release."""

from fusion.train.trainer import FusionTrainer, check_pivot, train_fusion  # noqa: F401
