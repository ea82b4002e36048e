"""Fusion functions on hand-made cases; the loss against a dense float64 reference."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fusion.train.losses import fuse, fusion_objective, merge_duplicates, tempered_probs

NEG = -float("inf")


def teachers():
    """B=2 sequences, S=3 teachers (pivot + 2 sources), T=2 positions, K=2."""
    ids = torch.tensor([[[[1, 2], [3, 4]], [[5, 6], [7, 8]], [[9, 10], [11, 12]]]] * 2)
    lps = torch.log(torch.tensor([[[[0.6, 0.4], [0.5, 0.5]]] * 3] * 2))
    valid = torch.ones(2, 3, 2, dtype=torch.bool)
    ce = torch.tensor([[1.0, 0.5, 2.0], [0.3, 0.3, 0.9]])
    gold = torch.log(torch.tensor([[[0.5, 0.2], [0.4, 0.3], [0.1, 0.9]]] * 2))
    return ids, lps, valid, ce, gold


def test_mince_picks_the_lowest_sequence_ce_and_ties_go_to_the_pivot():
    ids, lps, valid, ce, gold = teachers()
    out_ids, out_p = fuse(ids, lps, valid, ce, gold, method="mince")
    assert out_ids[0].tolist() == [[5, 6], [7, 8]]  # source 1 has CE 0.5 < 1.0
    assert out_ids[1].tolist() == [[1, 2], [3, 4]]  # tie 0.3 = 0.3 → pivot
    torch.testing.assert_close(out_p[0, 0], torch.tensor([0.6, 0.4]))


def test_mince_falls_back_to_the_pivot_where_the_winner_has_no_distribution():
    ids, lps, valid, ce, gold = teachers()
    valid[0, 1, 1] = False
    out_ids, _ = fuse(ids, lps, valid, ce, gold, method="mince")
    assert out_ids[0].tolist() == [[5, 6], [3, 4]]


def test_nan_ce_never_wins():
    ids, lps, valid, ce, gold = teachers()
    ce[0, 1] = float("nan")
    out_ids, _ = fuse(ids, lps, valid, ce, gold, method="mince")
    assert out_ids[0, 0].tolist() == [1, 2]


def test_token_mince_picks_per_position():
    ids, lps, valid, ce, gold = teachers()
    out_ids, _ = fuse(ids, lps, valid, ce, gold, method="token-mince")
    # position 0: pivot gold 0.5 beats 0.4 and 0.1; position 1: source 2 (0.9) wins
    assert out_ids[0].tolist() == [[1, 2], [11, 12]]
    valid[0, 2, 1] = False
    out_ids, _ = fuse(ids, lps, valid, ce, gold, method="token-mince")
    assert out_ids[0, 1].tolist() == [7, 8]  # next best: source 1 (0.3 > 0.2)


def test_avgce_mixes_with_exp_minus_ce_weights():
    ids, lps, valid, ce, gold = teachers()
    out_ids, out_p = fuse(ids, lps, valid, ce, gold, method="avgce")
    w = torch.softmax(-ce[0], 0)
    assert out_ids.shape == (2, 2, 6)
    assert out_ids[0, 0].tolist() == [1, 2, 5, 6, 9, 10]
    torch.testing.assert_close(out_p[0, 0], torch.cat([w[0] * torch.tensor([0.6, 0.4]),
                                                      w[1] * torch.tensor([0.6, 0.4]),
                                                      w[2] * torch.tensor([0.6, 0.4])]))
    torch.testing.assert_close(out_p.sum(-1), torch.ones(2, 2))


def test_temperature_and_padding():
    lps = torch.tensor([[math.log(0.8), math.log(0.2), NEG]])
    torch.testing.assert_close(tempered_probs(lps, 1.0), torch.tensor([[0.8, 0.2, 0.0]]))
    sharp = tempered_probs(lps, 0.5)
    torch.testing.assert_close(sharp, torch.tensor([[0.64 / 0.68, 0.04 / 0.68, 0.0]]))
    assert tempered_probs(torch.full((1, 3), NEG), 1.0).sum() == 0


def dense_reference(logits, labels, ids, probs, lm_weight, loss_type):
    """The loss written plainly with a dense float64 target."""
    logits = logits.double()
    b, t, v = logits.shape
    logp = torch.log_softmax(logits, -1)
    clm_terms, fuse_terms = [], []
    for i in range(b):
        for j in range(t - 1):
            if labels[i, j + 1] == -100:
                continue
            clm_terms.append(-logp[i, j, labels[i, j + 1]])
            q = torch.zeros(v, dtype=torch.float64)
            for tok, p in zip(ids[i, j].tolist(), probs[i, j].tolist(), strict=True):
                if tok < v:
                    q[tok] += p
            q = q / q.sum()
            term = -(q * logp[i, j]).sum()
            if loss_type == "kl":
                term = term + (q[q > 0] * q[q > 0].log()).sum()
            fuse_terms.append(term)
    clm = torch.stack(clm_terms).mean()
    fuse_loss = torch.stack(fuse_terms).mean()
    return lm_weight * clm + (1 - lm_weight) * fuse_loss


@pytest.mark.parametrize("loss_type", ["ce", "kl"])
@pytest.mark.parametrize("lm_weight", [0.0, 0.9, 1.0])
def test_loss_matches_dense_float64_reference(loss_type, lm_weight):
    g = torch.Generator().manual_seed(0)
    b, t, v, m = 3, 7, 50, 6
    logits = torch.randn(b, t, v, generator=g, requires_grad=True)
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[0, :3] = -100
    labels[2, 5:] = -100
    ids = torch.randint(0, v + 5, (b, t, m), generator=g)  # some ids beyond the student's vocab
    ids[..., 0] = ids[..., 1]  # duplicate ids
    probs = torch.rand(b, t, m, generator=g)
    probs = probs / probs.sum(-1, keepdim=True)
    ours, parts = fusion_objective(logits, labels, ids, probs, lm_weight=lm_weight, loss_type=loss_type)
    expected = dense_reference(logits.detach(), labels, ids, probs, lm_weight, loss_type)
    assert ours.item() == pytest.approx(expected.item(), rel=1e-5)
    ours.backward()
    ref_logits = logits.detach().double().requires_grad_(True)
    dense_reference(ref_logits, labels, ids, probs, lm_weight, loss_type).backward()
    torch.testing.assert_close(logits.grad.double(), ref_logits.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("lm_weight", [0.5, 0.9])
def test_gradient_parts_match_each_term_differentiated_alone(lm_weight):
    """Share and cosine of the two terms' gradients at the logits, against autograd on the
    dense float64 reference of each term alone (duplicate and out-of-vocabulary ids too)."""
    g = torch.Generator().manual_seed(1)
    b, t, v, m = 3, 7, 50, 6
    logits = torch.randn(b, t, v, generator=g)
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[1, :4] = -100
    ids = torch.randint(0, v + 5, (b, t, m), generator=g)
    ids[..., 0] = ids[..., 1]
    ids[0, 2, 3] = labels[0, 3]  # the gold among the target ids
    probs = torch.rand(b, t, m, generator=g)
    probs = probs / probs.sum(-1, keepdim=True)
    before = logits.clone()
    _, parts = fusion_objective(logits, labels, ids, probs, lm_weight=lm_weight, measure_gradients=True)
    assert torch.equal(logits, before)  # measuring leaves the student's logits alone

    def grad_of(weight: float) -> torch.Tensor:  # weight 1: CLM alone, 0: fusion alone
        x = logits.double().requires_grad_(True)
        dense_reference(x, labels, ids, probs, weight, "ce").backward()
        return x.grad.flatten()

    g_clm, g_fuse = lm_weight * grad_of(1.0), (1 - lm_weight) * grad_of(0.0)
    share = g_fuse.norm() / (g_clm.norm() + g_fuse.norm())
    cosine = torch.dot(g_clm, g_fuse) / (g_clm.norm() * g_fuse.norm())
    assert parts["fuse_grad_share"].item() == pytest.approx(share.item(), rel=1e-4)
    assert parts["grad_cosine"].item() == pytest.approx(cosine.item(), rel=1e-4, abs=1e-6)
    # a target that is the one-hot gold pushes exactly where CLM does
    gold_ids = labels.roll(-1, dims=1)[..., None].clamp_min(0)
    _, same = fusion_objective(logits, labels, gold_ids, torch.ones(b, t, 1), lm_weight=lm_weight,
                               measure_gradients=True)
    assert same["grad_cosine"].item() == pytest.approx(1.0, abs=1e-5)
    _, plain = fusion_objective(logits, labels, ids, probs, lm_weight=lm_weight)
    assert set(plain) == {"clm_loss", "fuse_loss"}  # measured only when asked


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=1, max_size=8))
def test_merge_duplicates_preserves_mass_per_id(tokens):
    ids = torch.tensor([tokens])
    probs = torch.rand(1, len(tokens))
    m_ids, m_p = merge_duplicates(ids, probs)
    for tok in set(tokens):
        expected = probs[0][ids[0] == tok].sum()
        got = m_p[0][(m_ids[0] == tok) & (m_p[0] > 0)].sum()
        assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    assert m_p.sum().item() == pytest.approx(probs.sum().item(), rel=1e-5)
