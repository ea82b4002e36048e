"""The results of a run: rows per (model, skill) aggregated over seeds, shown as a
terminal table, written as ``results.json``, ``results.md`` and ``results.png``.

A row is a held-out skill's reply loss (``loss``, `fusion.evaluate.heldout`), an lm-eval metric
(``value``, column ``task/metric``, `lm_eval_rows`), or the transfer measure of a model
against one source on one skill (``source``, ``transfer_kl``, ``transfer_cover``,
`fusion.evaluate.transfer`), shown in a table of its own.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fusechat_merge.report.figures import new_figure, save_png
from fusechat_merge.report.stats import mean_std
from fusion.artifacts.atomic import write_text_atomic

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.container import BarContainer

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
RESULTS_PNG = "results.png"


def aggregate_seeds(per_seed: Sequence[Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """Mean and sample std (0 for one seed) of loss or metric value per (model, skill),
    in first-seen order: the rows ``write_results_report`` takes.

    Raises ``ValueError`` on inputs that would make the statistics lie: a (model,
    skill) twice in one seed, a model whose kind changes, an lm-eval metric present in
    some seeds only.
    """
    groups: dict[tuple[str, str, str | None], list[Mapping[str, Any]]] = {}
    for seed, entries in enumerate(per_seed):
        seen: set[tuple[str, str, str | None]] = set()
        for entry in entries:
            key = (entry["model"], entry["skill"], entry.get("source"))
            if key in seen:
                against = f" against {key[2]}" if key[2] is not None else ""
                raise ValueError(f"seed {seed}: {key[0]} on {key[1]}{against} appears twice")
            seen.add(key)
            groups.setdefault(key, []).append(entry)
    return [_aggregate(model, skill, entries) for (model, skill, _), entries in groups.items()]


def _aggregate(model: str, skill: str, entries: list[Mapping[str, Any]]) -> dict[str, Any]:
    kinds = {e["kind"] for e in entries}
    if len(kinds) > 1:
        raise ValueError(f"{model}: kind differs between seeds: {sorted(kinds)}")
    row = {"model": model, "kind": entries[0]["kind"], "skill": skill}
    if "source" in entries[0]:  # the transfer measure against one source (fusion.evaluate.transfer)
        row["source"] = entries[0]["source"]
        if any("source" not in e for e in entries):
            raise ValueError(f"{model} on {skill}: a transfer measure in some seeds only")
        out: dict[str, Any] = {**row, "transfer": True, "seeds": len(entries)}
        for name in ("kl", "cover"):
            values = [e[f"transfer_{name}"] for e in entries]
            mean, std = mean_std([float(v) for v in values]) if None not in values else (None, None)
            out[f"{name}_mean"], out[f"{name}_std"] = mean, std
        out["positions"] = int(entries[0].get("positions") or 0)
        return out
    if "value" in entries[0]:  # an lm-eval metric ("task/metric"), not a held-out skill
        if any("value" not in e for e in entries):
            raise ValueError(f"{model} on {skill}: an lm-eval metric in some seeds only")
        mean, std = mean_std([float(e["value"]) for e in entries])
        return {**row, "metric": True, "value_mean": mean, "value_std": std, "seeds": len(entries)}
    loss_mean, loss_std = mean_std([float(e["loss"]) for e in entries])
    return {**row, "loss_mean": loss_mean, "loss_std": loss_std, "seeds": len(entries)}


def lm_eval_rows(model: str, kind: str, metrics: Mapping[str, Mapping[str, float]]) -> list[dict[str, Any]]:
    """Result rows of one model's lm-eval metrics (``{task: {metric: value}}``): one
    ``task/metric`` column each; standard errors are left to lm-eval's own JSON."""
    return [{"model": model, "kind": kind, "skill": f"{task}/{name}", "value": value}
            for task, values in metrics.items() for name, value in values.items()
            if not name.endswith("_stderr") and isinstance(value, int | float)]


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


