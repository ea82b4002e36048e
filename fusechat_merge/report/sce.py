"""The SCE tensor report of a merge: ``sce_report.csv`` (η and the selected and erased
fractions per tensor and target) and ``sce_coefficients.png`` (η per layer as a heatmap
over the fractions per layer)."""

from __future__ import annotations

import csv
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fusechat_merge.report.figures import new_figure, save_png
from fusechat_merge.stats_sink import TensorStats
from fusion.artifacts.atomic import atomic_path

if TYPE_CHECKING:
    from matplotlib.axes import Axes

SCE_CSV = "sce_report.csv"
SCE_PNG = "sce_coefficients.png"

# Layer index in the usual layouts: llama/mistral/qwen2 (layers.N), gpt2 (h.N), others.
_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\.")
_EMBED = ("embed_tokens", "wte", "word_embeddings", "embed_in")
_LM_HEAD = ("lm_head", "embed_out")
_FINAL = ("norm", "ln_f", "final_layernorm", "final_layer_norm")
# Column order around the numbered layers.
_BEFORE = ("embed",)
_AFTER = ("final", "lm_head", "other")


def write_sce_report(rows: Sequence[TensorStats], out_dir: str | os.PathLike[str]) -> Path:
    """Write ``sce_report.csv`` (one row per tensor and target) and ``sce_coefficients.png``.

    Returns the CSV path (callers print it); the PNG lies beside it.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = _write_sce_csv(rows, out_dir / SCE_CSV)
    plot_sce_coefficients(rows, out_dir / SCE_PNG)
    return path


def _write_sce_csv(rows: Sequence[TensorStats], path: Path) -> Path:
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["tensor", "model", "coefficient", "numel", "selected_fraction", "erased_fraction"]
        )
        for row in sorted(rows, key=lambda r: r.tensor or ""):
            for model, eta in zip(row.models, row.stats.coefficients, strict=True):
                writer.writerow(
                    [
                        row.tensor,
                        model,
                        f"{eta:.6g}",
                        row.stats.numel,
                        f"{row.stats.selected_fraction:.6g}",
                        f"{row.stats.erased_fraction:.6g}",
                    ]
                )
    return path


def mean_coefficients(rows: Sequence[TensorStats]) -> dict[str, float]:
    """Mean η of each target over all tensors (a one-line summary of a merge)."""
    totals: dict[str, list[float]] = {}
    for row in rows:
        for model, eta in zip(row.models, row.stats.coefficients, strict=True):
            totals.setdefault(model, []).append(eta)
    return {model: sum(v) / len(v) for model, v in totals.items()}


def layer_column(tensor: str | None) -> str:
    """The report column of a tensor: ``embed``, the layer index, ``final``, ``lm_head``
    or ``other`` (unnamed or unrecognised tensors, shown rather than dropped)."""
    if not tensor:
        return "other"
    match = _LAYER.search(tensor)
    if match:
        return match.group(1)
    parts = tensor.split(".")
    if any(p in _EMBED for p in parts):
        return "embed"
    if any(p in _LM_HEAD for p in parts):
        return "lm_head"
    if any(p in _FINAL for p in parts):
        return "final"
    return "other"


def _column_key(column: str) -> tuple[int, int]:
    if column.isdigit():
        return (1, int(column))
    if column in _BEFORE:
        return (0, _BEFORE.index(column))
    return (2, _AFTER.index(column))


def _columns(rows: Sequence[TensorStats]) -> list[str]:
    """Columns present in ``rows``: embed, layers in numeric order, then the head."""
    return sorted({layer_column(r.tensor) for r in rows}, key=_column_key)


def short_names(models: Sequence[str]) -> list[str]:
    """Last path component of each model id; the full id where two would collide."""
    shorts = [re.split(r"[\\/]", m.rstrip("/\\"))[-1] or m for m in models]
    return [m if shorts.count(s) > 1 else s for m, s in zip(models, shorts, strict=True)]


def coefficients_by_layer(
    rows: Sequence[TensorStats],
) -> tuple[list[str], list[str], np.ndarray]:
    """η per target (short name) and layer column, the numel-weighted mean over the
    column's tensors (big matrices dominate what a layer contributes, not norms).

    NaN where a target has no tensor in a column; a column whose tensors are all
    empty falls back to the unweighted mean.
    """
    models = list(dict.fromkeys(m for r in rows for m in r.models))
    columns = _columns(rows)
    col = {c: j for j, c in enumerate(columns)}
    tgt = {m: i for i, m in enumerate(models)}
    shape = (len(models), len(columns))
    weighted, weights = np.zeros(shape), np.zeros(shape)
    plain, counts = np.zeros(shape), np.zeros(shape)
    for row in rows:
        j = col[layer_column(row.tensor)]
        for model, eta in zip(row.models, row.stats.coefficients, strict=True):
            i = tgt[model]
            weighted[i, j] += eta * row.stats.numel
            weights[i, j] += row.stats.numel
            plain[i, j] += eta
            counts[i, j] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        values = np.where(weights > 0, weighted / weights, plain / counts)
    return short_names(models), columns, values


def fractions_by_layer(rows: Sequence[TensorStats]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Selected fraction (of elements) and erased fraction (of non-zero deltas) per
    column, pooled over the column's tensors like the CSV's per-tensor fractions."""
    columns = _columns(rows)
    col = {c: j for j, c in enumerate(columns)}
    sums = np.zeros((4, len(columns)))  # selected, numel, erased, nonzero
    for row in rows:
        s = row.stats
        sums[:, col[layer_column(row.tensor)]] += (s.selected, s.numel, s.erased, s.nonzero)
    with np.errstate(invalid="ignore", divide="ignore"):
        selected = np.where(sums[1] > 0, sums[0] / sums[1], 0.0)
        erased = np.where(sums[3] > 0, sums[2] / sums[3], 0.0)
    return columns, selected, erased


