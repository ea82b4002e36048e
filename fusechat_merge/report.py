"""Reports: what SCE decided per tensor and layer, and how merge methods compare.

Every file is written atomically (a unique temporary file, then a rename), so a reader
never sees half a report and an interrupted run leaves the previous one intact.
Plots use matplotlib's Agg canvas directly (no pyplot, no display, no global state),
imported lazily so that the CLI starts fast.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import statistics
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from fusechat_merge.stats_sink import TensorStats
from fusion.artifacts.atomic import atomic_path

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.container import BarContainer
    from matplotlib.figure import Figure

SCE_CSV = "sce_report.csv"
SCE_PNG = "sce_coefficients.png"
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
RESULTS_PNG = "results.png"

_DPI = 120
# Layer index in the usual layouts: llama/mistral/qwen2 (layers.N), gpt2 (h.N), others.
_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\.")
_EMBED = ("embed_tokens", "wte", "word_embeddings", "embed_in")
_LM_HEAD = ("lm_head", "embed_out")
_FINAL = ("norm", "ln_f", "final_layernorm", "final_layer_norm")
# Column order around the numbered layers.
_BEFORE = ("embed",)
_AFTER = ("final", "lm_head", "other")


# --------------------------------------------------------------------------- files


@contextmanager
def _atomic_open(path: Path, *, binary: bool = False) -> Iterator[IO[Any]]:
    """A handle on a temporary sibling of ``path``, renamed over it on success."""
    with atomic_path(path) as tmp, (
        tmp.open("wb") if binary else tmp.open("w", encoding="utf-8", newline="")
    ) as handle:
        yield handle


def _new_figure(width: float, height: float) -> Figure:
    """A figure on an Agg canvas: renders without a display or pyplot's global state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save_png(fig: Figure, path: Path) -> Path:
    """Save ``fig`` as PNG atomically (format given: the temporary name has no .png)."""
    with _atomic_open(path, binary=True) as handle:
        fig.savefig(handle, format="png", dpi=_DPI)
    return path


# --------------------------------------------------------------------------- SCE report


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
    with _atomic_open(path) as handle:
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
        fig = _new_figure(6, 2)
        fig.text(0.5, 0.5, "no fusechat_sce tensors were merged", ha="center", va="center")
        return _save_png(fig, path)
    targets, columns, eta = coefficients_by_layer(rows)
    _, selected, erased = fractions_by_layer(rows)
    width = min(max(6.0, 0.3 * len(columns) + 3.0), 30.0)
    height = 3.2 + 0.4 * len(targets)
    fig = _new_figure(width, height)
    grid = fig.add_gridspec(2, 2, width_ratios=(1, 0.025), height_ratios=(len(targets) + 1, 3))
    heat = fig.add_subplot(grid[0, 0])
    _draw_heatmap(heat, fig.add_subplot(grid[0, 1]), targets, columns, eta)
    _draw_fractions(fig.add_subplot(grid[1, 0], sharex=heat), columns, selected, erased)
    return _save_png(fig, path)


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


# --------------------------------------------------------------------------- results


