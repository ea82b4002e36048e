"""Fusion functions and the fusion loss, as pure torch over sparse top-K tensors.

Shapes (B batch, S teachers = the pivot then the N sources, T positions, K entries):

* ``ids`` (B, S, T, K) and ``logprobs`` (B, S, T, K): each teacher's top-K at position t
  (predicting token t + 1), -inf padded; ``valid`` (B, S, T): a source has a distribution
  there (the pivot always has one at trained positions);
* ``seq_ce`` (B, S): each teacher's sequence cross-entropy; ``gold`` (B, S, T): each
  teacher's log-probability of the actual next token (token-level MinCE).

Where a source has no distribution, it takes the pivot's (``fill_from_pivot``), so every
fusion function sees S complete teachers. The fused target is (ids, probs) of shape
(B, T, M), zero-probability padded; the loss gathers the student's log-probabilities at
those ids only, so no dense (B, T, V) target is ever built (the reference builds one in
bf16, and breaks when ``config.vocab_size`` differs from the tokenizer's length).
"""

from __future__ import annotations

import torch

from fusion.options import FUSIONS, LOSS_TYPES


def tempered_probs(logprobs: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(logprobs / T) over each list's kept (finite) entries; all -inf → all 0."""
    scaled = logprobs.float() / temperature
    finite = torch.isfinite(scaled)
    peak = torch.where(finite, scaled, torch.full_like(scaled, -1e30)).amax(-1, keepdim=True)
    weights = torch.where(finite, torch.exp(scaled - peak), torch.zeros_like(scaled))
    total = weights.sum(-1, keepdim=True)
    return weights / torch.where(total > 0, total, torch.ones_like(total))


def fill_from_pivot(
    ids: torch.Tensor, probs: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sources without a distribution at a position take the pivot's (teacher 0)."""
    keep = valid[..., None]
    return (
        torch.where(keep, ids, ids[:, :1].expand_as(ids)),
        torch.where(keep, probs, probs[:, :1].expand_as(probs)),
    )


def mince_choice(seq_ce: torch.Tensor) -> torch.Tensor:
    """(B,) index of the teacher with the lowest sequence CE; NaN loses; ties → pivot."""
    ce = torch.nan_to_num(seq_ce.float(), nan=float("inf"))
    return ce.argmin(dim=1)  # argmin returns the first minimum: the pivot on ties


def token_mince_choice(gold: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B, T) teacher with the highest log-probability of the gold token per position."""
    score = torch.where(valid, torch.nan_to_num(gold.float(), nan=-float("inf")), -float("inf"))
    score[:, 0] = torch.nan_to_num(gold[:, 0].float(), nan=-float("inf"))
    best = score.max(dim=1, keepdim=True).values
    # first teacher reaching the best score (the pivot on ties)
    return (score == best).float().argmax(dim=1)


def fuse(
    ids: torch.Tensor,
    logprobs: torch.Tensor,
    valid: torch.Tensor,
    seq_ce: torch.Tensor,
    gold: torch.Tensor,
    *,
    method: str = "mince",
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused target distribution (ids, probs), each (B, T, M)."""
    if method not in FUSIONS:
        raise ValueError(f"unknown fusion {method!r}; use one of {', '.join(FUSIONS)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    valid = valid.clone()
    valid[:, 0] = True
    probs = tempered_probs(logprobs, temperature)
    ids, probs = fill_from_pivot(ids, probs, valid)
    b, s, t, k = ids.shape
    if method == "mince":
        pick = mince_choice(seq_ce)[:, None, None, None].expand(b, 1, t, k)
        return ids.gather(1, pick).squeeze(1), probs.gather(1, pick).squeeze(1)
    if method == "token-mince":
        pick = token_mince_choice(gold, valid)[:, None, :, None].expand(b, 1, t, k)
        return ids.gather(1, pick).squeeze(1), probs.gather(1, pick).squeeze(1)
    # avgce: mixture weighted by exp(-CE), i.e. the reference's reward 1/exp(CE), normalised
    ce = torch.nan_to_num(seq_ce.float(), nan=float("inf"))
    weights = torch.softmax(-ce, dim=1)  # (B, S)
    mixed = probs * weights[:, :, None, None]
    return (
        ids.permute(0, 2, 1, 3).reshape(b, t, s * k),
        mixed.permute(0, 2, 1, 3).reshape(b, t, s * k),
    )


def merge_duplicates(ids: torch.Tensor, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum the probability of repeated ids in each (…, M) list (needed for an exact KL)."""
    sorted_ids, order = ids.sort(dim=-1)
    sorted_probs = probs.gather(-1, order)
    new_group = torch.ones_like(sorted_ids, dtype=torch.bool)
    new_group[..., 1:] = sorted_ids[..., 1:] != sorted_ids[..., :-1]
    group = new_group.long().cumsum(-1) - 1
    merged = torch.zeros_like(sorted_probs).scatter_add_(-1, group, sorted_probs)
    merged_ids = torch.zeros_like(sorted_ids).scatter_(-1, group, sorted_ids)
    return merged_ids, merged


def within_vocab(ids: torch.Tensor, probs: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A target as the student can take it: ids at or beyond ``vocab`` (a tokenizer longer
    than ``config.vocab_size``) get probability 0 and id 0, the rest are renormalised."""
    in_vocab = ids < vocab
    q = torch.where(in_vocab, probs.float(), torch.zeros_like(probs, dtype=torch.float32))
    q = q / q.sum(-1, keepdim=True).clamp_min(1e-12)
    return torch.where(in_vocab, ids, torch.zeros_like(ids)), q


class _SparseTargetCE(torch.autograd.Function):
    """CLM and soft cross-entropy to sparse targets, one sequence's logits at a time.

    Forward keeps only the per-position log-sum-exp (computed on each contiguous (T, V)
    slice, no row copies); backward writes ``softmax · scale`` (scale 0 on untrained
    positions) minus the sparse target weights straight into one gradient tensor. So
    beyond the logits the loss needs one logits-sized gradient, where ``log_softmax`` +
    NLL (the plain CLM loss) also keeps a logits-sized log-probability tensor.
    """

    @staticmethod
    def forward(ctx, logits, rows_b, rows_t, gold, ids, q):  # type: ignore[override]
        lse_bt = torch.stack([torch.logsumexp(seq.float(), dim=-1) for seq in logits])  # (B, T)
        lse = lse_bt[rows_b, rows_t]
        z_gold = logits[rows_b, rows_t, gold].float()
        z_ids = logits[rows_b[:, None], rows_t[:, None], ids].float()
        clm = -(z_gold - lse).mean()
        fuse_ce = -(q * (z_ids - lse[:, None])).sum(-1).mean()
        ctx.save_for_backward(logits, rows_b, rows_t, gold, ids, q)
        ctx.mark_non_differentiable(lse_bt)
        return clm, fuse_ce, lse_bt  # lse_bt for `gradient_parts`, so it is not computed twice

    @staticmethod
    def backward(ctx, g_clm, g_fuse, _g_lse):  # type: ignore[override]
        logits, rows_b, rows_t, gold, ids, q = ctx.saved_tensors
        n = rows_b.numel()
        a = g_clm.float() / n  # weight of each row's CLM term
        c = g_fuse.float() / n  # weight of each row's fusion term
        scale = torch.zeros(logits.shape[:2], dtype=torch.float32, device=logits.device)
        scale[rows_b, rows_t] = a + c * q.sum(-1)
        grad = torch.empty_like(logits)
        for b in range(logits.shape[0]):
            probs = torch.softmax(logits[b].float(), dim=-1)
            grad[b] = probs.mul_(scale[b, :, None]).to(grad.dtype)
        grad.index_put_((rows_b, rows_t, gold), (-a).expand(n).to(grad.dtype), accumulate=True)
        expand = ids.shape
        grad.index_put_(
            (rows_b[:, None].expand(expand), rows_t[:, None].expand(expand), ids),
            (-c * q).to(grad.dtype),
            accumulate=True,
        )
        return grad, None, None, None, None, None


@torch.no_grad()
def gradient_parts(
    logits: torch.Tensor,
    lse: torch.Tensor,
    rows_b: torch.Tensor,
    rows_t: torch.Tensor,
    gold: torch.Tensor,
    ids: torch.Tensor,
    q: torch.Tensor,
    lm_weight: float,
) -> dict[str, torch.Tensor]:
    """How the two terms push the student, measured at its logits (no extra backward).

    Per trained row the CLM term's gradient is ``λ/n (p − e_gold)`` and the fusion term's
    ``(1−λ)/n (Σq·p − Q)`` (``Q`` the target scattered on the vocabulary), so their norms
    and inner product follow from ``Σp²``, ``p`` at the gold and target ids, and ``q``:
    ``fuse_grad_share`` = ‖G_fuse‖ / (‖G_clm‖ + ‖G_fuse‖) and ``grad_cosine`` = cos(G_clm,
    G_fuse). A cosine near 1 says the fusion term pushes where the CLM term already does.
    ``lse`` (B, T) is the log-sum-exp of the logits at every position.
    """
    # Σp² per position, one sequence at a time with one temporary: exp(2(z − lse)) summed
    # (the subtraction makes the copy: `.float()` of float32 logits is the logits themselves)
    p_sq = torch.stack([(seq.float() - lse[i, :, None]).mul_(2).exp_().sum(-1) for i, seq in enumerate(logits)])
    p_sq = p_sq[rows_b, rows_t]
    row_lse = lse[rows_b, rows_t]
    p_gold = torch.exp(logits[rows_b, rows_t, gold].float() - row_lse)
    p_ids = torch.exp(logits[rows_b[:, None], rows_t[:, None], ids].float() - row_lse[:, None])
    mass = q.sum(-1)
    _, merged = merge_duplicates(ids, q)
    q_at_gold = (q * (ids == gold[:, None])).sum(-1)
    qp = (q * p_ids).sum(-1)
    clm_sq = (p_sq - 2 * p_gold + 1).clamp_min(0).sum()
    fuse_sq = (mass**2 * p_sq - 2 * mass * qp + (merged**2).sum(-1)).clamp_min(0).sum()
    dot = (mass * p_sq - qp - mass * p_gold + q_at_gold).sum()
    clm_norm, fuse_norm = lm_weight * clm_sq.sqrt(), (1.0 - lm_weight) * fuse_sq.sqrt()
    total = clm_norm + fuse_norm
    share = fuse_norm / total if total > 0 else torch.zeros_like(total)
    denom = (clm_sq * fuse_sq).sqrt()
    cosine = dot / denom if denom > 0 else torch.zeros_like(denom)
    return {"fuse_grad_share": share, "grad_cosine": cosine}


def fusion_objective(
    logits: torch.Tensor,
    labels: torch.Tensor,
    target_ids: torch.Tensor,
    target_probs: torch.Tensor,
    *,
    lm_weight: float = 0.9,
    loss_type: str = "ce",
    measure_gradients: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``λ·L_CLM + (1−λ)·L_fuse`` and its parts (``clm_loss``, ``fuse_loss``; with
    ``measure_gradients`` also `gradient_parts`: one more pass over the logits, one
    sequence at a time, no gradient).

    ``logits`` (B, T, V) from the student; ``labels`` (B, T) with -100 on untrained tokens
    (HF convention: logits at t predict labels at t + 1); targets (B, T, M) indexed by the
    predicting position t. Both losses average over trained positions. Target ids outside
    the student's vocabulary (a tokenizer longer than ``config.vocab_size``) are dropped
    and the rest renormalised. The student's log-probabilities are only gathered at the
    target ids (`_SparseTargetCE`): no dense target, no log-softmax copy of the logits.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss type {loss_type!r}; use one of {', '.join(LOSS_TYPES)}")
    mask = labels[:, 1:] != -100  # (B, T-1)
    b_idx, t_idx = mask.nonzero(as_tuple=True)
    vocab = logits.shape[-1]
    ids = target_ids[b_idx, t_idx]
    safe_ids, q = within_vocab(ids, target_probs[b_idx, t_idx], vocab)
    gold = labels[b_idx, t_idx + 1]
    clm, fuse_loss, lse = _SparseTargetCE.apply(logits, b_idx, t_idx, gold, safe_ids, q)
    if loss_type == "kl":
        _, m_q = merge_duplicates(ids, q)
        entropy = -(m_q * torch.log(m_q.clamp_min(1e-30))).sum(-1)
        fuse_loss = fuse_loss - entropy.mean()  # KL(q ‖ p) = CE(q, p) − H(q)
    total = lm_weight * clm + (1.0 - lm_weight) * fuse_loss
    parts = {"clm_loss": clm.detach(), "fuse_loss": fuse_loss.detach()}
    if measure_gradients and len(b_idx):
        parts |= gradient_parts(logits.detach(), lse, b_idx, t_idx, gold, safe_ids, q, lm_weight)
    return total, parts
