"""Sequence-level token alignment: edit-distance DTW between two tokenizations of one text.

FuseChat aligns a source model's tokens to the pivot's by dynamic time warping whose local
cost is the Levenshtein distance between token strings (spec §3.1). The reference runs a
Python double loop with one ``editdistance`` call per pair; here the cost matrix comes from
rapidfuzz's compiled ``cdist`` and the accumulation is a row-wise numpy min-plus scan, with
integer arithmetic so the accumulated costs (and hence all tie-breaks) equal the reference's.

An empty marker (``''``) means "this tokenizer has no space marker": nothing is stripped or
replaced, instead of ``str.replace('', x)``'s interleaving.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from rapidfuzz.distance import Levenshtein
from rapidfuzz.process import cdist

# Border value of the accumulated-cost grid: above every finite path cost, and INF plus a path
# cost still fits the dtype. int32 is used only when the worst path is below INF32 / 2.
_INF32 = 2**30
_INF64 = 2**62
# Below this many string pairs, cdist's thread start costs more than it saves.
_THREADED_PAIRS = 50_000


def _replace(token: str, old: str, new: str) -> str:
    """``str.replace`` that treats an empty marker as absent rather than as 'between chars'."""
    return token.replace(old, new) if old else token


def _dist(a: str, b: str, src_marker: str, piv_marker: str) -> int:
    """The reference's ``dist_fn``: compare without markers, unless that leaves a side empty."""
    aa, bb = _replace(a, src_marker, ""), _replace(b, piv_marker, "")
    if aa == "" or bb == "":
        aa, bb = _replace(a, src_marker, piv_marker), b
    return Levenshtein.distance(aa, bb)


def _check_lengths(src: Sequence[str], piv: Sequence[str]) -> bool:
    """True if there is something to align; a one-sided empty input has no valid alignment."""
    if len(src) == 0 and len(piv) == 0:
        return False
    if len(src) == 0 or len(piv) == 0:
        raise ValueError(
            f"cannot align {len(src)} source tokens to {len(piv)} pivot tokens: "
            "DTW needs both sequences non-empty (or both empty)"
        )
    return True


