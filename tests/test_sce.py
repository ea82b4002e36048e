"""The SCE kernel against oracles: mergekit's built-in `sce`, a dense float64 reference."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from mergekit.merge_methods.api import merge_tensors

from fusechat_merge.sce import (
    BLOCK,
    SCEInputError,
    sce_merge,
    sce_merge_with_stats,
    scratch_bytes,
)


def reference_sce(base, targets, tau, scope, normalize):
    """FuseChat's SCE written plainly from the spec's pseudocode, in float64."""
    base = base.double()
    deltas = torch.stack([t.double() - base for t in targets])
    n = deltas.shape[0]
    selected = torch.ones(base.shape, dtype=torch.bool)
    if tau < 1:
        var = deltas.var(dim=0, unbiased=False)
        k = int(tau * int(torch.count_nonzero(var)))
        selected = torch.zeros(base.shape, dtype=torch.bool)
        if k > 0:
            kth = var.flatten().sort(descending=True).values[k - 1]
            selected = var >= kth
    masked = deltas * selected
    weights = torch.stack([(masked[j] ** 2).sum() for j in range(n)])
    eta = weights / weights.sum() if weights.sum() > 0 else torch.full((n,), 1.0 / n, dtype=torch.float64)
    used = masked if scope == "deltas" else deltas
    majority = torch.where(used.sum(0) >= 0, 1.0, -1.0)
    keep = torch.sign(used) == majority
    num = sum(eta[j] * keep[j] * used[j] for j in range(n))
    if not normalize:
        return base + num
    den = sum(eta[j] * keep[j] for j in range(n))
    return base + num / torch.where(den == 0, torch.ones_like(den), den)


def random_case(shape, n, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    targets = [base + scale * torch.randn(shape, generator=g) for _ in range(n)]
    return base, targets


@pytest.mark.parametrize("tau", [0.05, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("shape,n", [((64, 48), 3), ((1000,), 2), ((7, 5, 9), 5), ((300, 700), 4)])
def test_deltas_scope_matches_mergekit_builtin_sce(tau, shape, n):
    base, targets = random_case(shape, n, seed=n)
    expected = merge_tensors([base, *targets], "sce", parameters={"select_topk": tau}, base_index=0)
    ours = sce_merge(base, targets, select_topk=tau, select_scope="deltas", normalize=True)
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("tau", [0.1, 0.3, 1.0])
@pytest.mark.parametrize("scope", ["weights", "deltas"])
@pytest.mark.parametrize("normalize", [True, False])
def test_matches_float64_reference(tau, scope, normalize):
    base, targets = random_case((120, 80), 3, seed=7, scale=0.05)
    ours = sce_merge(base, targets, select_topk=tau, select_scope=scope, normalize=normalize)
    expected = reference_sce(base, targets, tau, scope, normalize)
    torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=1e-6)


def test_weights_scope_differs_from_deltas_scope_below_tau_one():
    base, targets = random_case((50, 50), 3, seed=1)
    w = sce_merge(base, targets, select_topk=0.1, select_scope="weights")
    d = sce_merge(base, targets, select_topk=0.1, select_scope="deltas")
    # deltas scope keeps the base on the ~90% unselected elements, weights scope changes them
    assert (d == base).float().mean() > 0.85
    assert (w == base).float().mean() < 0.05


@pytest.mark.parametrize("normalize", [True, False])
def test_tau_one_makes_scopes_agree(normalize):
    base, targets = random_case((40, 30), 4, seed=3)
    w = sce_merge(base, targets, select_topk=1.0, select_scope="weights", normalize=normalize)
    d = sce_merge(base, targets, select_topk=1.0, select_scope="deltas", normalize=normalize)
    assert torch.equal(w, d)
    if normalize:
        expected = merge_tensors([base, *targets], "sce", parameters={"select_topk": 1.0}, base_index=0)
        torch.testing.assert_close(w, expected, rtol=1e-6, atol=1e-6)


def test_chunked_path_is_bit_identical():
    base, targets = random_case((5 * BLOCK + 123,), 3, seed=11)
    for tau, scope in itertools.product([0.1, 1.0], ["weights", "deltas"]):
        whole = sce_merge(base, targets, select_topk=tau, select_scope=scope, chunk_elements=1 << 30)
        chunked = sce_merge(base, targets, select_topk=tau, select_scope=scope, chunk_elements=BLOCK)
        no_cache = sce_merge(
            base, targets, select_topk=tau, select_scope=scope, chunk_elements=BLOCK, max_scratch_bytes=1
        )
        assert torch.equal(whole, chunked)
        assert torch.equal(whole, no_cache)


def test_scratch_stays_within_budget_and_five_times_the_input():
    numel, n = 152_064 * 8192, 5
    # default chunk, variance cached: bounded by 5x one bf16 input of this size
    assert scratch_bytes(numel, n, 1 << 20, cache_variance=True) <= 5 * 2 * numel
    # the chunk shrinks until a fixed budget holds, without the cache
    assert scratch_bytes(numel, n, BLOCK, cache_variance=False) <= 8 << 20


def test_one_target():
    base, (t,) = random_case((30, 20), 1, seed=2)
    # no selection: the single delta is applied as is
    torch.testing.assert_close(sce_merge(base, [t]), t)
    # selection: the variance is zero everywhere, so nothing is selected
    torch.testing.assert_close(sce_merge(base, [t], select_topk=0.5, select_scope="weights"), t)
    assert torch.equal(sce_merge(base, [t], select_topk=0.5, select_scope="deltas"), base)


def test_identical_targets():
    base, (t,) = random_case((30, 20), 1, seed=4)
    merged, stats = sce_merge_with_stats(base, [t, t.clone(), t.clone()], select_topk=0.2)
    torch.testing.assert_close(merged, t)
    assert stats.coefficients == pytest.approx((1 / 3,) * 3)
    assert stats.selected == 0


def test_all_zero_deltas_give_base_and_uniform_coefficients():
    base = torch.randn(10, 10)
    merged, stats = sce_merge_with_stats(base, [base.clone(), base.clone()], select_topk=0.5)
    assert torch.equal(merged, base)
    assert stats.coefficients == (0.5, 0.5)


def test_sign_ties_count_as_positive_and_zero_deltas_do_not_vote():
    base = torch.zeros(3)
    t1 = torch.tensor([1.0, 2.0, 0.0])
    t2 = torch.tensor([-1.0, 0.0, 0.0])
    merged, stats = sce_merge_with_stats(base, [t1, t2])
    # element 0: sum 0 → majority +, only t1 survives; element 1: t2's zero is erased
    # element 2: no survivor keeps the base
    assert merged.tolist() == [1.0, 2.0, 0.0]
    assert stats.erased == 1 and stats.nonzero == 3


def test_ties_at_the_variance_threshold_are_all_selected():
    base = torch.zeros(6)
    t1 = torch.tensor([1.0, 1.0, 1.0, 0.1, 0.1, 0.0])
    t2 = -t1
    _, stats = sce_merge_with_stats(base, [t1, t2], select_topk=0.2)  # k = int(0.2*5) = 1
    assert stats.selected == 3  # the three tied maxima


@pytest.mark.parametrize("shape", [(), (1,), (17,)])
def test_zero_and_one_dimensional_tensors(shape):
    base, targets = random_case(shape, 3, seed=5)
    for tau in (0.5, 1.0):
        out = sce_merge(base, targets, select_topk=tau, select_scope="deltas")
        assert out.shape == base.shape
        expected = reference_sce(base, targets, tau, "deltas", True)
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_computed_in_float32(dtype):
    base, targets = random_case((64, 64), 3, seed=6, scale=0.01)
    base, targets = base.to(dtype), [t.to(dtype) for t in targets]
    out = sce_merge(base, targets, select_topk=0.1)
    assert out.dtype == dtype
    expected = reference_sce(base.float(), [t.float() for t in targets], 0.1, "weights", True)
    torch.testing.assert_close(out.double(), expected.to(dtype).double(), rtol=0, atol=0)


@pytest.mark.parametrize("tau", [0.0, -0.1, 1.5, float("nan"), True, "0.5"])
def test_bad_select_topk(tau):
    base, targets = random_case((4,), 2, seed=0)
    with pytest.raises(ValueError, match="select_topk"):
        sce_merge(base, targets, select_topk=tau)


def test_bad_scope_and_normalize():
    base, targets = random_case((4,), 2, seed=0)
    with pytest.raises(ValueError, match="select_scope"):
        sce_merge(base, targets, select_scope="mask")
    with pytest.raises(ValueError, match="normalize"):
        sce_merge(base, targets, normalize="yes")


def test_nan_names_the_input_and_index():
    base, targets = random_case((10, 10), 3, seed=0)
    targets[2][3, 4] = float("nan")
    with pytest.raises(SCEInputError, match=r"target 2 .* flat index 34") as info:
        sce_merge(base, targets)
    assert info.value.index == 2
    base[0, 0] = float("inf")
    with pytest.raises(SCEInputError, match="the base"):
        sce_merge(base, targets[:2])


def test_mismatched_shapes_are_rejected():
    with pytest.raises(SCEInputError, match=r"target 1 has shape \(3,\)"):
        sce_merge(torch.zeros(4), [torch.zeros(4), torch.zeros(3)])


finite = st.floats(-4, 4, allow_nan=False, width=32)


@st.composite
def cases(draw):
    shape = draw(st.sampled_from([(), (3,), (4, 5), (2, 3, 4)]))
    n = draw(st.integers(1, 4))
    numel = max(1, int(torch.Size(shape).numel()))
    base = torch.tensor(draw(st.lists(finite, min_size=numel, max_size=numel))).reshape(shape)
    targets = [
        torch.tensor(draw(st.lists(finite, min_size=numel, max_size=numel))).reshape(shape)
        for _ in range(n)
    ]
    tau = draw(st.sampled_from([0.1, 0.5, 1.0]))
    scope = draw(st.sampled_from(["weights", "deltas"]))
    normalize = draw(st.booleans())
    return base, targets, {"select_topk": tau, "select_scope": scope, "normalize": normalize}


@settings(max_examples=80, deadline=None)
@given(cases())
def test_targets_equal_to_base_give_base(case):
    base, targets, params = case
    out = sce_merge(base, [base.clone() for _ in targets], **params)
    assert torch.equal(out, base)


@settings(max_examples=80, deadline=None)
@given(cases(), st.randoms(use_true_random=False))
def test_permuting_targets_does_not_change_the_result(case, rnd):
    base, targets, params = case
    shuffled = targets[:]
    rnd.shuffle(shuffled)
    torch.testing.assert_close(
        sce_merge(base, shuffled, **params), sce_merge(base, targets, **params), rtol=1e-6, atol=1e-6
    )


@settings(max_examples=40, deadline=None)
@given(cases(), st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_result_dtype_and_shape_follow_the_base(case, dtype):
    base, targets, params = case
    out = sce_merge(base.to(dtype), [t.to(dtype) for t in targets], **params)
    assert out.dtype == dtype and out.shape == base.shape


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    base, targets = random_case((1000, 300), 3, seed=9)
    for tau, scope in itertools.product([0.1, 1.0], ["weights", "deltas"]):
        cpu = sce_merge(base, targets, select_topk=tau, select_scope=scope)
        gpu = sce_merge(base.cuda(), [t.cuda() for t in targets], select_topk=tau, select_scope=scope)
        assert gpu.device.type == "cuda"
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-6, atol=1e-6)
