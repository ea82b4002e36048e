"""What fusion training reads: `FusionDataset` (one item per pivot sequence, from aligned
stores of the same pivot) and `FusionCollator` (those items padded into tensors)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fusion.artifacts.aligned_store import AlignedSequence, AlignedStore
from fusion.artifacts.records import StoreError
from fusion.data.batching import pad_sequences
from fusion.errors import InputError

TEACHER_KEYS = ("teacher_ids", "teacher_logprobs", "teacher_valid", "teacher_ce", "teacher_gold")


class FusionDataset(torch.utils.data.Dataset):
    """One item per pivot sequence: its tokens and every teacher's distributions.

    All aligned stores must come from the same pivot store (same ids, same tokens).
    """

    def __init__(self, aligned: Sequence[str | os.PathLike[str]]) -> None:
        if not aligned:
            raise InputError("fusion training needs at least one aligned store (--aligned)", key="aligned")
        self.stores = [AlignedStore(p) for p in aligned]
        first = self.stores[0]
        for store in self.stores[1:]:
            if store.options.tokenizer_fingerprint != first.options.tokenizer_fingerprint:
                raise StoreError(f"{store.path} and {first.path} were aligned to different pivots")
            if store.ids() != first.ids():
                raise StoreError(f"{store.path} and {first.path} hold different sequences")
        self.top_k = first.options.top_k

    @property
    def pivot_fingerprint(self) -> str:
        return self.stores[0].options.tokenizer_fingerprint

    def __len__(self) -> int:
        return len(self.stores[0])

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return self._item([store.aligned(index) for store in self.stores])

    def __getitems__(self, indices: list[int]) -> list[dict[str, np.ndarray]]:
        """A batch's items in one read per store (torch's DataLoader asks for a batch this
        way); the same items as ``[self[i] for i in indices]``."""
        per_store = [store.aligned_many(indices) for store in self.stores]
        return [self._item([rows[j] for rows in per_store]) for j in range(len(indices))]

    def _item(self, rows: list[AlignedSequence]) -> dict[str, np.ndarray]:
        pivot = rows[0].pivot
        p = len(pivot.target_logprobs)
        ids = [pivot.topk_ids] + [r.src_topk_ids for r in rows]
        lps = [pivot.topk_logprobs] + [r.src_topk_logprobs for r in rows]
        valid = [np.ones(p, dtype=bool)] + [r.src_aligned for r in rows]
        gold = [pivot.target_logprobs] + [r.src_target_logprobs for r in rows]
        return {
            "input_ids": pivot.input_ids.astype(np.int64),
            "loss_mask": pivot.loss_mask,
            "positions": pivot.positions,
            "teacher_ids": np.stack(ids).astype(np.int64),  # (S, P, K)
            "teacher_logprobs": np.stack(lps).astype(np.float32),
            "teacher_valid": np.stack(valid),
            "teacher_ce": np.array([pivot.seq_ce] + [r.src_seq_ce for r in rows], dtype=np.float32),
            "teacher_gold": np.stack(gold).astype(np.float32),
        }


@dataclass
class FusionCollator:
    """Pads a list of `FusionDataset` items into tensors.

    Example: two sequences of 5 and 3 tokens, S teachers, K entries →
    ``input_ids`` (2, 5) padded with ``pad_id``, ``attention_mask`` (2, 5), ``labels``
    (2, 5) with -100 on untrained tokens and padding, ``teacher_ids`` (2, S, 5, K) with the
    distribution of position t at index t (zeros elsewhere), ``teacher_logprobs`` likewise
    (-inf elsewhere), ``teacher_valid`` (2, S, 5), ``teacher_gold`` (2, S, 5) and
    ``teacher_ce`` (2, S).
    """

    pad_id: int = 0

    def __call__(self, items: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
        b = len(items)
        t = max(len(it["input_ids"]) for it in items)
        s, _, k = items[0]["teacher_ids"].shape
        input_ids, attention = pad_sequences([it["input_ids"] for it in items], self.pad_id)
        labels = [np.where(np.asarray(it["loss_mask"], dtype=bool), it["input_ids"], -100) for it in items]
        out = {
            "input_ids": input_ids,
            "attention_mask": attention,
            "labels": pad_sequences(labels, -100)[0],
            "teacher_ids": torch.zeros(b, s, t, k, dtype=torch.long),
            "teacher_logprobs": torch.full((b, s, t, k), -float("inf")),
            "teacher_valid": torch.zeros(b, s, t, dtype=torch.bool),
            "teacher_gold": torch.full((b, s, t), float("nan")),
            "teacher_ce": torch.zeros(b, s),
        }
        for i, it in enumerate(items):
            pos = torch.from_numpy(it["positions"])
            out["teacher_ids"][i][:, pos] = torch.from_numpy(it["teacher_ids"])
            out["teacher_logprobs"][i][:, pos] = torch.from_numpy(it["teacher_logprobs"])
            out["teacher_valid"][i][:, pos] = torch.from_numpy(it["teacher_valid"])
            out["teacher_gold"][i][:, pos] = torch.from_numpy(it["teacher_gold"])
            out["teacher_ce"][i] = torch.from_numpy(it["teacher_ce"])
        return out
