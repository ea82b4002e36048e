"""Wall time of one recipe under ``--executor local`` and ``--executor ray`` (a local Ray
instance started by the run, as without ``--ray-address``): the overhead of Ray.

By default the recipe is a small one on tiny models made here (a pivot and two sources,
logits → align → fuse → merge); ``--demo DIR`` uses the demo's recipe on the demo's models
and data (made in DIR the first time, as `fusechat-merge demo` does; reused after).
Each executor runs in a fresh copy of the inputs; the first run is preceded by a warm-up of
imports. Run:

    python benchmarks/bench_executors.py [--demo DIR [--seeds N]]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

TINY = {
    "name": "bench-executors",
    "pivot": {"name": "pivot", "model": "models/pivot"},
    "sources": [{"name": "qwen", "model": "models/qwen"}, {"name": "mistral", "model": "models/mistral"}],
    "data": {"train": "data/train.jsonl"},
    "logits": {"top_k": 5, "max_length": 96, "batch_size": 8},
    "fuse": {"defaults": {"max_steps": 4, "per_device_train_batch_size": 4, "learning_rate": 1e-3}},
    "merges": [{"name": "sce", "method": "fusechat_sce", "parameters": {"select_topk": 0.5}}],
}


def tiny_inputs(root: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from corpus import conversations, write_jsonl

    from fusechat_merge.demo.toy import make_model, make_tokenizer

    meta, byte = make_tokenizer("metaspace"), make_tokenizer("bytelevel")
    make_model(root / "models" / "pivot", "llama", tokenizer=meta, seed=1)
    make_model(root / "models" / "qwen", "qwen2", tokenizer=byte, seed=2)
    make_model(root / "models" / "mistral", "mistral", tokenizer=meta, seed=3)
    (root / "data").mkdir()
    write_jsonl(root / "data" / "train.jsonl", conversations(24))
    (root / "recipe.yaml").write_text(yaml.safe_dump(TINY, sort_keys=False))
    return root


def demo_inputs(root: Path, demo: Path, seeds: int | None) -> Path:
    from fusechat_merge.demo.pipeline_demo import DEMO_RECIPE, prepare_demo_data
    from fusechat_merge.demo.skills import make_demo_models

    make_demo_models(demo.absolute() / "models", log=print)
    prepare_demo_data(demo.absolute())
    root.mkdir()
    for name in ("models", "data"):
        shutil.copytree(demo / name, root / name)
    recipe = yaml.safe_load(DEMO_RECIPE.read_text(encoding="utf-8"))
    if seeds:
        recipe["seeds"] = list(range(seeds))
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return root


def timed_run(inputs: Path, work: Path, executor: str) -> float:
    shutil.copytree(inputs, work)
    cmd = [sys.executable, "-m", "fusechat_merge.cli", "run", str(work / "recipe.yaml"), "--work-dir", str(work),
           "--executor", executor]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{executor} run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", type=Path, default=None, help="where the demo's models and data are (made)")
    parser.add_argument("--seeds", type=int, default=None, help="--demo: this many seeds (default: the recipe's)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        inputs = demo_inputs(root / "inputs", args.demo, args.seeds) if args.demo else tiny_inputs(root / "inputs")
        subprocess.run([sys.executable, "-c", "import torch, transformers, ray"], check=True)  # warm caches
        times = {ex: timed_run(inputs, root / ex, ex) for ex in ("local", "ray")}
        stages = {}
        for ex in times:
            records = [json.loads(p.read_text()) for p in (root / ex / "stages").glob("*.done.json")]
            stages[ex] = round(sum(r["seconds"] for r in records), 1)
    print(json.dumps({"recipe": "demo" if args.demo else "tiny", "wall_s": {k: round(v, 1) for k, v in times.items()},
                      "sum_of_stage_seconds": stages, "ray_over_local": round(times["ray"] / times["local"], 2)}))


if __name__ == "__main__":
    main()
