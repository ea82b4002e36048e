"""The transfer measure against a float64 reference written from its definition."""

from __future__ import annotations

import math

import pytest
import torch

from fusion.evaluate.transfer import TransferSums, transfer_per_position, transfer_sums

NEG = -float("inf")


def reference(logits: list[float], ids: list[int], logprobs: list[float], temperature: float = 1.0):
    """KL(q ‖ p) and q's mass inside the model's top-K, in float64, one position."""
    vocab = len(logits)
    top = max(logits)
    z = sum(math.exp(x - top) for x in logits)
    logp = [x - top - math.log(z) for x in logits]
    weights: dict[int, float] = {}
    finite = [lp / temperature for lp in logprobs if lp != NEG]
    peak = max(finite)
    for i, lp in zip(ids, logprobs, strict=True):
        if lp == NEG or i >= vocab:
            continue
        weights[i] = weights.get(i, 0.0) + math.exp(lp / temperature - peak)
    total = sum(weights.values())
    q = {i: w / total for i, w in weights.items()}
    kl = sum(v * (math.log(v) - logp[i]) for i, v in q.items() if v > 0)
    k = min(len(ids), vocab)
    model_top = sorted(range(vocab), key=lambda i: -logits[i])[:k]
    cover = sum(v for i, v in q.items() if i in model_top)
    return kl, cover


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_per_position_matches_the_float64_reference(temperature):
    gen = torch.Generator().manual_seed(0)
    n, v, k = 40, 23, 5
    logits = torch.randn(n, v, generator=gen) * 3
    ids = torch.randint(0, v + 3, (n, k), generator=gen)  # some ids beyond the vocabulary
    ids[::7, 1] = ids[::7, 0]  # repeated ids: their mass is summed
    lps = torch.log_softmax(torch.randn(n, k, generator=gen), -1)
    lps[::5, -1] = NEG  # padded entries
    ids[3] = torch.tensor([v, v + 1, v + 2, v, v + 1])  # nothing in the vocabulary left
    kl, cover = transfer_per_position(logits, ids, lps, temperature=temperature)
    for i in range(n):
        if i == 3:
            assert math.isnan(kl[i]) and math.isnan(cover[i])
            continue
        want_kl, want_cover = reference(logits[i].double().tolist(), ids[i].tolist(), lps[i].double().tolist(),
                                        temperature)
        assert kl[i].item() == pytest.approx(want_kl, rel=1e-5, abs=1e-5)
        assert cover[i].item() == pytest.approx(want_cover, rel=1e-5, abs=1e-6)


def test_a_model_that_is_the_source_has_kl_zero_and_full_cover():
    ids = torch.tensor([[4, 1, 7]])
    q = torch.tensor([[0.5, 0.3, 0.2]])
    logits = torch.full((1, 9), -1e4)  # all mass on the source's ids, in its proportions
    logits[0, ids[0]] = q.log()[0]
    kl, cover = transfer_per_position(logits, ids, q.log())
    assert kl.item() == pytest.approx(0.0, abs=1e-6)
    assert cover.item() == pytest.approx(1.0)
    logits[0, 0] = 5.0  # mass elsewhere: farther, and one of the source's ids leaves the top-3
    kl2, cover2 = transfer_per_position(logits, ids, q.log())
    assert kl2.item() > 1.0
    assert cover2.item() == pytest.approx(0.8)


def test_batch_sums_only_the_valid_positions():
    gen = torch.Generator().manual_seed(1)
    b, t, v, k = 2, 4, 11, 3
    logits = torch.randn(b, t, v, generator=gen)
    ids = torch.randint(0, v, (b, t, k), generator=gen)
    lps = torch.log_softmax(torch.randn(b, t, k, generator=gen), -1)
    valid = torch.tensor([[True, False, True, True], [False, False, True, False]])
    sums = transfer_sums(logits, ids, lps, valid)
    assert sums.positions == 4
    want = [reference(logits[i, j].double().tolist(), ids[i, j].tolist(), lps[i, j].double().tolist())
            for i, j in valid.nonzero().tolist()]
    assert sums.kl == pytest.approx(sum(w[0] for w in want), rel=1e-5)
    assert sums.cover == pytest.approx(sum(w[1] for w in want), rel=1e-5)
    means = sums.add(TransferSums()).means()
    assert means["kl"] == pytest.approx(sums.kl / 4) and means["positions"] == 4
    assert transfer_sums(logits, ids, lps, torch.zeros_like(valid)).means() == {
        "kl": None, "cover": None, "positions": 0}


def test_mismatched_shapes_are_named():
    with pytest.raises(ValueError, match="shapes do not match"):
        transfer_sums(torch.zeros(2, 3, 5), torch.zeros(2, 4, 2, dtype=torch.long), torch.zeros(2, 4, 2),
                      torch.ones(2, 3, dtype=torch.bool))
