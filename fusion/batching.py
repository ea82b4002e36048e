"""Padding variable-length token sequences into one batch tensor (the one place it's done)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def pad_sequences(sequences: Sequence[Sequence[int]], pad_value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, attention_mask)``, both (B, T_max) int64, padded on the right: for scoring
    and training, where a causal model's real positions never see the padding."""
    width = max((len(s) for s in sequences), default=0)
    values = torch.full((len(sequences), width), pad_value, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        values[row, : len(seq)] = torch.from_numpy(np.asarray(seq, dtype=np.int64))
        mask[row, : len(seq)] = 1
    return values, mask


def pad_token_id(tokenizer) -> int:
    """The pad id, else eos (many chat tokenizers have no pad token), else 0."""
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0
