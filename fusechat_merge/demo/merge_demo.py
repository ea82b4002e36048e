"""``fusechat-merge demo --merge-only``: three tiny random models merged with ``fusechat_sce``
in a few seconds (the merge stage alone, through the same library calls as ``merge``)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fusechat_merge import METHOD_NAME


def demo_merge_recipe(base: Path, targets: list[Path], select_topk: float) -> dict[str, Any]:
    """The mergekit recipe of the merge-only demo (also written next to its output)."""
    return {
        "merge_method": METHOD_NAME,
        "base_model": str(base),
        "models": [{"model": str(base)}] + [{"model": str(t)} for t in targets],
        "parameters": {"select_topk": select_topk, "select_scope": "weights", "normalize": True},
        "dtype": "float32",
    }


def run_demo(work_dir: Path, *, select_topk: float = 0.1, echo: Callable[[str], None] = print) -> Path:
    """Build the models (reused when present), merge, and print a short summary."""
    import torch
    import yaml
    from mergekit.options import MergeOptions
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fusechat_merge.demo.toy import make_model, make_tokenizer
    from fusechat_merge.merging import run_merge_checked
    from fusechat_merge.report.sce import mean_coefficients, write_sce_report
    from fusechat_merge.stats_sink import record_stats
    from fusion.artifacts.atomic import write_text_atomic

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
    raw = demo_merge_recipe(base, targets, select_topk)
    text = yaml.safe_dump(raw, sort_keys=False)
    recipe = write_text_atomic(work_dir / "sce-demo.yaml", text)
    out = work_dir / "merged"
    report = work_dir / "report"
    echo(f"merging with {METHOD_NAME} (select_topk={select_topk}) ...")
    with record_stats.collecting() as stats:
        run_merge_checked(raw, out, MergeOptions(quiet=True), config_source=text, source_name=str(recipe),
                          overwrite=True)  # the demo merges again (its report needs the run)
    write_sce_report(stats, report)

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("Model merging combines weights.", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    n_tensors = len({row.tensor for row in stats})
    echo("")
    echo(f"merged model : {out}")
    echo(f"recipe       : {recipe}")
    echo(f"parameters   : {sum(p.numel() for p in model.parameters()):,}")
    echo(f"logits finite: {bool(torch.isfinite(logits).all())} (shape {tuple(logits.shape)})")
    for name, eta in mean_coefficients(stats).items():
        echo(f"mean η of {Path(name).name:<9}: {eta:.3f} over {n_tensors} tensors")
    echo(f"coefficients : {report / 'sce_report.csv'}")
    echo(f"done in {time.perf_counter() - started:.1f}s")
    return out
