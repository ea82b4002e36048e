"""The embedded demos, on tiny models made locally (nothing is downloaded).

* `run_pipeline_demo` (``fusechat-merge demo``): the whole FuseChat run of
  ``recipes/demo-pipeline.yaml``: a Llama-style pivot and two sources of other
  architectures and tokenizers, each with a skill the pivot lacks, fused and merged, and
  every model evaluated on both skills.
* `run_demo` (``fusechat-merge demo --merge-only``): three tiny random models merged with
  ``fusechat_sce`` through the CLI.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import yaml

from fusechat_merge import METHOD_NAME


def write_demo_recipe(path: Path, base: Path, targets: list[Path], select_topk: float) -> Path:
    recipe = {
        "merge_method": METHOD_NAME,
        "base_model": str(base),
        "models": [{"model": str(base)}] + [{"model": str(t)} for t in targets],
        "parameters": {"select_topk": select_topk, "select_scope": "weights", "normalize": True},
        "dtype": "float32",
    }
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


DEMO_RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "demo-pipeline.yaml"


def prepare_demo_data(work_dir: Path, *, n_train: int = 300) -> None:
    """The fusion corpus (both skills, interleaved) and one held-out file per skill."""
    from fusechat_merge.skills import SKILLS, train_heldout, write_jsonl

    data = work_dir / "data"
    if (data / "train.jsonl").exists():
        return
    train: list[dict] = []
    for skill in SKILLS:
        rows, held = train_heldout(skill, n_train)
        train.extend(rows)
        write_jsonl(data / f"heldout-{skill}.jsonl", held)
    train.sort(key=lambda row: row["id"].rsplit("-", 1)[-1].zfill(6) + row["id"])
    write_jsonl(data / "train.jsonl", train)


def run_pipeline_demo(
    work_dir: Path,
    *,
    recipe: Path = DEMO_RECIPE,
    seeds: list[int] | None = None,
    echo: Callable[[str], None] = print,
) -> Path:
    """Build the demo's models and data (reused when present), then run the recipe."""
    import yaml

    from fusechat_merge.pipeline import Pipeline
    from fusechat_merge.recipe import load_pipeline_recipe
    from fusechat_merge.skills import make_demo_models

    work_dir = Path(work_dir).absolute()
    if not recipe.is_file():
        raise FileNotFoundError(f"the demo recipe {recipe} is missing (run from a checkout)")
    started = time.perf_counter()
    make_demo_models(work_dir / "models", log=echo)
    prepare_demo_data(work_dir)
    setup_seconds = time.perf_counter() - started
    echo(f"models and data ready in {setup_seconds:.1f}s")
    text = recipe.read_text(encoding="utf-8")
    if seeds is not None:
        raw = yaml.safe_load(text)
        raw["seeds"] = seeds
        text = yaml.safe_dump(raw, sort_keys=False)
    local = work_dir / "demo-pipeline.yaml"
    local.write_text(text, encoding="utf-8")
    Pipeline(load_pipeline_recipe(local, work_dir), work_dir, log=echo).run()
    echo(f"\nreport: {work_dir / 'report'} (results.md, results.png); "
         f"SCE coefficients: {work_dir / 'merges'}/seed-*/sce-report/sce_coefficients.png")
    echo(f"demo done in {time.perf_counter() - started:.1f}s (setup {setup_seconds:.1f}s)")
    return work_dir / "report"


def run_demo(work_dir: Path, *, select_topk: float = 0.1, echo: Callable[[str], None] = print) -> Path:
    """Build the models (reused when present), merge, and print a short summary."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fusechat_merge.cli import merge_command
    from fusechat_merge.toy import make_model, make_tokenizer

    started = time.perf_counter()
    work_dir = Path(work_dir).absolute()
    models = work_dir / "models"
    base = models / "pivot"
    targets = [models / f"target-{i}" for i in (1, 2)]
    if not (base / "config.json").exists():
        echo("building a tiny Llama pivot with a trained '▁' tokenizer ...")
        make_model(base, "llama", tokenizer=make_tokenizer("metaspace"), seed=0)
    for i, target in enumerate(targets, start=1):
        if not (target / "config.json").exists():
            echo(f"building target {i} (pivot + noise, seed {i}) ...")
            make_model(target, base=base, seed=i, delta_scale=0.01 * i)
    recipe = write_demo_recipe(work_dir / "sce-demo.yaml", base, targets, select_topk)
    out = work_dir / "merged"
    report = work_dir / "report"
    echo(f"merging with {METHOD_NAME} (select_topk={select_topk}) ...")
    merge_command.main(
        [str(recipe), str(out), "--report", str(report), "--quiet"], standalone_mode=False
    )

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("Model merging combines weights.", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    rows = list((report / "sce_report.csv").read_text(encoding="utf-8").splitlines())[1:]
    per_target: dict[str, list[float]] = {}
    for line in rows:
        _, name, eta, *_ = line.split(",")
        per_target.setdefault(name, []).append(float(eta))
    echo("")
    echo(f"merged model : {out}")
    echo(f"recipe       : {recipe}")
    echo(f"parameters   : {sum(p.numel() for p in model.parameters()):,}")
    echo(f"logits finite: {bool(torch.isfinite(logits).all())} (shape {tuple(logits.shape)})")
    for name, etas in per_target.items():
        echo(f"mean η of {Path(name).name:<9}: {sum(etas) / len(etas):.3f} over {len(etas)} tensors")
    echo(f"coefficients : {report / 'sce_report.csv'}")
    echo(f"done in {time.perf_counter() - started:.1f}s")
    return out
