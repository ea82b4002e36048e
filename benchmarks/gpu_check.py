"""The checks that need a GPU, in one run (``benchmarks/gpu_check.sh`` calls this):

a. batching: the ``hf`` backend on CUDA with token-budget batches (the default) and with
   fixed batches of 8, on a length-skewed corpus (20-2,048 tokens): the same store (log-
   probabilities within 1e-3 plus one float16 step of the stored value, ids equal except
   near-ties), tokens/s and padding share of each;
b. logits: the same model's top-K at K = 50 stored by the ``hf`` backend and by the
   ``vllm`` backend as two ``--shard`` parts merged with `merge_stores` (float32): equal ids
   except near-ties (entries within 1e-3 of each other), log-probabilities as in a.;
   tokens/s of each (scoring alone, from the stores' ``scoring`` record) and their ratio;
c. SCE: `fusechat_merge.sce.sce_merge` on CUDA against CPU on the same tensors: equal to
   1e-6; time of each and their ratio;
d. fuse: a few training steps in bf16 on CUDA against float32 on CPU from the same start:
   the loss ratio per step, and the steps/s ratio.

Prints one line per result and writes them to ``--out`` (JSON). Exits non-zero when a
check fails; a part that cannot run (no vLLM) is reported as skipped.

    python benchmarks/gpu_check.py --work /tmp/gpu-check --out gpu_check.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the other benchmarks' model and corpus builders

RESULTS: dict[str, dict] = {}
DEVICE = "cuda"  # the hf backend's (a CPU smoke run of the logits checks may set "cpu")


def report(part: str, **values) -> None:
    RESULTS[part] = values
    print(f"[{part}] " + " ".join(f"{k}={v}" for k, v in values.items()), flush=True)


def _store(work: Path, name: str, model: Path, data: Path, **options):
    """Score ``data`` into ``work/name``; (store, seconds with the engine start, what the
    scoring measured: the store's scoring.json)."""
    from fusion.artifacts.logit_store import LogitStore
    from fusion.capture.logit_job import LogitJob, generate_logits

    settings = {"max_length": 2048, "dtype": "float32", "device": DEVICE, "cache_dir": str(work / "cache"),
                "overwrite": True, **options}
    start = time.perf_counter()
    generate_logits(LogitJob(model=str(model), data=str(data), out=str(work / name), **settings),
                    progress=False, log=lambda _: None)
    store = LogitStore(work / name)
    return store, time.perf_counter() - start, store.scoring


def _compare(a, b) -> dict:
    """Worst log-probability difference, the stored ones beyond 1e-3 plus one float16 step
    (2^-10 relative), and top-K ids that differ (all, and away from near-ties)."""
    worst, beyond, differ, entries, bad_ties = 0.0, 0, 0, 0, 0
    assert a.ids() == b.ids()
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x.input_ids, y.input_ids) and np.array_equal(x.loss_mask, y.loss_mask)
        la, lb = x.topk_logprobs.astype(np.float32), y.topk_logprobs.astype(np.float32)
        gold = np.abs(x.target_logprobs - y.target_logprobs)
        worst = max(worst, float(np.abs(la - lb).max(initial=0)), float(gold.max(initial=0)))
        beyond += int((np.abs(la - lb) > 1e-3 + 2**-10 * np.abs(lb)).sum()) + int((gold > 1e-3).sum())
        mismatch = x.topk_ids != y.topk_ids
        gaps = np.minimum(np.abs(np.diff(la, axis=1, prepend=np.inf)), np.abs(np.diff(la, axis=1, append=-np.inf)))
        bad_ties += int((mismatch & (gaps > 1e-3)).sum())
        differ += int(mismatch.sum())
        entries += x.topk_ids.size
    return {"max_abs_logprob_diff": worst, "logprobs_beyond_tolerance": beyond, "ids_differing": f"{differ}/{entries}",
            "ids_differing_not_near_tie": bad_ties}


