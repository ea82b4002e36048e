"""Choosing the demo's pick settings on the validation split: target:pick − SFT per candidate.

    python benchmarks/sweep_pick.py [--work-dir pick-sweep] [--rows 100,300] [--lrs 2e-3]
                                    [--lm-weights 0.9] [--seeds 3]

Each candidate (pick conversations in the fusion corpus × learning rate × λ) runs the shipped demo
recipe cut to what pick needs: the pick source alone, the SFT baseline, no merges, lm-eval's
pick task only, evaluated on the validation prompts (never the held-out ones). The cut changes
nothing that the two compared models see: fusion is pairwise, so target:pick is the pivot fused
with the pick source on the same corpus, seeds and steps as in the whole recipe, and SFT uses
no source at all. The models are built once and copied. Prints per candidate target:pick − SFT
on pick (right replies, mass on right first answer tokens, KL to the pick source), mean ± std
over the seeds, with the two models' own means. About 3 minutes per candidate on 2 idle cores.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

import yaml
from common import demo_on_validation, plus_minus


def pick_recipe(lr: float, lm_weight: float, seeds: int) -> dict[str, Any]:
    """The shipped recipe with only what target:pick and SFT need."""
    from fusechat_merge.demo.pipeline_demo import DEMO_RECIPE

    raw = yaml.safe_load(DEMO_RECIPE.read_text(encoding="utf-8"))
    raw["seeds"] = list(range(seeds))
    raw["sources"] = [s for s in raw["sources"] if s["name"] == "pick"]
    raw["fuse"]["baselines"] = {"sft": True, "multi": False}
    raw["fuse"]["defaults"]["learning_rate"] = lr
    raw["fuse"]["defaults"]["lm_weight"] = lm_weight
    raw["merges"] = []
    raw["evaluate"]["lm_eval"]["tasks"] = ["fusechat_pick_gen"]
    return raw


Candidate = tuple[int, float, float]  # pick conversations, learning rate, λ


def run(work: Path, candidates: list[Candidate], seeds: int) -> list[tuple[Candidate, dict[str, Any]]]:
    from fusechat_merge.demo.pipeline_demo import prepare_demo_data
    from fusechat_merge.demo.skills import make_demo_models

    shared = work / "models"
    make_demo_models(shared, log=print)
    reports = []
    for n, lr, weight in candidates:
        name = f"pick-{n}-lr-{lr:g}" + (f"-lm_weight-{weight:g}" if weight != 0.9 else "")
        run_dir = work / name
        if not (run_dir / "models").exists():
            shutil.copytree(shared, run_dir / "models")
        prepare_demo_data(run_dir, corpus_rows={"pick": n})
        print(f"pick conversations {n}, learning rate {lr:g}, λ {weight:g}: {run_dir}", flush=True)
        report = demo_on_validation(run_dir, pick_recipe(lr, weight, seeds), work / f"{name}.yaml")
        reports.append(((n, lr, weight), report))
    return reports


def _means(report: dict[str, Any], model: str) -> str:
    """One model's right replies / mass / KL to the pick source on pick, means over seeds."""
    cells = {"fusechat_pick_gen/exact_match": "-", "pick/right_answer_mass": "-", "kl": "-"}
    for row in report["results"]:
        if row["model"] != model:
            continue
        if row["skill"] in cells and row.get("metric"):
            cells[row["skill"]] = f"{row['value_mean']:.3f}"
        if row["skill"] == "pick" and row.get("source") == "pick" and row.get("transfer"):
            cells["kl"] = f"{row['kl_mean']:.2f}"
    return " / ".join(cells.values())


def table(reports: list[tuple[Candidate, dict[str, Any]]]) -> str:
    lines = ["| pick conversations | learning rate | λ | right replies: target − SFT | mass: target − SFT "
             "| KL to source: target − SFT | SFT / target:pick (right / mass / KL) |",
             "|---:|---:|---:|---|---|---|---|"]
    for (n, lr, weight), report in reports:
        effect = next(e for e in report["effects"]["fusion"] if e["model"] == "target:pick")
        lines.append(f"| {n} | {lr:g} | {weight:g} | {plus_minus(effect['em'])} | {plus_minus(effect.get('mass'))} | {plus_minus(effect.get('kl'))} "
                     f"| {_means(report, 'sft')}; {_means(report, 'target:pick')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", type=Path, default=Path("pick-sweep"))
    parser.add_argument("--rows", default="100,300", help="comma-separated pick conversations in the corpus")
    parser.add_argument("--lrs", default="2e-3", help="comma-separated learning rates")
    parser.add_argument("--lm-weights", default="0.9", help="comma-separated λ (lm_weight) values")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    candidates = [(int(n), float(lr), float(w)) for n in args.rows.split(",") for lr in args.lrs.split(",")
                  for w in args.lm_weights.split(",")]
    reports = run(args.work_dir.absolute(), candidates, args.seeds)
    print(table(reports))


if __name__ == "__main__":
    main()