def plot_sce_coefficients(rows: Sequence[TensorStats], path: Path) -> Path:
    """Heatmap of η (targets × layers) over a panel of selected/erased fractions.

    With no rows (no ``fusechat_sce`` tensor merged) the PNG says so, so that a stale
    plot from an earlier run never sits beside a fresh, empty CSV.
    """
    if not rows:
        fig = new_figure(6, 2)
        fig.text(0.5, 0.5, "no fusechat_sce tensors were merged", ha="center", va="center")
        return save_png(fig, path)
    targets, columns, eta = coefficients_by_layer(rows)
    _, selected, erased = fractions_by_layer(rows)
    width = min(max(6.0, 0.3 * len(columns) + 3.0), 30.0)
    height = 3.2 + 0.4 * len(targets)
    fig = new_figure(width, height)
    grid = fig.add_gridspec(2, 2, width_ratios=(1, 0.025), height_ratios=(len(targets) + 1, 3))
    heat = fig.add_subplot(grid[0, 0])
    _draw_heatmap(heat, fig.add_subplot(grid[0, 1]), targets, columns, eta)
    _draw_fractions(fig.add_subplot(grid[1, 0], sharex=heat), columns, selected, erased)
    return save_png(fig, path)


def _draw_heatmap(
    ax: Axes, cax: Axes, targets: list[str], columns: list[str], eta: np.ndarray
) -> None:
    import matplotlib as mpl

    cmap = mpl.colormaps["viridis"].with_extremes(bad="lightgrey")
    image = ax.imshow(np.ma.masked_invalid(eta), aspect="auto", cmap=cmap, interpolation="none")
    ax.figure.colorbar(image, cax=cax, label="η (numel-weighted mean)")
    ax.set_yticks(range(len(targets)), targets)
    ax.set_title(f"SCE coefficients per layer (uniform would be 1/{len(targets)})")
    ax.tick_params(axis="x", labelbottom=False)
    if len(columns) <= 16 and len(targets) <= 8:
        _annotate(ax, eta)


def _annotate(ax: Axes, values: np.ndarray) -> None:
    """Write each cell's value: readable exact numbers when the grid is small."""
    middle = np.nanmean(values) if np.isfinite(values).any() else 0.0
    for (i, j), value in np.ndenumerate(values):
        if math.isfinite(value):
            colour = "black" if value > middle else "white"
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8, color=colour)


def _draw_fractions(ax: Axes, columns: list[str], selected: np.ndarray, erased: np.ndarray) -> None:
    xs = np.arange(len(columns))
    ax.plot(xs, selected, marker="o", markersize=3, label="selected (of elements)")
    ax.plot(xs, erased, marker="s", markersize=3, label="erased (of non-zero deltas)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("fraction")
    ax.set_xlabel("layer")
    ax.set_xticks(xs, columns, rotation=90 if len(columns) > 24 else 0, fontsize="small")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="best")
