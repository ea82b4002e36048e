"""Conversations in: parsed, rendered with each model's chat template, batched.

Every stage that reads the corpus or a skill file reads it here, keyed by content.
"""
