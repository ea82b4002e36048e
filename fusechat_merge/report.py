"""Reports of what SCE decided, per tensor (CSV now; plots come with the pipeline)."""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path

from fusechat_merge.stats_sink import TensorStats


def write_sce_report(rows: Sequence[TensorStats], out_dir: str | os.PathLike[str]) -> Path:
    """Write ``sce_report.csv`` (one row per tensor and target), atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "sce_report.csv"
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as handle:
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
    tmp.replace(path)
    return path


def mean_coefficients(rows: Sequence[TensorStats]) -> dict[str, float]:
    """Mean η of each target over all tensors (a one-line summary of a merge)."""
    totals: dict[str, list[float]] = {}
    for row in rows:
        for model, eta in zip(row.models, row.stats.coefficients, strict=True):
            totals.setdefault(model, []).append(eta)
    return {model: sum(v) / len(v) for model, v in totals.items()}