def _kinds(results: Sequence[Mapping[str, Any]], models: Sequence[str]) -> dict[str, str]:
    return {m: next(r["kind"] for r in results if r["model"] == m) for m in models}


def _pm(mean: float | None, std: float | None, digits: int) -> str:
    if mean is None:
        return "-"
    return f"{mean:.{digits}f} ± {(std or 0.0):.{digits}f}"


def scores(results: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The results of the main table: held-out losses and lm-eval metrics."""
    return [r for r in results if not r.get("transfer")]


def transfer_results(results: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The transfer measure's results (per model, skill and source)."""
    return [r for r in results if r.get("transfer")]


def transfer_pairs(results: Sequence[Mapping[str, Any]],
                   own_skills: Mapping[str, str] | None = None) -> list[tuple[str, str]]:
    """The (skill, source) columns of the transfer table: each source on its own skill
    (``own_skills``: source → skill) where any is known, else every pair measured."""
    pairs = list(dict.fromkeys((r["skill"], r["source"]) for r in transfer_results(results)))
    own = [(skill, source) for skill, source in pairs if (own_skills or {}).get(source) == skill]
    return own or pairs


def _transfer_table(results: Sequence[Mapping[str, Any]],
                    own_skills: Mapping[str, str] | None = None) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the transfer table: per (skill, source) column group the mean KL
    (source ‖ model) per position and the share of the source's mass in the model's top-K."""
    rows = transfer_results(results)
    pairs = transfer_pairs(results, own_skills)
    cells = {(r["model"], r["skill"], r["source"]): r for r in rows}
    models = list(dict.fromkeys(r["model"] for r in rows))
    kinds = {r["model"]: r["kind"] for r in rows}
    header = ["model", "kind"]
    for skill, source in pairs:
        header += [f"{skill} ← {source} KL", f"{skill} ← {source} cover"]
    body = []
    for model in models:
        line = [model, kinds[model]]
        for skill, source in pairs:
            cell = cells.get((model, skill, source), {})
            line += [_pm(cell.get("kl_mean"), cell.get("kl_std"), 3), _pm(cell.get("cover_mean"), cell.get("cover_std"), 3)]
        body.append(line)
    return header, body


def _table(results: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and rows shared by the Markdown and terminal tables (model, kind, and per
    column ``loss ± std`` for a held-out skill, ``value ± std`` for an lm-eval metric)."""
    results = scores(results)
    models, skills, cells = _grid(results)
    kinds = _kinds(results, models)
    metric = {skill: _is_metric(results, skill) for skill in skills}
    header = ["model", "kind", *(skill if metric[skill] else f"{skill} loss" for skill in skills)]
    body = []
    for model in models:
        line = [model, kinds[model]]
        for skill in skills:
            cell = cells.get((model, skill), {})
            if metric[skill]:
                line.append(_pm(cell.get("value_mean"), cell.get("value_std"), 3))
            else:
                line.append(_pm(cell.get("loss_mean"), cell.get("loss_std"), 4))
        body.append(line)
    return header, body


def format_results_table(results: Sequence[Mapping[str, Any]]) -> str:
    """The results table as aligned plain text for a terminal (numbers right-aligned)."""
    return _plain(*_table(results))


def format_transfer_table(results: Sequence[Mapping[str, Any]], own_skills: Mapping[str, str] | None = None) -> str:
    """The transfer table as aligned plain text ("" without transfer results)."""
    if not transfer_results(results):
        return ""
    return _plain(*_transfer_table(results, own_skills))


def _plain(header: list[str], body: list[list[str]]) -> str:
    widths = [max(len(line[k]) for line in [header, *body]) for k in range(len(header))]

    def fmt(line: list[str]) -> str:
        pairs = enumerate(zip(line, widths, strict=True))
        return "  ".join(c.ljust(w) if k < 2 else c.rjust(w) for k, (c, w) in pairs)

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(header), rule, *(fmt(line) for line in body)])