def _unique(tokens: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Distinct strings in first-seen order and each token's index into them (text repeats)."""
    index: dict[str, int] = {}
    inverse = [index.setdefault(t, len(index)) for t in tokens]
    return list(index), np.asarray(inverse, dtype=np.intp)


def _pairwise(queries: Sequence[str], choices: Sequence[str]) -> np.ndarray:
    """All-pairs Levenshtein distances; threads only pay off on large matrices."""
    workers = -1 if len(queries) * len(choices) >= _THREADED_PAIRS else 1
    return cdist(queries, choices, scorer=Levenshtein.distance, dtype=np.int32, workers=workers)


def _distinct_costs(src: list[str], piv: list[str], src_marker: str, piv_marker: str) -> np.ndarray:
    """``dist_fn`` for every pair of distinct strings: one ``cdist`` plus the fallback patches.

    The fallback applies exactly to rows/columns whose stripped token is empty, so only those
    are recomputed, on the marker-swapped source against the raw pivot.
    """
    src_bare = [_replace(t, src_marker, "") for t in src]
    piv_bare = [_replace(t, piv_marker, "") for t in piv]
    cost = _pairwise(src_bare, piv_bare)
    rows = [i for i, t in enumerate(src_bare) if t == ""]
    cols = [j for j, t in enumerate(piv_bare) if t == ""]
    if rows or cols:
        swapped = [_replace(t, src_marker, piv_marker) for t in src]
        if rows:
            cost[rows, :] = _pairwise([swapped[i] for i in rows], piv)
        if cols:
            cost[:, cols] = _pairwise(swapped, [piv[j] for j in cols])
    return cost


def dtw_cost_matrix(
    src: Sequence[str], piv: Sequence[str], *, src_marker: str, piv_marker: str
) -> np.ndarray:
    """int32 ``(n, m)`` matrix of the reference's ``dist_fn(src[i], piv[j])``.

    Scored once per pair of distinct strings (compiled ``cdist``), then expanded by gathers.
    """
    if len(src) == 0 or len(piv) == 0:
        return np.zeros((len(src), len(piv)), dtype=np.int32)
    src_u, src_inv = _unique(src)
    piv_u, piv_inv = _unique(piv)
    small = _distinct_costs(src_u, piv_u, src_marker, piv_marker)
    return small.take(src_inv, axis=0).take(piv_inv, axis=1)


def _accumulate(cost: np.ndarray) -> np.ndarray:
    """``(n+1, m+1)`` DTW grid, ``D[0,0]=0`` and INF borders, one numpy scan per row.

    Row recurrence ``D[j+1] = min(t[j], D[j] + c[j])`` with ``t[j] = c[j] + min(up, diag)`` is
    a min-plus scan: ``D[j+1] = P[j] + min_{k<=j}(min(up, diag)[k] - P[k-1])`` where
    ``P = cumsum(c)``, ``P[-1] = 0`` (``before`` and ``through`` below). Exact in integers
    (int32 when the worst path fits, for memory traffic), so ties are the reference's. The
    recurrence is symmetric, so it loops over the shorter axis.
    """
    transposed = cost.shape[0] > cost.shape[1]
    c = cost.T if transposed else cost
    n, m = c.shape
    worst = (int(c.max()) + 1) * (n + m)
    dtype, inf = (np.int32, _INF32) if worst < _INF32 // 2 else (np.int64, _INF64)
    prefix = np.zeros((n, m + 1), dtype=dtype)
    np.cumsum(c, axis=1, dtype=dtype, out=prefix[:, 1:])
    grid = np.empty((n + 1, m + 1), dtype=dtype)
    grid[0] = inf
    grid[1:, 0] = inf
    grid[0, 0] = 0
    # Row views made by iteration: cheaper than slicing inside the loop.
    rows = zip(
        grid[:-1, 1:], grid[:-1, :-1], grid[1:, 1:], prefix[:, :-1], prefix[:, 1:], strict=True
    )
    for up, diag, row, before, through in rows:
        np.minimum(up, diag, out=row)
        row -= before
        np.minimum.accumulate(row, out=row)
        row += through
    return grid.T if transposed else grid


def _fill_grid(cost: np.ndarray, grid: np.ndarray, inf: int) -> None:  # pragma: no cover
    """The plain recurrence, borders included (compiled by numba when present)."""
    n, m = cost.shape
    grid[0, 0] = 0
    for j in range(1, m + 1):
        grid[0, j] = inf
    for i in range(1, n + 1):
        grid[i, 0] = inf
    for i in range(n):
        for j in range(m):
            best = grid[i, j + 1]
            if grid[i + 1, j] < best:
                best = grid[i + 1, j]
            if grid[i, j] < best:
                best = grid[i, j]
            grid[i + 1, j + 1] = cost[i, j] + best


try:  # numba makes the DP a compiled loop (~10x the numpy row scan); optional
    import numba

    _fill_grid_compiled = numba.njit(cache=True, nogil=True)(_fill_grid)
except ImportError:  # pragma: no cover - depends on the install
    _fill_grid_compiled = None


def accumulate(cost: np.ndarray) -> np.ndarray:
    """The DTW grid: compiled loop when numba is installed, else the numpy row scan."""
    if _fill_grid_compiled is None:
        return _accumulate(cost)
    n, m = cost.shape
    worst = (int(cost.max()) + 1) * (n + m) if cost.size else 0
    dtype, inf = (np.int32, _INF32) if worst < _INF32 // 2 else (np.int64, _INF64)
    grid = np.empty((n + 1, m + 1), dtype=dtype)
    _fill_grid_compiled(np.ascontiguousarray(cost, dtype=dtype), grid, inf)
    return grid


def _backtrack(grid: np.ndarray) -> list[list[int]]:
    """piv2src from the padded grid: from the last pair, step to the cheapest predecessor.

    Ties go diagonal, then previous pivot token, then previous source token (FuseChat-2's
    order). On the first row/column the INF border leaves one finite move, as in the reference.
    """
    n, m = grid.shape[0] - 1, grid.shape[1] - 1
    piv2src: list[list[int]] = [[] for _ in range(m)]
    i, j = n, m
    while True:
        piv2src[j - 1].append(i - 1)
        if i == 1 and j == 1:
            break
        diag, left, up = grid[i - 1, j - 1], grid[i, j - 1], grid[i - 1, j]
        if diag <= left and diag <= up:
            i, j = i - 1, j - 1
        elif left <= up:
            j -= 1
        else:
            i -= 1
    for sources in piv2src:
        sources.reverse()
    return piv2src


def dtw_align(
    src: Sequence[str], piv: Sequence[str], *, src_marker: str, piv_marker: str
) -> list[list[int]]:
    """For each pivot position, the sorted source positions DTW aligns to it (>= 1 each).

    Both empty gives ``[]``; exactly one empty raises ``ValueError``.
    """
    if not _check_lengths(src, piv):
        return []
    cost = dtw_cost_matrix(src, piv, src_marker=src_marker, piv_marker=piv_marker)
    return _backtrack(accumulate(cost))


def dtw_align_plain(
    src: Sequence[str], piv: Sequence[str], *, src_marker: str, piv_marker: str
) -> list[list[int]]:
    """The reference's way: per-pair edit distance in a Python double loop (test oracle, baseline)."""
    if not _check_lengths(src, piv):
        return []
    n, m = len(src), len(piv)
    grid = [[0] + [_INF64] * m] + [[_INF64] * (m + 1) for _ in range(n)]
    for i in range(n):
        for j in range(m):
            step = _dist(src[i], piv[j], src_marker, piv_marker)
            grid[i + 1][j + 1] = step + min(grid[i][j + 1], grid[i + 1][j], grid[i][j])
    return _backtrack(np.array(grid, dtype=np.int64))
