"""Forming batches of variable-length token sequences and padding them into one tensor
(the one place either is done)."""

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


def length_sorted_batches(lengths: Sequence[int], batch_size: int, max_tokens: int = 0) -> list[list[int]]:
    """Indices grouped into batches of similar length, longest first, deterministic.

    A batch holds at most ``batch_size`` sequences and, when ``max_tokens`` > 0, at most
    ``max_tokens`` padded tokens (its sequences × its longest one), so short sequences go
    many to a batch and long ones few; a sequence longer than ``max_tokens`` goes alone.
    Longest first: a batch too large for the device fails at once, not hours in.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    for i in order:
        last = batches[-1] if batches else []
        room = 0 < len(last) < batch_size
        if room and max_tokens > 0:
            room = (len(last) + 1) * lengths[last[0]] <= max_tokens
        if room:
            last.append(i)
        else:
            batches.append([i])
    return batches


def padded_tokens(lengths: Sequence[int], batch: Sequence[int]) -> int:
    """Tokens a right-padded batch occupies: its sequences × its longest one."""
    return len(batch) * max((lengths[i] for i in batch), default=0)