def _corpus(work: Path, conversations: int) -> tuple[Path, Path]:
    from bench_logits import build_corpus, build_model
    from transformers import AutoTokenizer

    model = build_model(work / "model-logits")
    return model, build_corpus(work / f"chats-skewed-{conversations}.jsonl", conversations,
                               AutoTokenizer.from_pretrained(model))


def check_batching(work: Path, conversations: int) -> bool:
    """hf on CUDA: token-budget batches (the default) against fixed batches of 8: the same
    store, and tokens/s and padding share of each."""
    model, data = _corpus(work, conversations)
    fixed, _, f = _store(work, "store-hf-fixed", model, data, backend="hf", top_k=10, batch_tokens=0, batch_size=8)
    budget, _, b = _store(work, "store-hf-budget", model, data, backend="hf", top_k=10)
    diff = _compare(fixed, budget)
    ok = diff["logprobs_beyond_tolerance"] == 0 and diff["ids_differing_not_near_tie"] == 0
    report("batching", status="ok" if ok else "FAIL", tokens=budget.manifest.tokens, **_rounded(diff),
           fixed_tokens_per_s=f["tokens_per_s"], budget_tokens_per_s=b["tokens_per_s"],
           budget_over_fixed_speed=round(b["tokens_per_s"] / f["tokens_per_s"], 2),
           fixed_padding=f["padding_share"], budget_padding=b["padding_share"],
           fixed_batches=f["batches"], budget_batches=b["batches"], oom_halvings=b["oom_halvings"])
    return ok


def check_logits(work: Path, conversations: int, top_k: int = 50) -> bool:
    """hf (one store) against vllm at K = 50 scored as two ``--shard`` parts and merged."""
    from fusion.artifacts.logit_store import LogitStore, merge_stores

    if importlib.util.find_spec("vllm") is None:
        report("logits", status="skipped", reason="vllm is not installed (pip install 'fusechat-merge[vllm]')")
        return True
    model, data = _corpus(work, conversations)
    hf, hf_s, hf_scoring = _store(work, "store-hf-k50", model, data, backend="hf", top_k=top_k)
    parts, part_s, rates = [], [], []
    for i in range(2):
        _, seconds, m = _store(work, f"store-vllm-k50-{i}", model, data, backend="vllm", top_k=top_k,
                               shard=f"{i}/2", gpu_memory_utilization=0.5, device="auto")
        parts.append(work / f"store-vllm-k50-{i}")
        part_s.append(seconds)  # engine start included (vLLM's is long)
        rates.append(m["tokens_per_s"])  # scoring alone
    merged = work / "store-vllm-k50"
    if merged.exists():
        shutil.rmtree(merged)
    merge_stores(parts, merged)
    diff = _compare(hf, LogitStore(merged))
    ok = diff["logprobs_beyond_tolerance"] == 0 and diff["ids_differing_not_near_tie"] == 0
    report("logits", status="ok" if ok else "FAIL", top_k=top_k, parts=2, tokens=hf.manifest.tokens, **_rounded(diff),
           hf_tokens_per_s=hf_scoring["tokens_per_s"], vllm_part_tokens_per_s=rates,
           vllm_over_hf_speed=round(min(rates) / hf_scoring["tokens_per_s"], 2),
           hf_s_with_load=round(hf_s, 1), vllm_part_s_with_engine_start=[round(x, 1) for x in part_s])
    return ok


def _rounded(diff: dict) -> dict:
    return {**diff, "max_abs_logprob_diff": f"{diff['max_abs_logprob_diff']:.2e}"}


