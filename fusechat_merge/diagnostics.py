"""Why an effect appears or not: what the report says about the fusion itself.

* ``update``: each trained model's relative update ‖θ − θ_pivot‖ / ‖θ_pivot‖ (all
  parameters the two share, as one vector), per seed; FuseChat's regime keeps it small;
* ``alignment``: per source, the share of pivot positions that got a source distribution
  (the aligned store manifest's statistics);
* ``mince``: per source and skill, how each pivot position got its source distribution
  (`rule_shares`: at a shared token boundary, projected from inside a source token, or
  none, falling back to the pivot's own), how often MinCE picks the source over the pivot
  (sequence CE of the source below the pivot's; ties go to the pivot, as in
  `fusion.train.losses.mince_choice`); a sequence's skill is the skill its id starts with; and
  where it does, the *gold mass*: the probability the source's distribution gives the gold
  next token (near 1, the fusion term only repeats the CLM term);
* ``loss``: per trained model and seed, the mean logged CLM and fusion losses, the fusion
  term's share of the objective, (1 − λ)·L_fuse / (λ·L_CLM + (1 − λ)·L_fuse), and, as
  measured in training at the student's logits (`fusion.train.losses.gradient_parts`), its share
  of the gradient ‖G_fuse‖ / (‖G_clm‖ + ‖G_fuse‖) and the cosine of the two gradients.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def relative_update(model: str | Path, pivot: str | Path) -> float:
    """‖θ − θ_pivot‖ / ‖θ_pivot‖ over the tensors both checkpoints hold (same shapes), in
    any format transformers saves, read one tensor at a time (a 7B pair does not have to fit
    in memory at once)."""
    from fusion.artifacts.weights import Weights

    diff = base = 0.0
    shared = 0
    with Weights(model) as ours, Weights(pivot) as theirs:
        for key in ours:
            if key not in theirs or ours.shape(key) != theirs.shape(key):
                continue
            x, y = ours.get(key).double(), theirs.get(key).double()
            shared += 1
            diff += float((x - y).pow(2).sum())
            base += float(y.pow(2).sum())
    if not shared:
        raise ValueError(f"{model} and {pivot} share no tensors")
    return math.sqrt(diff) / math.sqrt(base) if base else math.inf


def alignment_statistics(aligned: str | Path) -> dict[str, Any]:
    """The aligned store's statistics (aligned and fallback fractions, entries kept)."""
    manifest = json.loads((Path(aligned) / "manifest.json").read_text(encoding="utf-8"))
    return dict((manifest.get("alignment") or {}).get("statistics") or {})


def mince_picks(aligned: str | Path, skills: Sequence[str]) -> dict[str, Any]:
    """Per skill (and ``all``): the share of sequences where MinCE picks the source, and
    the mean sequence CE of the pivot and of the source there."""
    from fusion.artifacts.aligned_store import AlignedStore

    data = AlignedStore(aligned).dataset
    ids = [str(x) for x in data["id"]]
    pivot_ce = [float(x) for x in data["seq_ce"]]
    source_ce = [float(x) for x in data["src_seq_ce"]]
    gold = [np.asarray(x, dtype=np.float64) for x in data["src_target_logprobs"]]
    rules = [np.asarray(x, dtype=np.int64) for x in data["src_rule" if "src_rule" in data.column_names
                                                             else "src_aligned"]]
    out: dict[str, Any] = {}
    for skill in [*skills, "all"]:
        rows = [i for i, name in enumerate(ids) if skill == "all" or name.startswith(skill)]
        if not rows:
            continue
        picks = [not math.isnan(source_ce[i]) and source_ce[i] < pivot_ce[i] for i in rows]
        picked = [gold[i] for i, p in zip(rows, picks, strict=True) if p]
        out[skill] = {"sequences": len(rows), "source_picked": sum(picks) / len(rows),
                      "pivot_ce": statistics.fmean(pivot_ce[i] for i in rows),
                      "source_ce": _nanmean([source_ce[i] for i in rows]),
                      "gold_mass": gold_mass(picked), "rules": rule_shares([rules[i] for i in rows])}
    return out


def rule_shares(rules: Sequence[np.ndarray]) -> dict[str, float] | None:
    """Share of pivot positions per alignment rule (`fusion.align.projection.RULES`), over the
    given sequences' ``src_rule`` columns; None without positions."""
    from fusion.align.projection import RULES

    values = np.concatenate(rules) if rules else np.zeros(0, dtype=np.int64)
    if not len(values):
        return None
    counts = np.bincount(values, minlength=len(RULES))
    return {rule: float(counts[i]) / len(values) for i, rule in enumerate(RULES)}


def gold_mass(target_logprobs: Sequence[np.ndarray]) -> float | None:
    """Mean probability a fusion target gives the gold next token, over the aligned
    positions (NaN: not aligned; -inf: gold outside the kept top-K, mass 0).

    Near 1, the fusion term teaches what the CLM term already does (a one-hot on the gold):
    what a source adds beyond the gold replies is the mass it puts elsewhere."""
    values = np.concatenate([np.asarray(v, dtype=np.float64) for v in target_logprobs]) if target_logprobs else []
    values = np.asarray(values)[~np.isnan(values)] if len(values) else np.zeros(0)
    return float(np.exp(values).mean()) if len(values) else None


