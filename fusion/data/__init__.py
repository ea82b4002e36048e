"""Conversations in: parsed, rendered with each model's chat template, batched.

Every stage that reads the corpus or a skill file reads it here, keyed by content:
``conversations`` (load, parse, render, loss mask), ``chat_templates`` (does a saved
tokenizer carry one), ``batching`` (length-sorted batches, padding), ``content_cache``
(``datasets``' cache keyed by the bytes).
"""
