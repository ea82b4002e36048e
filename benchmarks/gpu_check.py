"""The checks that need a GPU, in one run (``benchmarks/gpu_check.sh`` calls this):

a. logits: the same small model's top-K stored by the ``hf`` and the ``vllm`` backends on
   CUDA (float32): equal ids except near-ties (entries within 1e-3 of each other), log-
   probabilities within 1e-3; tokens/s of each and their ratio;
b. SCE: `fusechat_merge.sce.sce_merge` on CUDA against CPU on the same tensors: equal to
   1e-6; time of each and their ratio;
c. fuse: a few training steps in bf16 on CUDA against float32 on CPU from the same start:
   the loss ratio per step, and the steps/s ratio.

Prints one line per result and writes them to ``--out`` (JSON). Exits non-zero when a
check fails; a part that cannot run (no vLLM) is reported as skipped.

    python benchmarks/gpu_check.py --work /tmp/gpu-check --out gpu_check.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the other benchmarks' model and corpus builders

RESULTS: dict[str, dict] = {}


def report(part: str, **values) -> None:
    RESULTS[part] = values
    print(f"[{part}] " + " ".join(f"{k}={v}" for k, v in values.items()), flush=True)


def check_logits(work: Path, conversations: int) -> bool:
    from bench_logits import build_corpus, build_model

    from fusion.artifacts.logit_store import LogitStore
    from fusion.logits import LogitJob, generate_logits

    if importlib.util.find_spec("vllm") is None:
        report("logits", status="skipped", reason="vllm is not installed (pip install 'fusechat-merge[vllm]')")
        return True
    model = build_model(work / "model-logits", quick=True)
    data = build_corpus(work / "chats.jsonl", conversations)
    stores, seconds = {}, {}
    for backend in ("hf", "vllm"):
        out = work / f"store-{backend}"
        job = LogitJob(model=str(model), data=str(data), out=str(out), backend=backend, top_k=10,
                       max_length=1024, dtype="float32", batch_size=16, device="cuda",
                       gpu_memory_utilization=0.5, cache_dir=str(work / "cache"))
        start = time.perf_counter()
        manifest = generate_logits(job, progress=False, log=lambda _: None)
        seconds[backend] = time.perf_counter() - start  # engine start included (vLLM's is long)
        stores[backend] = LogitStore(out)
        tokens = manifest.tokens
    hf, vl = stores["hf"], stores["vllm"]
    worst, differ, entries, bad_ties = 0.0, 0, 0, 0
    for a, b in zip(hf, vl, strict=True):
        assert np.array_equal(a.input_ids, b.input_ids)
        la, lb = a.topk_logprobs.astype(np.float32), b.topk_logprobs.astype(np.float32)
        worst = max(worst, float(np.abs(la - lb).max()), float(np.abs(a.target_logprobs - b.target_logprobs).max()))
        mismatch = a.topk_ids != b.topk_ids
        gaps = np.minimum(np.abs(np.diff(la, axis=1, prepend=np.inf)), np.abs(np.diff(la, axis=1, append=-np.inf)))
        bad_ties += int((mismatch & (gaps > 1e-3)).sum())
        differ += int(mismatch.sum())
        entries += a.topk_ids.size
    ok = worst <= 1e-3 and bad_ties == 0
    report("logits", status="ok" if ok else "FAIL", max_abs_logprob_diff=f"{worst:.2e}",
           ids_differing=f"{differ}/{entries}", ids_differing_not_near_tie=bad_ties, tokens=tokens,
           hf_tokens_per_s=round(tokens / seconds["hf"]), vllm_tokens_per_s=round(tokens / seconds["vllm"]),
           vllm_over_hf_speed=round(seconds["hf"] / seconds["vllm"], 2))
    return ok


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

    from fusion.train_config import fusion_config
    from fusion.trainer import train_fusion

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
    parser.add_argument("--only", choices=("logits", "sce", "fuse"), default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check", file=sys.stderr)
        return 2
    args.work.mkdir(parents=True, exist_ok=True)
    print(f"device: {torch.cuda.get_device_name(0)}; torch {torch.__version__}", flush=True)
    checks = {"sce": lambda: check_sce(args.sce_elements),
              "fuse": lambda: check_fuse(args.work, args.fuse_steps),
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
