"""A tiny InternLM2-like model's own tokenizer class (test stand-in, loaded via auto_map):
SentencePiece-style pieces with byte fallback, ChatML's turn markers as special tokens."""

from transformers import PreTrainedTokenizerFast


class InternLM2TokenizerFast(PreTrainedTokenizerFast):
    """The fast tokenizer under InternLM2's own class name (a tokenizer.json does the work)."""