def aggregate_seeds(per_seed: Sequence[Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """Mean and sample std (0 for one seed) of loss and exact match per (model, skill),
    in first-seen order: the rows ``write_results_report`` takes.

    Raises ``ValueError`` on inputs that would make the statistics lie: a (model,
    skill) twice in one seed, a model whose kind changes, exact match present in
    some seeds only.
    """
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for seed, entries in enumerate(per_seed):
        seen: set[tuple[str, str]] = set()
        for entry in entries:
            key = (entry["model"], entry["skill"])
            if key in seen:
                raise ValueError(f"seed {seed}: {key[0]} on {key[1]} appears twice")
            seen.add(key)
            groups.setdefault(key, []).append(entry)
    return [_aggregate(model, skill, entries) for (model, skill), entries in groups.items()]


def _aggregate(model: str, skill: str, entries: list[Mapping[str, Any]]) -> dict[str, Any]:
    kinds = {e["kind"] for e in entries}
    if len(kinds) > 1:
        raise ValueError(f"{model}: kind differs between seeds: {sorted(kinds)}")
    if "value" in entries[0]:  # an lm-eval metric ("task/metric"), not a held-out skill
        if any("value" not in e for e in entries):
            raise ValueError(f"{model} on {skill}: an lm-eval metric in some seeds only")
        mean, std = _mean_std([float(e["value"]) for e in entries])
        return {"model": model, "kind": entries[0]["kind"], "skill": skill, "metric": True,
                "value_mean": mean, "value_std": std, "seeds": len(entries)}
    losses = [float(e["loss"]) for e in entries]
    ems = [e.get("exact_match") for e in entries]
    if any(v is None for v in ems) and not all(v is None for v in ems):
        raise ValueError(f"{model} on {skill}: exact_match missing in some seeds only")
    em_mean, em_std = (None, None) if ems[0] is None else _mean_std([float(v) for v in ems])
    loss_mean, loss_std = _mean_std(losses)
    return {
        "model": model,
        "kind": entries[0]["kind"],
        "skill": skill,
        "loss_mean": loss_mean,
        "loss_std": loss_std,
        "em_mean": em_mean,
        "em_std": em_std,
        "seeds": len(entries),
    }


def _mean_std(values: list[float]) -> tuple[float, float]:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.fmean(values), std


def _grid(
    results: Sequence[Mapping[str, Any]],
) -> tuple[list[str], list[str], dict[tuple[str, str], Mapping[str, Any]]]:
    """Models and skills in first-seen order, and each (model, skill) result."""
    cells: dict[tuple[str, str], Mapping[str, Any]] = {}
    for result in results:
        key = (result["model"], result["skill"])
        if key in cells:
            raise ValueError(f"{key[0]} on {key[1]} appears twice in the results")
        cells[key] = result
    models = list(dict.fromkeys(r["model"] for r in results))
    skills = list(dict.fromkeys(r["skill"] for r in results))
    return models, skills, cells


def _is_metric(results: Sequence[Mapping[str, Any]], skill: str) -> bool:
    """Whether the column ``skill`` is an lm-eval metric (``task/metric``)."""
    return any(r["skill"] == skill and r.get("metric") for r in results)


def _has_em(results: Sequence[Mapping[str, Any]], skill: str) -> bool:
    return any(r["skill"] == skill and r.get("em_mean") is not None for r in results)


def _pm(mean: float | None, std: float | None, digits: int) -> str:
    if mean is None:
        return "-"
    return f"{mean:.{digits}f} ± {(std or 0.0):.{digits}f}"


def _table(results: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and rows shared by the Markdown and terminal tables (model, kind, and
    per skill ``loss ± std``, plus ``EM ± std`` where the skill has exact match)."""
    models, skills, cells = _grid(results)
    kinds = {m: next(r["kind"] for r in results if r["model"] == m) for m in models}
    header = ["model", "kind"]
    for skill in skills:
        if _is_metric(results, skill):
            header.append(skill)
            continue
        header += [f"{skill} loss"] + ([f"{skill} EM"] if _has_em(results, skill) else [])
    body = []
    for model in models:
        line = [model, kinds[model]]
        for skill in skills:
            cell = cells.get((model, skill), {})
            if _is_metric(results, skill):
                line.append(_pm(cell.get("value_mean"), cell.get("value_std"), 3))
                continue
            line.append(_pm(cell.get("loss_mean"), cell.get("loss_std"), 4))
            if _has_em(results, skill):
                line.append(_pm(cell.get("em_mean"), cell.get("em_std"), 3))
        body.append(line)
    return header, body


def lm_eval_rows(model: str, kind: str, metrics: Mapping[str, Mapping[str, float]]) -> list[dict[str, Any]]:
    """Result rows of one model's lm-eval metrics (``{task: {metric: value}}``): one
    ``task/metric`` column each; standard errors are left to lm-eval's own JSON."""
    return [{"model": model, "kind": kind, "skill": f"{task}/{name}", "value": value}
            for task, values in metrics.items() for name, value in values.items()
            if not name.endswith("_stderr") and isinstance(value, int | float)]


def format_results_table(results: Sequence[Mapping[str, Any]]) -> str:
    """The results table as aligned plain text for a terminal (numbers right-aligned)."""
    header, body = _table(results)
    widths = [max(len(line[k]) for line in [header, *body]) for k in range(len(header))]

    def fmt(line: list[str]) -> str:
        pairs = enumerate(zip(line, widths, strict=True))
        return "  ".join(c.ljust(w) if k < 2 else c.rjust(w) for k, (c, w) in pairs)

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(header), rule, *(fmt(line) for line in body)])


def _markdown(results: Sequence[Mapping[str, Any]], title: str) -> str:
    header, body = _table(results)

    def row(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    align = ["---", "---"] + ["---:"] * (len(header) - 2)
    seeds = sorted({int(r["seeds"]) for r in results})
    span = str(seeds[0]) if len(seeds) == 1 else f"{seeds[0]}–{seeds[-1]}"
    note = (f"Mean ± sample standard deviation over {span} seed(s); EM is exact match; "
            "`task/metric` columns are lm-evaluation-harness metrics.")
    lines = [f"# {title}", "", row(header), "| " + " | ".join(align) + " |"]
    return "\n".join([*lines, *(row(b) for b in body), "", note, ""])


def _json_default(value: Any) -> Any:
    """numpy scalars and paths, which results built from tensors often carry."""
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_results_report(
    results: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike[str], *, title: str,
    effects: Mapping[str, Any] | None = None, diagnostics: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """Write ``results.json``, ``results.md`` and ``results.png`` for a comparison of
    merge methods; returns them as ``{"json", "md", "png"}``. ``effects``
    (`compute_effects`) and ``diagnostics`` (`fusechat_merge.diagnostics`) go into both
    the JSON and the Markdown when given."""
    if not results:
        raise ValueError("no results to report")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out_dir / RESULTS_JSON,
        "md": out_dir / RESULTS_MD,
        "png": out_dir / RESULTS_PNG,
    }
    document: dict[str, Any] = {"title": title, "results": [dict(r) for r in results]}
    extra = ""
    if effects is not None:
        document["effects"] = dict(effects)
        extra += "\n## Effects\n\n" + format_effects(effects) + "\n"
    if diagnostics is not None:
        from fusechat_merge.diagnostics import format_diagnostics

        document["diagnostics"] = dict(diagnostics)
        extra += "\n## Diagnostics\n\n" + format_diagnostics(diagnostics) + "\n"
    with _atomic_open(paths["json"]) as handle:
        json.dump(document, handle, indent=2, default=_json_default)
        handle.write("\n")
    with _atomic_open(paths["md"]) as handle:
        handle.write(_markdown(results, title) + extra)
    plot_results(results, paths["png"], title=title)
    return paths


def plot_results(results: Sequence[Mapping[str, Any]], path: Path, *, title: str) -> Path:
    """Grouped bars (skills on x, one bar per model) of loss, of EM for the skills that
    have it, and of the lm-eval metrics; error bars are the std over seeds."""
    models, skills, cells = _grid(results)
    metrics = [s for s in skills if _is_metric(results, s)]
    held_out = [s for s in skills if s not in metrics]
    panels = [(held_out, "loss_mean", "loss_std", "loss (lower is better)")] if held_out else []
    em_skills = [s for s in held_out if _has_em(results, s)]
    if em_skills:
        panels.append((em_skills, "em_mean", "em_std", "exact match (higher is better)"))
    if metrics:
        panels.append((metrics, "value_mean", "value_std", "lm-eval metric"))
    width = min(max(6.0, 0.4 * len(skills) * len(models) + 4.0), 30.0)
    fig = _new_figure(width, 3.2 * len(panels) + 0.6)
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    handles: list[BarContainer] = []
    for ax, (panel_skills, mean_key, std_key, label) in zip(axes, panels, strict=True):
        bars = _draw_bars(ax, models, panel_skills, cells, mean_key, std_key)
        handles = handles or bars
        ax.set_ylabel(label)
    kinds = {m: next(r["kind"] for r in results if r["model"] == m) for m in models}
    labels = [f"{m} ({kinds[m]})" for m in models]
    axes[0].legend(handles, labels, fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.suptitle(title)
    return _save_png(fig, path)


def _draw_bars(
    ax: Axes,
    models: list[str],
    skills: list[str],
    cells: Mapping[tuple[str, str], Mapping[str, Any]],
    mean_key: str,
    std_key: str,
) -> list[BarContainer]:
    """One bar group per skill; returns one container per model (legend handles)."""
    import matplotlib as mpl

    cmap = mpl.colormaps["tab10" if len(models) <= 10 else "tab20"]
    step = 0.8 / max(1, len(models))
    xs = np.arange(len(skills))
    bars = []
    for i, model in enumerate(models):
        means, stds = [], []
        for skill in skills:
            cell = cells.get((model, skill), {})
            mean, std = cell.get(mean_key), cell.get(std_key)
            means.append(math.nan if mean is None else float(mean))
            stds.append(0.0 if std is None else float(std))
        offset = (i - (len(models) - 1) / 2) * step
        colour = cmap(i % cmap.N)
        bars.append(ax.bar(xs + offset, means, step, yerr=stds, capsize=3, color=colour))
    ax.set_xticks(xs, skills)
    ax.set_xlim(-0.5, len(skills) - 0.5)  # missing bars must not shrink a group
    ax.grid(axis="y", alpha=0.3)
    return bars


# --------------------------------------------------------------------------- effects


def em_column(skill: str) -> str:
    """The lm-eval exact-match column of a held-out skill (`fusion.lm_eval_tasks` names)."""
    return f"fusechat_{skill}_gen/exact_match"


def _seed_values(rows: Sequence[Mapping[str, Any]], skills: Sequence[str]) -> dict[tuple[str, str], dict[str, float]]:
    """(model, skill) → {"em", "loss"} of one seed: exact match from the skill's lm-eval
    column (else our own evaluation's), loss from the held-out reply loss."""
    values: dict[tuple[str, str], dict[str, float]] = {}
    columns = {em_column(s): s for s in skills}
    for row in rows:
        model, skill = row["model"], row["skill"]
        if "value" in row and skill in columns:
            values.setdefault((model, columns[skill]), {})["em"] = float(row["value"])
        elif "loss" in row and skill in skills:
            cell = values.setdefault((model, skill), {})
            cell["loss"] = float(row["loss"])
            if row.get("exact_match") is not None:
                cell.setdefault("em", float(row["exact_match"]))
    return values


def _kinds(per_seed: Sequence[Sequence[Mapping[str, Any]]]) -> dict[str, str]:
    return {r["model"]: r["kind"] for rows in per_seed for r in rows}


def _stat(diffs: Sequence[float | None]) -> dict[str, float | None]:
    """Mean and sample std over seeds (None where a seed lacks the value)."""
    values = [d for d in diffs if d is not None]
    if not diffs or len(values) < len(diffs):
        return {"mean": None, "std": None}
    mean, std = _mean_std(values)
    return {"mean": mean, "std": std}


def _diff(a: Mapping[str, float] | None, b: Mapping[str, float] | None, metric: str) -> float | None:
    if a is None or b is None or metric not in a or metric not in b:
        return None
    return a[metric] - b[metric]


def _score(values: Mapping[tuple[str, str], Mapping[str, float]], model: str, metric: str,
           over: Sequence[str]) -> float | None:
    """A model's mean ``metric`` over the skills ``over`` in one seed (None: one is missing)."""
    cells = [values.get((model, s), {}).get(metric) for s in over]
    return None if not cells or any(c is None for c in cells) else statistics.fmean(c for c in cells if c is not None)


def _against_best(values: Mapping[tuple[str, str], Mapping[str, float]], model: str, targets: Sequence[str],
                  over: Sequence[str]) -> dict[str, float | None]:
    """One seed's merge against that seed's best single target on the skills ``over``."""
    out: dict[str, float | None] = {"em": None, "kept": None, "loss": None}
    own_em, target_em = _score(values, model, "em", over), [_score(values, t, "em", over) for t in targets]
    if own_em is not None and target_em and all(e is not None for e in target_em):
        best = max(e for e in target_em if e is not None)
        out["em"] = own_em - best
        out["kept"] = own_em / best if best > 0 else None
    own_loss, target_loss = _score(values, model, "loss", over), [_score(values, t, "loss", over) for t in targets]
    if own_loss is not None and target_loss and all(e is not None for e in target_loss):
        out["loss"] = own_loss - min(e for e in target_loss if e is not None)
    return out


def compute_effects(per_seed: Sequence[Sequence[Mapping[str, Any]]], own_skills: Mapping[str, str],
                    skills: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
    """The two effects, per seed then mean ± sample std over seeds (``per_seed``: each
    seed's rows, base models included, as `aggregate_seeds` takes them).

    * fusion: each target against SFT on its source's own skill (``own_skills``: source →
      skill), and Multi against SFT on every skill; ``em`` target − SFT (higher is better),
      ``loss`` target − SFT (lower is better).
    * merge: each merge against the best single target of the same seed, per skill and on
      the mean over ``skills`` (``em``: merge − best; ``kept``: merge / best; ``loss``:
      merge − lowest)."""
    kinds = _kinds(per_seed)
    targets = [m for m, k in kinds.items() if k == "target"]
    merges = [m for m, k in kinds.items() if k == "merge"]
    seeds = [_seed_values(rows, skills) for rows in per_seed]
    fusion: list[dict[str, Any]] = []
    if "sft" in kinds:
        pairs = [(f"target:{s}", k) for s, k in own_skills.items() if f"target:{s}" in kinds]
        pairs += [("multi", k) for k in skills if "multi" in kinds]
        for model, skill in pairs:
            fusion.append({"model": model, "against": "sft", "skill": skill, **{
                metric: _stat([_diff(v.get((model, skill)), v.get(("sft", skill)), metric) for v in seeds])
                for metric in ("em", "loss")}})
    merge: list[dict[str, Any]] = []
    for model in merges:
        for skill in [*skills, "mean"]:
            over = list(skills) if skill == "mean" else [skill]
            per = [_against_best(v, model, targets, over) for v in seeds]
            merge.append({"model": model, "against": "best target", "skill": skill,
                          **{m: _stat([p[m] for p in per]) for m in ("em", "kept", "loss")}})
    return {"fusion": fusion, "merge": merge}


def format_effects(effects: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
    """The two effects as Markdown tables (also readable in a terminal)."""
    def pm(cell: Mapping[str, Any] | None, digits: int = 3) -> str:
        if not cell or cell.get("mean") is None:
            return "-"
        return f"{cell['mean']:+.{digits}f} ± {cell['std']:.{digits}f}"

    lines: list[str] = []
    if effects.get("fusion"):
        lines += ["Fusion effect (target − SFT on its source's own skill; Multi − SFT on each skill):", "",
                  "| model | skill | Δ EM | Δ loss |", "|---|---|---:|---:|"]
        lines += [f"| {e['model']} | {e['skill']} | {pm(e['em'])} | {pm(e['loss'], 4)} |" for e in effects["fusion"]]
        lines.append("")
    if effects.get("merge"):
        lines += ["Merge effect (merge − best single target of the same seed; kept = merge EM / best EM):", "",
                  "| merge | skill | Δ EM | kept | Δ loss |", "|---|---|---:|---:|---:|"]
        lines += [f"| {e['model']} | {e['skill']} | {pm(e['em'])} | {pm(e['kept'], 2).lstrip('+')} | "
                  f"{pm(e['loss'], 4)} |" for e in effects["merge"]]
        lines.append("")
    if lines:
        lines.append("Mean ± sample standard deviation over seeds of the per-seed differences.")
        verdicts = effect_verdicts(effects)
        if verdicts:
            lines += ["", "In words (an effect shows when its mean is beyond one standard deviation of zero):", ""]
            lines += [f"* {v}" for v in verdicts]
    return "\n".join(lines)


def _shows(cell: Mapping[str, Any] | None) -> int:
    """+1 / -1 when the mean is beyond one std of zero (and nonzero), 0 otherwise."""
    if not cell or cell.get("mean") is None:
        return 0
    mean, std = cell["mean"], cell.get("std") or 0.0
    return 0 if abs(mean) <= std or mean == 0 else (1 if mean > 0 else -1)


def effect_verdicts(effects: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[str]:
    """One plain sentence per fusion effect and per merge on the mean over skills."""
    out: list[str] = []
    for e in effects.get("fusion", []):
        em = e.get("em") or {}
        if em.get("mean") is None:
            continue
        word = {1: "beats", -1: "falls behind", 0: "is level with"}[_shows(em)]
        out.append(f"{e['model']} {word} SFT on {e['skill']} exact match "
                   f"({em['mean']:+.3f} ± {em['std']:.3f}).")
    for e in effects.get("merge", []):
        kept = e.get("kept") or {}
        if e["skill"] != "mean" or kept.get("mean") is None:
            continue
        word = "keeps most" if kept["mean"] >= 0.5 else "loses most"
        out.append(f"{e['model']} {word} of the best single target's exact match on the mean over skills "
                   f"(kept {kept['mean']:.2f} ± {kept['std']:.2f}).")
    return out
