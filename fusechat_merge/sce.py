"""SCE merging (Select, Calculate, Erase; FuseChat, arXiv 2408.07990) as pure torch.

No mergekit import and no I/O: `sce_merge` takes the base (pivot) tensor and the N
target tensors of one parameter matrix and returns the merged tensor.

Definition (all arithmetic in float32; deltas ``δ_j = θ_j − θ_base``):

1. **Select** (only when ``select_topk < 1``): ``v = Var_j(δ_j)`` (population variance,
   per element). With ``k = int(select_topk · count_nonzero(v))``, an element is
   *selected* when ``v`` is at least the k-th largest variance. Every element tied
   with the k-th largest value is selected, so the selection does not depend on
   element order (``torch.topk`` picks arbitrarily among ties). ``k == 0`` selects
   nothing: this is what happens with one target or identical targets, whose
   variance is zero everywhere.
2. **Calculate**: ``η_j = Σ(δ̂_j²) / Σ_i Σ(δ̂_i²)`` with ``δ̂`` the deltas masked to the
   selection (or all deltas without selection). When every masked delta is zero,
   ``η_j = 1/N``. (mergekit's built-in ``sce`` switches to uniform weights when the
   *mean* squares sum below 1e-6, which real fine-tunes at lr 5e-6 easily do; we only
   do so at exactly zero.)
3. **Erase**: the majority sign of an element is the sign of ``Σ_j δ_j`` (a zero sum
   counts as positive); a delta survives where its sign equals the majority. Zero
   deltas never survive (they carry nothing to average).
4. **Merge**: ``normalize=True`` gives ``base + Σ_j η_j m_j δ_j / Σ_j η_j m_j`` (a
   weighted mean of the surviving deltas; an element with no survivor keeps the base
   value), ``normalize=False`` gives the paper's Eq. 9, ``base + Σ_j η_j m_j δ_j``.

``select_scope`` decides which deltas Erase and Merge see:

* ``"weights"`` (FuseChat's released code, which built the FuseChat-7B models): the
  selection only shapes ``η``; Erase and Merge use every element.
* ``"deltas"`` (the paper's Algorithm 1 and mergekit's ``sce``): unselected deltas are
  zeroed, so unselected elements keep the base value.

At ``select_topk = 1`` there is no selection and both scopes agree.

Memory: the work runs over flat chunks of the tensors (about 1M elements), so the
scratch is a few chunk-sized buffers plus, when selecting, one int32 per element of
cached variance (recomputed per pass instead when that would exceed the budget).
Results are bit-identical for every chunk size and budget: per-element work does not
cross elements, and the sums behind ``η`` are taken over fixed blocks and added
exactly (``math.fsum``). The k-th largest variance is found by a two-level radix
select over the float32 bit patterns (two bincounts) instead of ``torch.topk``:
exact, linear time, and chunkable.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from fusion.errors import InputError

SelectScope = Literal["weights", "deltas"]
SELECT_SCOPES: tuple[str, ...] = ("weights", "deltas")

#: Fixed reduction block (elements). Chunks start on block boundaries, so the sums
#: behind the coefficients are the same whatever the chunk size.
BLOCK = 1 << 16
#: Elements per chunk: big enough to amortise Python overhead, small enough that the
#: chunk buffers stay in cache and below glibc's mmap threshold.
DEFAULT_CHUNK_ELEMENTS = 1 << 20
#: Scratch budget that is never exceeded by default, whatever the tensor size.
DEFAULT_MAX_SCRATCH_BYTES = 1 << 30
_RADIX_BINS = 1 << 16


class SCEInputError(InputError):
    """An input the method cannot merge; ``index`` is the target (or -1 for the base)."""

    def __init__(self, message: str, index: int | None = None) -> None:
        super().__init__(message)
        self.index = index


@dataclass(frozen=True)
class SCEStats:
    """What SCE decided for one tensor (for reports)."""

    coefficients: tuple[float, ...]
    """η per target, in target order."""
    numel: int
    selected: int
    """Elements selected by variance (``numel`` when there is no selection)."""
    erased: int
    """Non-zero deltas dropped by the sign election, summed over targets."""
    nonzero: int
    """Non-zero deltas, summed over targets."""

    @property
    def selected_fraction(self) -> float:
        return self.selected / self.numel if self.numel else 0.0

    @property
    def erased_fraction(self) -> float:
        return self.erased / self.nonzero if self.nonzero else 0.0


def validate_parameters(select_topk: float, select_scope: str, normalize: bool) -> None:
    """Raise ``ValueError`` for parameters outside their domain."""
    if isinstance(select_topk, bool) or not isinstance(select_topk, (int, float)):
        raise ValueError(f"select_topk must be a number in (0, 1], got {select_topk!r}")
    if math.isnan(select_topk) or not 0.0 < float(select_topk) <= 1.0:
        raise ValueError(
            "select_topk must be in (0, 1] (the fraction of elements kept by variance), "
            f"got {select_topk!r}; use 1.0 for no selection"
        )
    if select_scope not in SELECT_SCOPES:
        raise ValueError(
            f"select_scope must be one of {', '.join(SELECT_SCOPES)}, got {select_scope!r}"
        )
    if not isinstance(normalize, bool):
        raise ValueError(f"normalize must be true or false, got {normalize!r}")


def scratch_bytes(numel: int, n_targets: int, chunk: int, cache_variance: bool) -> int:
    """Upper estimate of the scratch `sce_merge` allocates besides its output.

    Per chunk element: float32 deltas and their float sign mask (8·N), the bool sign
    masks and comparisons (3·N), and about eight float32/int32 vectors (32). Plus one
    int32 per tensor element when the variance is cached.
    """
    per_chunk = chunk * (11 * n_targets + 32)
    return per_chunk + (4 * numel if cache_variance else 0)


def sce_merge(
    base: torch.Tensor,
    targets: Sequence[torch.Tensor],
    *,
    select_topk: float = 1.0,
    select_scope: SelectScope = "weights",
    normalize: bool = True,
    max_scratch_bytes: int = DEFAULT_MAX_SCRATCH_BYTES,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """Merge ``targets`` into ``base`` with SCE; returns a tensor like ``base``.

    ``max_scratch_bytes`` bounds the working memory (results do not depend on it);
    ``chunk_elements`` is rounded to a multiple of `BLOCK`.
    """
    merged, _ = sce_merge_with_stats(
        base,
        targets,
        select_topk=select_topk,
        select_scope=select_scope,
        normalize=normalize,
        max_scratch_bytes=max_scratch_bytes,
        chunk_elements=chunk_elements,
        collect_stats=False,
    )
    return merged


def sce_merge_with_stats(
    base: torch.Tensor,
    targets: Sequence[torch.Tensor],
    *,
    select_topk: float = 1.0,
    select_scope: SelectScope = "weights",
    normalize: bool = True,
    max_scratch_bytes: int = DEFAULT_MAX_SCRATCH_BYTES,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    collect_stats: bool = True,
) -> tuple[torch.Tensor, SCEStats | None]:
    """`sce_merge`, also returning what it decided (``None`` unless ``collect_stats``)."""
    validate_parameters(select_topk, select_scope, normalize)
    _check_inputs(base, targets)
    n, numel = len(targets), base.numel()
    if n == 0:
        return base.clone(), SCEStats((), numel, 0, 0, 0) if collect_stats else None

    selecting = select_topk < 1.0
    ws = _Workspace(base, targets, selecting, max_scratch_bytes, chunk_elements)

    # Pass 1: finiteness, and the variance histogram (high 16 bits) when selecting.
    high_hist = torch.zeros(_RADIX_BINS, dtype=torch.int64, device=base.device)
    nonzero_var = 0
    for start, stop in ws.ranges:
        d = ws.deltas(start, stop)
        _check_finite(d, ws, start, stop)
        if selecting:
            bits = ws.variance_bits(start, stop, d, store=True)
            high_hist += torch.bincount(bits >> 16, minlength=_RADIX_BINS)
            nonzero_var += int(torch.count_nonzero(bits))

    threshold: int | None = None  # float32 bit pattern of the k-th largest variance
    if selecting:
        k = int(select_topk * nonzero_var)
        if k > 0:
            threshold = _radix_threshold(ws, high_hist, k)

    # Pass 2: squared (selected) deltas, summed per fixed block, then exactly.
    block_sums: list[torch.Tensor] = []
    selected = 0 if selecting else numel
    if not selecting or threshold is not None:
        for start, stop in ws.ranges:
            d = ws.deltas(start, stop)
            if threshold is not None:
                keep = ws.variance_bits(start, stop, d) >= threshold
                d.mul_(keep)
                if collect_stats:
                    selected += int(keep.sum())
            block_sums.append(_block_sums(d.square_()))
    eta = _coefficients(block_sums, n)

    # Pass 3: erase and merge.
    out = torch.empty_like(ws.base)
    eta_t = torch.tensor(eta, dtype=torch.float32, device=base.device)
    keep_base_outside = select_scope == "deltas" and selecting
    erased = nonzero = 0
    for start, stop in ws.ranges:
        if keep_base_outside and threshold is None:  # nothing selected: base everywhere
            out[start:stop] = ws.base[start:stop]
            continue
        d = ws.deltas(start, stop)
        if keep_base_outside:
            d.mul_(ws.variance_bits(start, stop, d) >= threshold)
        keep = _sign_consensus(d)
        if collect_stats:
            nz = d != 0
            nonzero += int(nz.sum())
            erased += int((nz & ~keep).sum())
        d.mul_(keep)
        update = eta_t @ d  # Σ_j η_j m_j δ_j
        if normalize:
            weight = eta_t @ ws.as_float(keep)  # Σ_j η_j m_j
            update.div_(weight.masked_fill_(weight == 0, 1.0))
        out[start:stop] = update.add_(ws.base_f32(start, stop))

    stats = SCEStats(tuple(eta), numel, selected, erased, nonzero) if collect_stats else None
    return out.reshape(base.shape), stats


class _Workspace:
    """Flat views of the inputs and reusable chunk buffers (no per-chunk page faults)."""

    def __init__(
        self,
        base: torch.Tensor,
        targets: Sequence[torch.Tensor],
        selecting: bool,
        max_scratch_bytes: int,
        chunk_elements: int,
    ) -> None:
        self.base = base.reshape(-1)
        self.targets = [t.reshape(-1) for t in targets]
        numel, n = self.base.numel(), len(self.targets)
        chunk = max(BLOCK, chunk_elements // BLOCK * BLOCK)
        while chunk > BLOCK and scratch_bytes(numel, n, chunk, False) > max_scratch_bytes:
            chunk //= 2
        chunk = min(chunk, numel)
        self.ranges = [(s, min(s + chunk, numel)) for s in range(0, numel, chunk)]
        device = base.device
        self.d = torch.empty((n, chunk), dtype=torch.float32, device=device)
        self.d_float = torch.empty((n, chunk), dtype=torch.float32, device=device)
        self.vec = torch.empty((2, chunk), dtype=torch.float32, device=device)
        cache = selecting and scratch_bytes(numel, n, chunk, True) <= max_scratch_bytes
        self.bits_cache = torch.empty(numel, dtype=torch.int32, device=device) if cache else None

    def base_f32(self, start: int, stop: int) -> torch.Tensor:
        b = self.base[start:stop]
        if b.dtype == torch.float32:
            return b
        return self.vec[0, : stop - start].copy_(b)

    def deltas(self, start: int, stop: int) -> torch.Tensor:
        """Float32 deltas of one chunk, shape (N, stop - start), in a reused buffer."""
        b = self.base_f32(start, stop)
        d = self.d[:, : stop - start]
        for j, t in enumerate(self.targets):
            torch.sub(t[start:stop], b, out=d[j])
        return d

    def variance_bits(
        self, start: int, stop: int, d: torch.Tensor | None = None, *, store: bool = False
    ) -> torch.Tensor:
        """Population variance over targets as int32 bit patterns (monotone for v ≥ 0).

        Read from the cache when there is one (``store`` fills it in pass 1); otherwise
        computed from the chunk's deltas ``d`` (recomputed when not given).
        """
        if self.bits_cache is not None and not store:
            return self.bits_cache[start:stop]
        if d is None:
            d = self.deltas(start, stop)
        # Shifted by the first target's delta: identical targets give exactly zero.
        n, c = d.shape[0], stop - start
        shifted, mean = self.d_float[:, :c], self.vec[1, :c]
        torch.sub(d, d[0], out=shifted)
        torch.sum(shifted, dim=0, out=mean)
        mean.div_(n)
        shifted.sub_(mean)
        var = shifted.square_().sum(dim=0).div_(n)
        bits = var.view(torch.int32)
        if self.bits_cache is not None:
            self.bits_cache[start:stop] = bits
        return bits

    def as_float(self, mask: torch.Tensor) -> torch.Tensor:
        return self.d_float[:, : mask.shape[1]].copy_(mask)


def _check_inputs(base: torch.Tensor, targets: Sequence[torch.Tensor]) -> None:
    if not base.is_floating_point():
        raise SCEInputError(f"SCE merges floating-point tensors, got base dtype {base.dtype}", -1)
    for j, t in enumerate(targets):
        if t.shape != base.shape:
            raise SCEInputError(
                f"target {j} has shape {tuple(t.shape)}, the base has {tuple(base.shape)}", j
            )
        if not t.is_floating_point():
            raise SCEInputError(f"target {j} has non-floating dtype {t.dtype}", j)
        if t.device != base.device:
            raise SCEInputError(f"target {j} is on {t.device}, the base on {base.device}", j)


def _check_finite(d: torch.Tensor, ws: _Workspace, start: int, stop: int) -> None:
    if bool(torch.isfinite(d).all()):
        return
    for index, t in [(-1, ws.base), *enumerate(ws.targets)]:
        bad = ~torch.isfinite(t[start:stop])
        if bool(bad.any()):
            where = start + int(bad.nonzero()[0, 0])
            who = "the base" if index == -1 else f"target {index}"
            raise SCEInputError(
                f"{who} has a non-finite value (NaN or inf) at flat index {where}", index
            )
    raise SCEInputError("a delta overflows float32 (inputs are finite but too far apart)")


def _radix_threshold(ws: _Workspace, high_hist: torch.Tensor, k: int) -> int:
    """Bit pattern of the k-th largest variance: high 16 bits from the pass-1 histogram,
    low 16 bits from a histogram of the elements inside that high bin."""
    high_bin, above = _bin_holding_kth_largest(high_hist, k)
    low_hist = torch.zeros_like(high_hist)
    for start, stop in ws.ranges:
        bits = ws.variance_bits(start, stop)
        in_bin = bits[(bits >> 16) == high_bin]
        if in_bin.numel():
            low_hist += torch.bincount(in_bin & 0xFFFF, minlength=_RADIX_BINS)
    low_bin, _ = _bin_holding_kth_largest(low_hist, k - above)
    return (high_bin << 16) | low_bin


def _bin_holding_kth_largest(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """Highest bin whose count from the top reaches k, and the count strictly above it."""
    from_top = hist.flip(0).cumsum(0)
    position = int(torch.searchsorted(from_top, torch.tensor([k], device=hist.device))[0])
    above = int(from_top[position - 1]) if position > 0 else 0
    return hist.numel() - 1 - position, above


def _block_sums(sq: torch.Tensor) -> torch.Tensor:
    """Per-target sums over fixed BLOCK-sized runs of a chunk, shape (N, blocks)."""
    n, c = sq.shape
    full = c // BLOCK * BLOCK
    parts = []
    if full:
        parts.append(sq[:, :full].reshape(n, -1, BLOCK).sum(dim=-1))
    if c > full:
        parts.append(sq[:, full:].sum(dim=-1, keepdim=True))
    return torch.cat(parts, dim=1)


def _coefficients(block_sums: list[torch.Tensor], n: int) -> list[float]:
    """η from the squared-delta block sums; uniform when they are all zero."""
    if not block_sums:
        return [1.0 / n] * n
    sums = torch.cat(block_sums, dim=1).to("cpu", torch.float64).tolist()
    totals = [math.fsum(row) for row in sums]
    grand = math.fsum(totals)
    if grand == 0.0:
        return [1.0 / n] * n
    return [t / grand for t in totals]


def _sign_consensus(d: torch.Tensor) -> torch.Tensor:
    """Boolean mask of deltas whose sign equals the sign of their element's sum (0 → +)."""
    positive = d.sum(dim=0) >= 0
    return torch.where(positive, d > 0, d < 0)
