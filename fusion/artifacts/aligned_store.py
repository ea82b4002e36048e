"""The aligned store: a pivot logit store plus a source's distribution per pivot position.

Written by `fusion.align.job`, read by `fusion.train.data`. The pivot's own columns are those
of the logit store (`fusion.artifacts.logit_store`, docs/logit-store.md); these six are
added, per pivot trained position unless noted:

* ``src_topk_ids`` / ``src_topk_logprobs`` (P×K): the source distribution in pivot ids,
  renormalised over its kept entries, padded with id 0 and -inf;
* ``src_aligned`` (P, bool): whether a source distribution exists there (else the fusion
  stage falls back to the pivot's own);
* ``src_target_logprobs`` (P): the aligned source log-probability of the pivot's next
  token (-inf when outside the kept entries, NaN where not aligned), for token-level MinCE;
* ``src_seq_ce`` (per sequence): the source's own sequence cross-entropy (the MinCE metric);
* ``src_rule`` (P, uint8): how the position got its distribution (`fusion.align.projection.RULES`:
  0 fallback, 1 boundary, 2 projected); a store written before it existed reads as
  ``src_aligned`` (boundary where aligned).

Each shard keeps its alignment statistics (`fusion.align.stats.AlignStats`) in its Arrow
schema metadata, so a resumed run does not align finished shards again. The manifest's
``alignment`` holds the source store, method, projection, vocabulary map and the summed
statistics (shares of positions by rule, overall and per category, entries kept,
surviving entries and residual mass of the projection).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from fusion.artifacts.logit_store import (
    START_OVER,
    LogitStore,
    SequenceLogits,
    id_dtypes,
    write_shard,
)
from fusion.artifacts.records import StoreError


@dataclass
class AlignedSequence:
    """A pivot sequence with its aligned source distribution (numpy arrays)."""

    pivot: SequenceLogits
    src_topk_ids: np.ndarray  # (P, K) pivot ids
    src_topk_logprobs: np.ndarray  # (P, K), -inf padded
    src_aligned: np.ndarray  # (P,) bool
    src_target_logprobs: np.ndarray  # (P,)
    src_seq_ce: float
    src_rule: np.ndarray  # (P,) uint8


STATISTICS_KEY = "fusechat_align_statistics"


def write_aligned_shard(
    path: Path, pivot: Sequence[SequenceLogits], columns: Sequence[Mapping[str, Any]], id_type: str,
    statistics: str,
) -> int:
    """One shard of an aligned store: the pivot's records plus the aligned columns
    (``columns[i]`` holds the six ``src_*`` values of ``pivot[i]``) and the shard's
    statistics (JSON); returns the bytes."""
    np_ids, ids = id_dtypes(id_type)
    extra = {
        "src_topk_ids": (pa.list_(ids), [np.asarray(c["src_topk_ids"]).astype(np_ids) for c in columns]),
        "src_topk_logprobs": (pa.list_(pa.float16()), [c["src_topk_logprobs"] for c in columns]),
        "src_aligned": (pa.list_(pa.bool_()), [c["src_aligned"] for c in columns]),
        "src_target_logprobs": (pa.list_(pa.float32()), [c["src_target_logprobs"] for c in columns]),
        "src_seq_ce": (pa.float32(), [c["src_seq_ce"] for c in columns]),
        "src_rule": (pa.list_(pa.uint8()), [np.asarray(c["src_rule"], dtype=np.uint8) for c in columns]),
    }
    return write_shard(path, pivot, id_type, extra, {STATISTICS_KEY: statistics})


def shard_statistics(path: Path) -> str:
    """The statistics a finished shard was written with (JSON), read from its schema alone."""
    try:
        with pa.memory_map(str(path)) as source:
            metadata = pa.ipc.open_stream(source).schema.metadata or {}
    except (pa.ArrowInvalid, OSError) as err:
        raise StoreError(f"{path}: truncated or corrupt shard ({err})", START_OVER) from None
    found = metadata.get(STATISTICS_KEY.encode())
    if found is None:
        raise StoreError(f"{path} holds no alignment statistics (written by an older version)", START_OVER)
    return found.decode()


class AlignedStore(LogitStore):
    """Reads an aligned store (a logit store whose manifest has ``alignment``)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__(path)
        if self.manifest.alignment is None:
            raise StoreError(f"{self.path} is a logit store, not an aligned store; run `fusechat-merge align`")

    def aligned(self, index: int) -> AlignedSequence:
        return self._aligned_record(self.dataset[index])

    def aligned_many(self, indices: Sequence[int]) -> list[AlignedSequence]:
        """``[self.aligned(i) for i in indices]`` in one read: a batch costs about one row's
        lookup (a row at a time is ~10x slower per row, a third of a small model's step)."""
        if not indices:
            return []
        columns = self.dataset[list(indices)]
        return [self._aligned_record({name: values[i] for name, values in columns.items()})
                for i in range(len(indices))]

    def _aligned_record(self, row: Mapping[str, Any]) -> AlignedSequence:
        k = self.options.top_k
        return AlignedSequence(
            pivot=self._record(row),
            src_topk_ids=np.asarray(row["src_topk_ids"]).reshape(-1, k),
            src_topk_logprobs=np.asarray(row["src_topk_logprobs"], dtype=np.float16).reshape(-1, k),
            src_aligned=np.asarray(row["src_aligned"], dtype=bool),
            src_target_logprobs=np.asarray(row["src_target_logprobs"], dtype=np.float32),
            src_seq_ce=float(row["src_seq_ce"]),
            src_rule=rules_of(row),
        )


def rules_of(row: Mapping[str, Any]) -> np.ndarray:
    """A row's ``src_rule``, or for a store written before that column, ``src_aligned`` as
    rules (1 = boundary where aligned, 0 = fallback)."""
    return np.asarray(row["src_rule"] if "src_rule" in row else row["src_aligned"], dtype=np.uint8)
