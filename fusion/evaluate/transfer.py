"""How much of a source's distribution a model absorbed: the transfer measure (pure torch).

FuseChat's fusion term carries what a source knows beyond the gold reply: its whole
next-token distribution. Whether a trained model took it up shows in how far the model's
next-token distribution is from the source's, on held-out conversations, at the pivot
positions where the alignment gave the source a distribution. The source's distribution is
taken exactly as the fusion loss sees it: its aligned top-K, softmax(logprobs / T) over the
kept entries (`fusion.train.losses.tempered_probs`), ids outside the model's vocabulary dropped
and the rest renormalised (`fusion.train.losses.within_vocab`), repeated ids summed
(`fusion.train.losses.merge_duplicates`). Two numbers per position:

* ``kl``: KL(q ‖ p) = Σ q (log q − log p), q the source's renormalised top-K, p the model's
  full softmax; 0 when the model puts the source's relative weights on those ids *and*
  nothing elsewhere. Lower is closer.
* ``cover``: the share of q's mass on ids within the model's own top-K (K the source's
  kept entries): whether the model's likely continuations are the source's. Higher is
  closer.

Both are summed over positions here; their means per position are what evaluate reports.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fusion.train.losses import merge_duplicates, tempered_probs, within_vocab


@dataclass
class TransferSums:
    """Sums of the per-position measures and how many positions they cover (add them up
    over batches, then take `means`)."""

    kl: float = 0.0
    cover: float = 0.0
    positions: int = 0

    def add(self, other: TransferSums) -> TransferSums:
        return TransferSums(self.kl + other.kl, self.cover + other.cover, self.positions + other.positions)

    def means(self) -> dict[str, float | int | None]:
        """``{"kl", "cover"}`` per position (None without positions) and ``positions``."""
        n = self.positions
        return {"kl": self.kl / n if n else None, "cover": self.cover / n if n else None, "positions": n}


def transfer_per_position(
    logits: torch.Tensor,
    src_ids: torch.Tensor,
    src_logprobs: torch.Tensor,
    *,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(kl, cover), each (N,), of N positions: ``logits`` (N, V) the model's at each
    position, ``src_ids`` / ``src_logprobs`` (N, K) the source's aligned top-K there
    (-inf padded). A position whose entries all fall outside the vocabulary has no
    distribution left: its kl and cover are NaN (the caller must leave it out)."""
    if logits.ndim != 2 or src_ids.shape != src_logprobs.shape or src_ids.shape[0] != logits.shape[0]:
        raise ValueError(f"shapes do not match: logits {tuple(logits.shape)}, source ids "
                         f"{tuple(src_ids.shape)}, source logprobs {tuple(src_logprobs.shape)}")
    vocab = logits.shape[-1]
    probs = tempered_probs(src_logprobs, temperature)
    in_vocab = (src_ids < vocab) & (probs > 0)
    ids, q = within_vocab(src_ids, probs, vocab)
    ids, q = merge_duplicates(ids, q)
    logp = torch.log_softmax(logits.float(), dim=-1)
    model_at = logp.gather(-1, ids)
    kept = q > 0
    kl = torch.where(kept, q * (torch.log(q.clamp_min(1e-30)) - model_at), torch.zeros_like(q)).sum(-1)
    k = min(src_ids.shape[-1], vocab)
    top = logp.topk(k, dim=-1).indices  # (N, k)
    inside = (ids[..., :, None] == top[..., None, :]).any(-1)
    cover = torch.where(kept & inside, q, torch.zeros_like(q)).sum(-1)
    empty = ~in_vocab.any(-1)
    nan = torch.full_like(kl, float("nan"))
    return torch.where(empty, nan, kl), torch.where(empty, nan, cover)


def transfer_sums(
    logits: torch.Tensor,
    src_ids: torch.Tensor,
    src_logprobs: torch.Tensor,
    valid: torch.Tensor,
    *,
    temperature: float = 1.0,
) -> TransferSums:
    """The measure over a batch: ``logits`` (B, T, V) of the model, the source's aligned
    top-K ``src_ids`` / ``src_logprobs`` (B, T, K) indexed by the predicting position (as
    `fusion.train.data.FusionCollator` lays them out), ``valid`` (B, T) where the source
    has a distribution (aligned, trained positions only). Positions with no in-vocabulary
    entry are left out."""
    if valid.shape != logits.shape[:2] or src_ids.shape[:2] != valid.shape:
        raise ValueError(f"shapes do not match: logits {tuple(logits.shape)}, valid {tuple(valid.shape)}, "
                         f"source ids {tuple(src_ids.shape)}")
    b, t = valid.nonzero(as_tuple=True)
    if not len(b):
        return TransferSums()
    kl, cover = transfer_per_position(logits[b, t], src_ids[b, t], src_logprobs[b, t], temperature=temperature)
    keep = ~torch.isnan(kl)
    return TransferSums(float(kl[keep].double().sum()), float(cover[keep].double().sum()), int(keep.sum()))
