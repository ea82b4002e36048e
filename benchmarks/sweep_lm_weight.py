"""The demo's two effects against λ (``lm_weight``), on the validation split.

    python benchmarks/sweep_lm_weight.py [--work-dir demo-sweep] [--weights 0.9,0.5,0]

Runs the shipped demo recipe once per λ (the models and data are built once and copied),
evaluated on the validation prompts (never the held-out ones), and prints per λ the fusion
effect (each target − SFT on its source's skill: exact match, the transfer measure's KL to
that source, and on pick, where many replies are right, the mass on right first answer
tokens) and the merge effect of SCE (kept = SCE EM / best target EM) per skill, mean ± std
over the recipe's seeds, with the targets' relative update. This is the table behind the
README's "fusion effect against λ". About 4 minutes per λ on 2 cores.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

import yaml
from common import demo_on_validation, plus_minus


def run(work: Path, weights: list[float]) -> list[tuple[float, dict[str, Any]]]:
    from fusechat_merge.demo.pipeline_demo import DEMO_RECIPE, prepare_demo_data
    from fusechat_merge.demo.skills import make_demo_models

    shared = work / "shared"
    make_demo_models(shared / "models", log=print)
    prepare_demo_data(shared)
    reports = []
    for weight in weights:
        run_dir = work / f"lm_weight-{weight:g}"
        for name in ("models", "data"):
            if not (run_dir / name).exists():
                shutil.copytree(shared / name, run_dir / name)
        raw = yaml.safe_load(DEMO_RECIPE.read_text(encoding="utf-8"))
        raw["fuse"]["defaults"]["lm_weight"] = weight
        print(f"λ = {weight:g}: {run_dir}", flush=True)
        reports.append((weight, demo_on_validation(run_dir, raw, work / f"demo-lm_weight-{weight:g}.yaml")))
    return reports


def table(reports: list[tuple[float, dict[str, Any]]]) -> str:
    from fusechat_merge.demo.skills import SKILLS

    skills = [*SKILLS, "mean"]
    lines = ["| λ | target − SFT, own skill EM | target − SFT, own source KL | pick: target − SFT right mass "
             f"| SCE kept ({' / '.join(skills)}) | relative update |",
             "|---:|---|---|---|---|---|"]
    for weight, report in reports:
        effects = report["effects"]
        targets = [e for e in effects["fusion"] if e["model"] != "multi"]
        fusion = "; ".join(f"{e['model']} {plus_minus(e['em'])}" for e in targets)
        transfer = "; ".join(f"{e['model']} {plus_minus(e.get('kl'))}" for e in targets)
        mass = "; ".join(plus_minus(e.get("mass")) for e in targets if e["skill"] == "pick")
        kept = {e["skill"]: e["kept"] for e in effects["merge"] if e["model"] == "merge:sce"}
        update = report["diagnostics"]["update"]
        moved = ", ".join(f"{u['mean']:.2f}" for name, u in update.items() if name.startswith("target:"))
        lines.append(f"| {weight:g} | {fusion} | {transfer} | {mass or '-'} "
                     f"| {' / '.join(plus_minus(kept.get(s), 2, False) for s in skills)} | {moved} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", type=Path, default=Path("demo-sweep"))
    parser.add_argument("--weights", default="0.9,0.5,0", help="comma-separated lm_weight values")
    args = parser.parse_args()
    weights = [float(w) for w in args.weights.split(",")]
    print(table(run(args.work_dir.absolute(), weights)))


if __name__ == "__main__":
    main()