def check_sce(numel: int) -> bool:
    from fusechat_merge.sce import sce_merge

    gen = torch.Generator().manual_seed(0)
    base = torch.randn(numel, generator=gen).reshape(-1, 1024)
    targets = [base + 0.01 * torch.randn(base.shape, generator=gen) for _ in range(3)]
    kwargs = {"select_topk": 0.1, "select_scope": "weights", "normalize": True}
    start = time.perf_counter()
    cpu = sce_merge(base, targets, **kwargs)
    cpu_s = time.perf_counter() - start
    cuda_base, cuda_targets = base.cuda(), [t.cuda() for t in targets]
    sce_merge(cuda_base, cuda_targets, **kwargs)  # warm-up (kernels, allocator)
    torch.cuda.synchronize()
    start = time.perf_counter()
    gpu = sce_merge(cuda_base, cuda_targets, **kwargs)
    torch.cuda.synchronize()
    gpu_s = time.perf_counter() - start
    diff = float((gpu.cpu() - cpu).abs().max())
    ok = diff <= 1e-6
    report("sce", status="ok" if ok else "FAIL", elements=numel, targets=3, max_abs_diff=f"{diff:.2e}",
           cpu_s=round(cpu_s, 3), cuda_s=round(gpu_s, 3), cuda_speedup=round(cpu_s / gpu_s, 1))
    return ok


def check_fuse(work: Path, steps: int) -> bool:
    from bench_train import build_aligned
    from transformers import TrainerCallback

    from fusion.train.config import fusion_config
    from fusion.train.trainer import train_fusion

    class Losses(TrainerCallback):
        def __init__(self) -> None:
            self.values: list[float] = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.values.append(float(logs["loss"]))

    pivot, aligned = build_aligned(work, True, 64, 256)
    runs = {}
    for name, extra in (("cpu-fp32", {"use_cpu": True}), ("cuda-bf16", {"bf16": True})):
        out = work / f"target-{name}"
        config = fusion_config(out, max_steps=steps, per_device_train_batch_size=8, learning_rate=1e-4,
                               seed=0, logging_steps=1, save_strategy="no", disable_tqdm=True,
                               dataloader_num_workers=0, **extra)
        losses = Losses()
        start = time.perf_counter()
        train_fusion(str(pivot), [str(aligned)], out, config, callbacks=[losses])
        runs[name] = (time.perf_counter() - start, losses.values)
    (cpu_s, cpu_loss), (gpu_s, gpu_loss) = runs["cpu-fp32"], runs["cuda-bf16"]
    ratios = [round(g / c, 4) for g, c in zip(gpu_loss, cpu_loss, strict=True)]
    finite = len(gpu_loss) == steps and all(np.isfinite(gpu_loss))
    ok = finite and all(abs(r - 1) < 0.05 for r in ratios)  # bf16 autocast: percent-level agreement
    report("fuse", status="ok" if ok else "FAIL", steps=steps, loss_ratio_bf16_cuda_over_fp32_cpu=ratios,
           cpu_s=round(cpu_s, 1), cuda_s=round(gpu_s, 1), cuda_speedup=round(cpu_s / gpu_s, 1))
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/fusechat-gpu-check"))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--conversations", type=int, default=128)
    parser.add_argument("--sce-elements", type=int, default=16 * 2**20)
    parser.add_argument("--fuse-steps", type=int, default=5)
    parser.add_argument("--only", choices=("batching", "logits", "sce", "fuse"), default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check", file=sys.stderr)
        return 2
    args.work.mkdir(parents=True, exist_ok=True)
    print(f"device: {torch.cuda.get_device_name(0)}; torch {torch.__version__}", flush=True)
    checks = {"sce": lambda: check_sce(args.sce_elements),
              "fuse": lambda: check_fuse(args.work, args.fuse_steps),
              "batching": lambda: check_batching(args.work, args.conversations),
              "logits": lambda: check_logits(args.work, args.conversations)}  # vLLM last: slowest start
    ok = True
    for name, check in checks.items():
        if args.only and name != args.only:
            continue
        try:
            ok &= check()
        except Exception:
            traceback.print_exc()
            report(name, status="ERROR", error=traceback.format_exc(limit=3).splitlines()[-1])
            ok = False
    if args.out:
        args.out.write_text(json.dumps(RESULTS, indent=2))
    print("gpu check:", "ok" if ok else "FAILED", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
