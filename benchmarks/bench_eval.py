"""Eval time per model: lm-eval on the generated skill tasks vs our own reply loss.

The demo's three model shapes (pivot, arithmetic and reversal sources: Llama/metaspace,
Qwen2/byte-level, Mistral/metaspace at the demo's size), each briefly trained so that it
answers and stops, are scored on the demo's held-out skill files (50 conversations per
skill) by the two evaluations a pipeline runs, side by side in one process:

* ours: ``fusion.evaluate.heldout.evaluate_model`` (the reply loss per trained token, no decoding);
* lm-eval: ``fusion.evaluate.lm_eval_runner.run_lm_eval`` on the tasks ``fusion.evaluate.lm_eval_tasks``
  writes from the same files (generate_until exact match, at most 32 new tokens, greedy,
  + the reply's loglikelihood).

Batch size 16 on CPU, one thread. Prints each model's times, lm-eval's exact matches and
the ratio lm-eval / ours.

    python benchmarks/bench_eval.py [--work-dir bench-work/eval] [--steps 150]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build_models(work: Path, steps: int) -> dict[str, Path]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fusechat_merge.demo.skills import (
        MODEL_SIZE,
        SPECS,
        skill_conversations,
        train_causal_lm,
        train_heldout,
    )
    from fusechat_merge.demo.toy import make_model, make_tokenizer

    paths = {}
    for spec in SPECS:
        path = work / "models" / spec.name
        if not (path / "config.json").exists():
            tokenizer = make_tokenizer(spec.tokenizer_kind, vocab_size=spec.vocab_size)
            make_model(path, spec.arch, tokenizer=tokenizer, seed=0, **MODEL_SIZE)
            model = AutoModelForCausalLM.from_pretrained(path)
            rows = (
                train_heldout(spec.skill, 2000)[0]
                if spec.skill
                else skill_conversations("generic", 2000, 0)
            )
            train_causal_lm(model, AutoTokenizer.from_pretrained(path), rows, steps=steps)
            model.save_pretrained(path)
        paths[spec.name] = path
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, default=Path("bench-work/eval"))
    parser.add_argument("--steps", type=int, default=150, help="training steps per model")
    parser.add_argument("--bootstrap-iters", type=int, default=100000,
                        help="lm-eval's stderr resamples (its default; 0 skips them)")
    args = parser.parse_args()

    import torch

    from fusechat_merge.demo.skills import SKILLS, train_heldout
    from fusion.artifacts.atomic import write_jsonl_atomic as write_jsonl
    from fusion.evaluate.heldout import evaluate_model
    from fusion.evaluate.lm_eval_options import LmEvalOptions
    from fusion.evaluate.lm_eval_results import metrics_by_task
    from fusion.evaluate.lm_eval_runner import run_lm_eval
    from fusion.evaluate.lm_eval_tasks import write_skill_tasks

    torch.set_num_threads(1)
    work = args.work_dir
    cache = work / "datasets-cache"
    files = {s: write_jsonl(work / "data" / f"heldout-{s}.jsonl", train_heldout(s, 0)[1]) for s in SKILLS}
    tasks = write_skill_tasks(files, work / "data" / "lm_eval", cache_dir=cache)
    options = LmEvalOptions(
        tasks=tuple(tasks.task_names),
        include_path=str(tasks.include_path),
        apply_chat_template=True,
        batch_size=16,
        device="cpu",
        bootstrap_iters=args.bootstrap_iters,
    )
    models = build_models(work, args.steps)
    # Warm both paths once (imports, datasets' first build of the JSON files).
    evaluate_model(models["pivot"], files, batch_size=16, cache_dir=cache)
    run_lm_eval(models["pivot"], options)

    total_old = total_new = 0.0
    print(f"{'model':<11} {'ours s':>7} {'lm-eval s':>9} {'ratio':>6}  lm-eval exact match")
    for name, path in models.items():
        start = time.perf_counter()
        old = evaluate_model(path, files, batch_size=16, cache_dir=cache)  # reply loss only
        t_old = time.perf_counter() - start
        start = time.perf_counter()
        new = metrics_by_task(run_lm_eval(path, options))
        t_new = time.perf_counter() - start
        total_old, total_new = total_old + t_old, total_new + t_new
        by_skill = tasks.by_skill()
        matches = ", ".join(f"{s.skill} {new[by_skill[s.skill].generate]['exact_match']:.2f}" for s in old)
        print(f"{name:<11} {t_old:7.2f} {t_new:9.2f} {t_new / t_old:6.2f}  {matches}")
    print(f"{'all':<11} {total_old:7.2f} {total_new:7.2f} {total_new / total_old:6.2f}")
    print(f"ratio (lm-eval / ours, per model): {total_new / total_old:.2f}")


if __name__ == "__main__":
    main()
