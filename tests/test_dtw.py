"""Edit-distance DTW token alignment (spec §3.1, §11): fast path against the plain reference.

The oracles are written here from the spec: a pure-Python Levenshtein and ``dist_fn``, and a
naive accumulation over a cost matrix. Small hand-checked cases pin the tie order and the
spec's examples.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fusion.align.dtw import (
    _accumulate,
    dtw_align,
    dtw_align_plain,
    dtw_cost_matrix,
)

SP, BL = "▁", "Ġ"  # SentencePiece and byte-level space markers

# Few letters and both markers: ties, lone-marker tokens and empty strings are all common.
tokens = st.text(alphabet=["a", "b", "1", SP, BL], max_size=3)
sequences = st.lists(tokens, min_size=1, max_size=12)
marker_pairs = st.sampled_from(
    [(SP, BL), (BL, SP), (BL, BL), (SP, SP), ("", BL), (SP, ""), ("", "")]
)
nonempty_marker_pairs = st.sampled_from([(SP, BL), (BL, SP), (BL, BL), (SP, SP)])
relaxed = settings(deadline=None, max_examples=300)


def levenshtein(a: str, b: str) -> int:
    """Textbook two-row Levenshtein, independent of rapidfuzz."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def spec_dist(a: str, b: str, src_marker: str, piv_marker: str) -> int:
    """``dist_fn`` exactly as the spec writes it (non-empty markers)."""
    aa, bb = a.replace(src_marker, ""), b.replace(piv_marker, "")
    if aa == "" or bb == "":
        aa, bb = a.replace(src_marker, piv_marker), b
    return levenshtein(aa, bb)


def naive_grid(cost: np.ndarray) -> np.ndarray:
    """The (n+1, m+1) recurrence cell by cell, with a float inf border."""
    n, m = cost.shape
    grid = np.full((n + 1, m + 1), np.inf)
    grid[0, 0] = 0
    for i in range(n):
        for j in range(m):
            grid[i + 1, j + 1] = cost[i, j] + min(grid[i, j + 1], grid[i + 1, j], grid[i, j])
    return grid


def align(src, piv, src_marker=SP, piv_marker=BL):
    return dtw_align(src, piv, src_marker=src_marker, piv_marker=piv_marker)


def assert_valid_alignment(piv2src: list[list[int]], n: int, m: int) -> None:
    """Monotone, contiguous, covering, endpoint-pinned: what any DTW path gives."""
    assert len(piv2src) == m
    assert all(sources for sources in piv2src)
    for sources in piv2src:
        assert sources == list(range(sources[0], sources[-1] + 1))  # sorted, contiguous
    for here, nxt in zip(piv2src, piv2src[1:], strict=False):
        assert nxt[0] in (here[-1], here[-1] + 1)  # overlap (shared source) or adjacent
    assert sorted({i for sources in piv2src for i in sources}) == list(range(n))
    assert piv2src[0][0] == 0 and piv2src[-1][-1] == n - 1


@relaxed
@given(src=sequences, piv=sequences, markers=marker_pairs)
def test_fast_equals_plain(src, piv, markers):
    src_marker, piv_marker = markers
    fast = dtw_align(src, piv, src_marker=src_marker, piv_marker=piv_marker)
    plain = dtw_align_plain(src, piv, src_marker=src_marker, piv_marker=piv_marker)
    assert fast == plain


@relaxed
@given(src=sequences, piv=sequences, markers=nonempty_marker_pairs)
def test_cost_matrix_is_spec_dist_fn(src, piv, markers):
    src_marker, piv_marker = markers
    cost = dtw_cost_matrix(src, piv, src_marker=src_marker, piv_marker=piv_marker)
    expected = [[spec_dist(a, b, src_marker, piv_marker) for b in piv] for a in src]
    assert cost.dtype == np.int32 and cost.shape == (len(src), len(piv))
    assert cost.tolist() == expected


@relaxed
@given(src=sequences, piv=sequences, markers=marker_pairs)
def test_alignment_is_a_dtw_path(src, piv, markers):
    src_marker, piv_marker = markers
    assert_valid_alignment(align(src, piv, src_marker, piv_marker), len(src), len(piv))


@relaxed
@given(
    shape=st.tuples(st.integers(1, 9), st.integers(1, 9)),
    high=st.sampled_from([3, 10**9]),  # small: int32 grid with ties; huge: int64 grid
    seed=st.integers(0, 2**32 - 1),
)
def test_accumulate_matches_naive_recurrence(shape, high, seed):
    cost = np.random.default_rng(seed).integers(0, high, size=shape).astype(np.int64)
    grid = _accumulate(cost)
    expected = naive_grid(cost)
    finite = np.isfinite(expected)
    assert (grid[finite] == expected[finite]).all()
    assert (grid[~finite] > expected[finite].max()).all()


