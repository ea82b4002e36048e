"""Figures on matplotlib's Agg canvas (no pyplot, no display, no global state), imported
lazily so that the CLI starts fast, and saved as PNG atomically."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from fusion.artifacts.atomic import atomic_path

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DPI = 120


def new_figure(width: float, height: float) -> Figure:
    """A figure on an Agg canvas: renders without a display or pyplot's global state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Figure, path: Path) -> Path:
    """Save ``fig`` as PNG atomically (format given: the temporary name has no .png)."""
    with atomic_path(path) as tmp, tmp.open("wb") as handle:
        fig.savefig(handle, format="png", dpi=DPI)
    return path
