"""The two effects a fusion run is for, from each seed's rows: fusion (a target against
SFT) and merge (a merge against the best single target), as per-seed differences with
their mean ± std over seeds, as Markdown tables and in words. Exact match is the skill's
lm-eval column (`fusion.evaluate.lm_eval_tasks.exact_match_column`), loss the held-out reply loss."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from fusechat_merge.report.stats import mean_std
from fusion.evaluate.lm_eval_tasks import exact_match_column, right_mass_column

TRANSFER_METRICS = ("kl", "cover")  # fusion.evaluate.transfer: lower KL and higher cover are closer to the source


def _seed_values(rows: Sequence[Mapping[str, Any]], skills: Sequence[str]) -> dict[tuple[str, str], dict[str, float]]:
    """(model, skill) → {"em", "loss", "kl:SOURCE", "cover:SOURCE"} of one seed: exact match
    from the skill's lm-eval column, loss from the held-out reply loss, the transfer measure
    against each source."""
    values: dict[tuple[str, str], dict[str, float]] = {}
    columns = {exact_match_column(s): s for s in skills}
    masses = {right_mass_column(s): s for s in skills}
    for row in rows:
        model, skill = row["model"], row["skill"]
        if "transfer_kl" in row:
            if skill in skills:
                cell = values.setdefault((model, skill), {})
                for name in TRANSFER_METRICS:
                    if row.get(f"transfer_{name}") is not None:
                        cell[f"{name}:{row['source']}"] = float(row[f"transfer_{name}"])
        elif "value" in row and skill in columns:
            values.setdefault((model, columns[skill]), {})["em"] = float(row["value"])
        elif "value" in row and skill in masses:
            values.setdefault((model, masses[skill]), {})["mass"] = float(row["value"])
        elif "loss" in row and skill in skills:
            values.setdefault((model, skill), {})["loss"] = float(row["loss"])
    return values


def _kinds(per_seed: Sequence[Sequence[Mapping[str, Any]]]) -> dict[str, str]:
    return {r["model"]: r["kind"] for rows in per_seed for r in rows}


def _stat(diffs: Sequence[float | None]) -> dict[str, float | None]:
    """Mean and sample std over seeds (None where a seed lacks the value)."""
    values = [d for d in diffs if d is not None]
    if not diffs or len(values) < len(diffs):
        return {"mean": None, "std": None}
    mean, std = mean_std(values)
    return {"mean": mean, "std": std}


def _mean(values: Sequence[float | None]) -> float | None:
    """The mean over seeds (None where a seed lacks the value)."""
    return None if not values or None in values else statistics.fmean(v for v in values if v is not None)


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
      ``loss`` target − SFT (lower is better); where the rows hold the transfer measure
      against that skill's own source, ``kl`` and ``cover`` target − SFT (lower KL and
      higher cover: closer to the source) with both sides' means (``kl_sft``, ``kl_model``).
    * merge: each merge against the best single target of the same seed, per skill and on
      the mean over ``skills`` (``em``: merge − best; ``kept``: merge / best; ``loss``:
      merge − lowest)."""
    kinds = _kinds(per_seed)
    targets = [m for m, k in kinds.items() if k == "target"]
    merges = [m for m, k in kinds.items() if k == "merge"]
    seeds = [_seed_values(rows, skills) for rows in per_seed]
    fusion: list[dict[str, Any]] = []
    if "sft" in kinds:
        source_of = {k: s for s, k in reversed(list(own_skills.items()))}  # a skill's (first) own source
        pairs = [(f"target:{s}", k, s) for s, k in own_skills.items() if f"target:{s}" in kinds]
        pairs += [("multi", k, source_of.get(k)) for k in skills if "multi" in kinds]
        for model, skill, source in pairs:
            entry = {"model": model, "against": "sft", "skill": skill, "source": source, **{
                metric: _stat([_diff(v.get((model, skill)), v.get(("sft", skill)), metric) for v in seeds])
                for metric in ("em", "loss", "mass")}}
            for metric in TRANSFER_METRICS if source is not None else ():
                name = f"{metric}:{source}"
                entry[metric] = _stat([_diff(v.get((model, skill)), v.get(("sft", skill)), name) for v in seeds])
                entry[f"{metric}_sft"] = _mean([v.get(("sft", skill), {}).get(name) for v in seeds])
                entry[f"{metric}_model"] = _mean([v.get((model, skill), {}).get(name) for v in seeds])
            fusion.append(entry)
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
        lines += ["Fusion effect (target − SFT on its source's own skill; Multi − SFT on each skill; "
                  "Δ KL and Δ cover: the transfer measure against that skill's own source):", "",
                  "| model | skill | Δ EM | Δ loss | Δ KL | Δ cover | Δ right mass |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {e['model']} | {e['skill']} | {pm(e['em'])} | {pm(e['loss'], 4)} | {pm(e.get('kl'))} | "
                  f"{pm(e.get('cover'))} | {pm(e.get('mass'))} |" for e in effects["fusion"]]
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
    for e in effects.get("fusion", []):
        mass = e.get("mass") or {}
        if mass.get("mean") is None:
            continue
        word = {1: "puts more", -1: "puts less", 0: "puts as much"}[_shows(mass)]
        than = "as" if _shows(mass) == 0 else "than"
        out.append(f"{e['model']} {word} probability on right first answer tokens of {e['skill']} {than} SFT "
                   f"({mass['mean']:+.3f} ± {mass['std']:.3f}).")
    for e in effects.get("fusion", []):
        kl = e.get("kl") or {}
        if kl.get("mean") is None or e.get("kl_sft") is None or e.get("kl_model") is None:
            continue
        closer = {-1: "is closer to", 1: "is farther from", 0: "is as close to"}[_shows(kl)]
        than = "as" if _shows(kl) == 0 else "than"
        cover = e.get("cover") or {}
        covered = (f"; cover {e['cover_sft']:.2f} → {e['cover_model']:.2f} ({cover['mean']:+.2f} ± "
                   f"{cover['std']:.2f})" if cover.get("mean") is not None and e.get("cover_sft") is not None
                   and e.get("cover_model") is not None else "")
        out.append(f"{e['model']} on {e['skill']} {closer} its source {e['source']} {than} SFT: KL "
                   f"{e['kl_sft']:.2f} → {e['kl_model']:.2f} ({kl['mean']:+.2f} ± {kl['std']:.2f}){covered}.")
    for e in effects.get("merge", []):
        kept = e.get("kept") or {}
        if e["skill"] != "mean" or kept.get("mean") is None:
            continue
        word = "keeps most" if kept["mean"] >= 0.5 else "loses most"
        out.append(f"{e['model']} {word} of the best single target's exact match on the mean over skills "
                   f"(kept {kept['mean']:.2f} ± {kept['std']:.2f}).")
    return out