def test_real_tokenizations_fast_equals_plain(metaspace_tokenizer, bytelevel_tokenizer):
    text = "Bonjour! In 2024, 17 models (x3) were fused — café naïve 😀; TIES+SCE → 42%."
    src = metaspace_tokenizer.convert_ids_to_tokens(metaspace_tokenizer(text)["input_ids"])
    piv = bytelevel_tokenizer.convert_ids_to_tokens(bytelevel_tokenizer(text)["input_ids"])
    fast = align(src, piv)
    assert fast == dtw_align_plain(src, piv, src_marker=SP, piv_marker=BL)
    assert_valid_alignment(fast, len(src), len(piv))
    # The reverse direction loops over the other axis of the grid.
    assert align(piv, src, BL, SP) == dtw_align_plain(piv, src, src_marker=BL, piv_marker=SP)


def test_identical_tokens_align_one_to_one():
    words = ["▁The", "▁quick", "▁brown", "▁fox", ".", "▁The", "▁fox"]
    assert align(words, words, SP, SP) == [[j] for j in range(len(words))]
    assert align(["a", "a", "a"], ["a", "a", "a"], "", "") == [[0], [1], [2]]


def test_split_digits_all_map_to_the_merged_pivot_token():
    assert align(["▁1", "2", "3"], ["Ġ123"]) == [[0, 1, 2]]
    assert align(["▁", "1", "2", "3"], ["Ġ123"]) == [[0, 1, 2, 3]]
    assert align(["▁123"], ["Ġ1", "2", "3"]) == [[0], [0], [0]]


def test_spec_example_token_pairs_with_love():
    # cost rows: love -> [0, 3, 7]; tokenization -> [10, 7, 5]; D rows [0, 3, 10], [10, 7, 8].
    # From (1, 2): diag D[0,1]=3 beats left 7 and up 10 -> (0, 1); the first row then allows
    # only "left". So 'Ġtoken' gets '▁love' (spec §11).
    src, piv = ["▁love", "▁tokenization"], ["Ġlove", "Ġtoken", "ization"]
    assert dtw_cost_matrix(src, piv, src_marker=SP, piv_marker=BL).tolist() == [
        [0, 3, 7],
        [10, 7, 5],
    ]
    assert align(src, piv) == [[0], [0], [1]]


def test_tie_prefers_previous_pivot_over_previous_source():
    # cost (0 if equal else 1): a->[1,0,1], b->[0,1,0], a->[1,0,1]; D rows [1,1,2], [1,2,1],
    # [2,1,2]. At (2,2): diag 2, left D[2,1]=1, up D[1,2]=1 -> tie, previous pivot wins ->
    # (2,1) -> diag (1,0) -> up (0,0). Source-first order would give [[0], [0], [1, 2]].
    assert align(["a", "b", "a"], ["b", "a", "b"], "", "") == [[0, 1], [2], [2]]


def test_tie_prefers_diagonal():
    # All costs 0, so every predecessor ties. From (2, 1) the diagonal (1, 0) wins, then the
    # first column forces (0, 0); "previous source" first would go (1, 1), (0, 0) instead.
    assert align(["x", "x", "x"], ["x", "x"], "", "") == [[0, 1], [2]]


def test_cost_fallback_when_a_side_is_only_markers():
    assert dtw_cost_matrix(["▁"], ["Ġ"], src_marker=SP, piv_marker=BL).tolist() == [[0]]
    cost = dtw_cost_matrix(["▁", "▁▁", "a"], ["Ġ", "a", "ĠĠ"], src_marker=SP, piv_marker=BL)
    # Without the fallback (stripped strings only) this would be [[0,1,0], [0,1,0], [1,0,1]].
    assert cost.tolist() == [[0, 1, 1], [1, 2, 0], [1, 0, 2]]


def test_empty_marker_strips_nothing():
    # '' means "no marker"; str.replace('', x) would interleave x between characters.
    cost = dtw_cost_matrix(["ab", ""], ["Ġab", "ab"], src_marker="", piv_marker=BL)
    assert cost.tolist() == [[0, 0], [3, 2]]


def test_empty_inputs():
    assert dtw_align([], [], src_marker=SP, piv_marker=BL) == []
    assert dtw_align_plain([], [], src_marker=SP, piv_marker=BL) == []
    assert dtw_cost_matrix([], ["Ġa"], src_marker=SP, piv_marker=BL).shape == (0, 1)
    for fn in (dtw_align, dtw_align_plain):
        with pytest.raises(ValueError, match="both sequences non-empty"):
            fn([], ["Ġa"], src_marker=SP, piv_marker=BL)
        with pytest.raises(ValueError, match="both sequences non-empty"):
            fn(["▁a"], [], src_marker=SP, piv_marker=BL)


def test_compiled_grid_equals_numpy_scan():
    from fusion.align.dtw import _accumulate, accumulate

    rng = np.random.default_rng(0)
    for n, m in [(1, 1), (1, 7), (9, 1), (13, 17), (40, 33)]:
        cost = rng.integers(0, 4, (n, m)).astype(np.int32)
        fast, scan = accumulate(cost), _accumulate(cost)
        assert np.array_equal(fast, scan)