def _nanmean(values: Sequence[float]) -> float | None:
    kept = [v for v in values if not math.isnan(v)]
    return statistics.fmean(kept) if kept else None


def loss_share(model: str | Path) -> dict[str, Any]:
    """A trained model's mean CLM and fusion losses (its ``train_run.json``) and the
    fusion term's share of the objective."""
    from fusion.train.output import read_train_run

    run = read_train_run(model)
    parts = run.get("loss_parts") or {}
    lm_weight, clm, fuse = run.get("lm_weight"), parts.get("clm"), parts.get("fuse")
    share = None
    if lm_weight is not None and lm_weight >= 1.0:
        share = 0.0
    elif None not in (lm_weight, clm, fuse):
        weighted = (1.0 - lm_weight) * fuse
        total = lm_weight * clm + weighted
        share = weighted / total if total else None
    return {"clm_loss": clm, "fuse_loss": fuse, "lm_weight": lm_weight, "fuse_share": share,
            "fuse_grad_share": 0.0 if lm_weight is not None and lm_weight >= 1.0 else parts.get("fuse_grad_share"),
            "grad_cosine": parts.get("grad_cosine")}


def collect_diagnostics(pivot: str, models: Mapping[int, Mapping[str, str]], aligned: Mapping[str, str],
                        skills: Sequence[str]) -> dict[str, Any]:
    """The diagnostics of a run: ``models`` maps seed → report name → trained model
    directory (targets and baselines), ``aligned`` source → aligned store."""
    update: dict[str, list[float]] = {}
    loss: dict[str, list[dict[str, Any]]] = {}
    for seed in sorted(models):
        for name, path in models[seed].items():
            update.setdefault(name, []).append(relative_update(path, pivot))
            loss.setdefault(name, []).append({"seed": seed, **loss_share(path)})
    return {
        "update": {n: {"per_seed": v, "mean": statistics.fmean(v),
                       "std": statistics.stdev(v) if len(v) > 1 else 0.0} for n, v in update.items()},
        "alignment": {s: alignment_statistics(p) for s, p in aligned.items()},
        "mince": {s: mince_picks(p, skills) for s, p in aligned.items()},
        "loss": loss,
    }


def format_diagnostics(diagnostics: Mapping[str, Any]) -> str:
    """The diagnostics as Markdown tables."""
    lines = ["Relative update ‖θ − θ_pivot‖ / ‖θ_pivot‖ (mean ± std over seeds); the fusion term's share "
             "of the objective (1−λ)·L_fuse / (λ·L_CLM + (1−λ)·L_fuse) and of the gradient at the logits "
             "‖G_fuse‖ / (‖G_clm‖ + ‖G_fuse‖), and the cosine of the two gradients (1: the fusion term "
             "pushes where the CLM term does), means over seeds:", "",
             "| model | relative update | CLM loss | fusion loss | fusion share | gradient share | cos(G_clm, G_fuse) |",
             "|---|---:|---:|---:|---:|---:|---:|"]

    def mean(entries: Sequence[Mapping[str, Any]], key: str, digits: int) -> str:
        values = [e[key] for e in entries if e.get(key) is not None]
        return f"{statistics.fmean(values):.{digits}f}" if values else "-"

    for name, u in diagnostics.get("update", {}).items():
        parts = diagnostics.get("loss", {}).get(name, [])
        lines.append(f"| {name} | {u['mean']:.4f} ± {u['std']:.4f} | {mean(parts, 'clm_loss', 4)} | "
                     f"{mean(parts, 'fuse_loss', 4)} | {mean(parts, 'fuse_share', 3)} | "
                     f"{mean(parts, 'fuse_grad_share', 3)} | {mean(parts, 'grad_cosine', 3)} |")
    lines += ["", "Alignment and MinCE per source and skill (the pivot positions whose source distribution "
              "comes from a shared token boundary, is projected from inside a source token, or is missing, "
              "so that the pivot's own stands in; MinCE: share of sequences where the source's "
              "sequence CE is below the pivot's, so that its distribution is the fusion target; gold mass: "
              "the mean probability that target gives the gold next token, 1 = the same as the CLM term):", "",
              "| source | skill | sequences | boundary | projected | fallback | source picked | pivot CE | "
              "source CE | gold mass |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for source, per_skill in diagnostics.get("mince", {}).items():
        for skill, m in per_skill.items():
            src = "-" if m["source_ce"] is None else f"{m['source_ce']:.3f}"
            mass = "-" if m.get("gold_mass") is None else f"{m['gold_mass']:.3f}"
            rules = m.get("rules") or {}
            shares = " | ".join("-" if rule not in rules else f"{rules[rule]:.1%}"
                                for rule in ("boundary", "projected", "fallback"))
            lines.append(f"| {source} | {skill} | {m['sequences']} | {shares} | {m['source_picked']:.1%} | "
                         f"{m['pivot_ce']:.3f} | {src} | {mass} |")
    return "\n".join(lines)