def _markdown_table(header: list[str], body: list[list[str]]) -> list[str]:
    def row(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    align = ["---", "---"] + ["---:"] * (len(header) - 2)
    return [row(header), "| " + " | ".join(align) + " |", *(row(b) for b in body)]


TRANSFER_NOTE = ("KL: mean over the pivot positions of held-out conversations where the alignment gives the "
                 "source a distribution of KL(source ‖ model), the source's aligned top-K renormalised as the "
                 "fusion loss sees it (lower: closer to the source); cover: the share of that distribution's "
                 "mass on the model's own top-K (higher: closer).")


def _markdown(results: Sequence[Mapping[str, Any]], title: str, own_skills: Mapping[str, str] | None = None) -> str:
    seeds = sorted({int(r["seeds"]) for r in results})
    span = str(seeds[0]) if len(seeds) == 1 else f"{seeds[0]}–{seeds[-1]}"
    note = (f"Mean ± sample standard deviation over {span} seed(s); "
            "`task/metric` columns are lm-evaluation-harness metrics.")
    lines = [f"# {title}", "", *_markdown_table(*_table(results)), "", note, ""]
    if transfer_results(results):
        lines += ["## Transfer to the sources", "", *_markdown_table(*_transfer_table(results, own_skills)), "",
                  TRANSFER_NOTE + " All pairs of skill and source are in results.json.", ""]
    return "\n".join(lines)


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
    own_skills: Mapping[str, str] | None = None,
) -> dict[str, Path]:
    """Write ``results.json``, ``results.md`` and ``results.png`` for a comparison of
    merge methods; returns them as ``{"json", "md", "png"}``. ``effects``
    (`fusechat_merge.report.effects`) and ``diagnostics`` (`fusechat_merge.diagnostics`)
    go into both the JSON and the Markdown when given; ``own_skills`` (source → skill)
    picks the transfer table's columns (`transfer_pairs`)."""
    if not results:
        raise ValueError("no results to report")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / RESULTS_JSON, "md": out_dir / RESULTS_MD, "png": out_dir / RESULTS_PNG}
    document: dict[str, Any] = {"title": title, "results": [dict(r) for r in results]}
    extra = ""
    if effects is not None:
        from fusechat_merge.report.effects import format_effects

        document["effects"] = dict(effects)
        extra += "\n## Effects\n\n" + format_effects(effects) + "\n"
    if diagnostics is not None:
        from fusechat_merge.diagnostics import format_diagnostics

        document["diagnostics"] = dict(diagnostics)
        extra += "\n## Diagnostics\n\n" + format_diagnostics(diagnostics) + "\n"
    write_text_atomic(paths["json"], json.dumps(document, indent=2, default=_json_default) + "\n")
    write_text_atomic(paths["md"], _markdown(results, title, own_skills) + extra)
    plot_results(scores(results), paths["png"], title=title)
    return paths


def plot_results(results: Sequence[Mapping[str, Any]], path: Path, *, title: str) -> Path:
    """Grouped bars (skills on x, one bar per model) of the held-out loss and of the
    lm-eval metrics; error bars are the std over seeds (the transfer measure is left out)."""
    results = scores(results)
    models, skills, cells = _grid(results)
    metrics = [s for s in skills if _is_metric(results, s)]
    held_out = [s for s in skills if s not in metrics]
    panels = [(held_out, "loss_mean", "loss_std", "loss (lower is better)")] if held_out else []
    if metrics:
        panels.append((metrics, "value_mean", "value_std", "lm-eval metric"))
    width = min(max(6.0, 0.4 * len(skills) * len(models) + 4.0), 30.0)
    fig = new_figure(width, 3.2 * len(panels) + 0.6)
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    handles: list[BarContainer] = []
    for ax, (panel_skills, mean_key, std_key, label) in zip(axes, panels, strict=True):
        bars = _draw_bars(ax, models, panel_skills, cells, mean_key, std_key)
        handles = handles or bars
        ax.set_ylabel(label)
    kinds = _kinds(results, models)
    labels = [f"{m} ({kinds[m]})" for m in models]
    axes[0].legend(handles, labels, fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.suptitle(title)
    return save_png(fig, path)


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
