"""Fusion training cost: step time and peak memory of `FusionTrainer` vs plain CLM.

Why: the fusion loss (fused top-K teacher targets gathered from the student's
log-softmax) should cost little on top of ordinary causal-LM fine-tuning. The baseline
is the same Trainer, same data and collator, with ``lm_weight = 1.0``, which takes the
plain Hugging Face path ``model(**inputs, labels=labels).loss``.

How: a ~50M-parameter Llama pivot (vocab 32000, '▁' toy tokenizer) and a small Qwen2
source ('Ġ' byte-level toy tokenizer, so alignment is real) score a corpus of long
conversations (truncated at 512 pivot tokens); the stores are aligned (``offsets``).
Then each variant trains in its own fresh subprocess (fp32, CPU, same seed, batch size,
steps and thread count), so ``ru_maxrss`` is that variant's own peak. A callback times
each optimizer step after the warm-up steps:

* ``step``: ``on_step_begin`` → ``on_step_end`` (forward, backward, clip, optimizer);
* ``interval``: ``on_step_end`` → next ``on_step_end`` (also fetching and collating the
  batch, and logging): what a training run pays per step;
* ``loss fwd``: ``compute_loss`` (forward + loss) and ``backbone``: the decoder stack's
  forward (hooked), so ``compute_loss − backbone`` is the LM head plus the loss.

Variants: ``clm`` (λ = 1), ``fusion`` (λ = 0.9, mince, ce), ``fusion-kl`` (mince, kl),
``avgce`` (avgce, ce). ``--repeat`` rounds run every variant once each, interleaved; a
variant's round with the lowest median step time is reported (the machine may have
other load). Targets: fusion ≤ 1.15× clm's median step time and ≤ 1.1× its peak RSS.
Absolute times are machine-dependent and never checked. On a machine shared with other
work, use ``--threads 1``: with several threads each parallel op waits for a descheduled
worker (milliseconds per op), and the step CPU time column is then a steadier guide. Run:

    python benchmarks/bench_train.py [--quick] [--variants clm fusion fusion-kl avgce]
        [--steps 10] [--warmup 2] [--repeat 2] [--batch-size 4] [--threads N]

It prints a table and writes ``bench-work/bench_train.json`` (every run's raw step times
included). ``--quick`` (a smoke test, under a minute): a ~20M pivot, length 256, clm and
fusion only, 1 warm-up + 2 timed steps, one round; its ratios are not the targets' (the
loss head weighs more in a smaller model).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from bench_logits import build_model as build_pivot  # noqa: E402  (the ~50M Llama)
from common import reply, toy_model, write_chats  # noqa: E402

VARIANTS: dict[str, dict[str, Any]] = {
    "clm": {"lm_weight": 1.0},
    "fusion": {"lm_weight": 0.9, "fusion": "mince", "fuse_loss_type": "ce"},
    "fusion-kl": {"lm_weight": 0.9, "fusion": "mince", "fuse_loss_type": "kl"},
    "avgce": {"lm_weight": 0.9, "fusion": "avgce", "fuse_loss_type": "ce"},
}
TIME_TARGET, MEMORY_TARGET = 1.15, 1.10
SENTENCES = (
    "Knowledge fusion distils several chat models into one compact pivot model.",
    "The capital of France is Paris; 12 * 12 = 144 and 2 + 2 = 4.",
    "Model merging combines the weights of several fine-tuned models!",
    "Bonjour le monde, naïve café — ÄÖÜ ß é (a+b).",
    "def add(a, b):\n    return a + b",
)


# ---------------------------------------------------------------- inputs (parent) --


def build_source(path: Path, quick: bool) -> Path:
    """A small Qwen2 with the byte-level toy tokenizer (another vocabulary, another arch)."""
    hidden, layers = (128, 2) if quick else (256, 4)
    return toy_model(
        path,
        "bytelevel",
        "qwen2",
        seed=1,
        hidden_size=hidden,
        layers=layers,
        heads=4,
        kv_heads=2,
        max_position_embeddings=4096,
    )


def build_corpus(path: Path, n: int, words: int) -> Path:
    """``n`` conversations whose replies run past the pivot's max_length."""
    exchanges = (
        (f"Question {i}: {SENTENCES[i % len(SENTENCES)]}", reply(i, words, SENTENCES))
        for i in range(n)
    )
    return write_chats(path, exchanges)


def build_aligned(work: Path, quick: bool, n: int, seq_len: int) -> tuple[Path, Path]:
    """(pivot model dir, aligned store dir), reusing whatever is already on disk."""
    from fusion.align.job import StoreAlignment, align_stores
    from fusion.capture.logit_job import LogitJob, generate_logits

    tag = f"{'quick' if quick else '50M'}-n{n}-t{seq_len}"
    pivot = build_pivot(work / ("pivot-quick" if quick else "pivot-50M"), quick)
    source = build_source(work / ("source-quick" if quick else "source"), quick)
    data = build_corpus(work / f"chats-{tag}.jsonl", n, words=seq_len)
    cache = str(work / "cache")
    stores = {}
    # the source gets a longer window so it covers the text of the pivot's seq_len tokens
    for name, model, length in (("pivot", pivot, seq_len), ("source", source, 2 * seq_len)):
        stores[name] = work / f"store-{name}-{tag}"
        job = LogitJob(
            model=str(model),
            data=str(data),
            out=str(stores[name]),
            cache_dir=cache,
            max_length=length,
            dtype="float32",
            device="cpu",
        )
        generate_logits(job, progress=False, log=lambda _: None)
    aligned = work / f"aligned-{tag}"
    align_stores(
        StoreAlignment(pivot=str(stores["pivot"]), source=str(stores["source"]), out=str(aligned)),
        progress=False,
        log=print,
    )
    return pivot, aligned


# ------------------------------------------------------------------ child process --


def step_timer():
    """A TrainerCallback recording each step's wall and CPU time (begin→end) and the
    wall time end→end."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.step: list[float] = []
            self.step_cpu: list[float] = []
            self.interval: list[float] = []
            self._begin = self._begin_cpu = self._end = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self._begin, self._begin_cpu = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            self.step.append(now - self._begin)
            self.step_cpu.append(time.process_time() - self._begin_cpu)
            if self._end:
                self.interval.append(now - self._end)
            self._end = now

    return StepTimer()


def timed_trainer_class():
    """`FusionTrainer` that also records the wall time of each ``compute_loss``."""
    from fusion.train.trainer import FusionTrainer

    class TimedTrainer(FusionTrainer):
        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, **kw)
            self.loss_times: list[float] = []

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            start = time.perf_counter()
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            self.loss_times.append(time.perf_counter() - start)
            return out

    return TimedTrainer


def hook_backbone(model) -> list[float]:
    """Times every forward of the decoder stack (``model.model``); returns the list."""
    times: list[float] = []
    starts: list[float] = []
    backbone = model.get_decoder()
    backbone.register_forward_pre_hook(lambda *_: starts.append(time.perf_counter()))
    backbone.register_forward_hook(lambda *_: times.append(time.perf_counter() - starts.pop()))
    return times


def current_rss_mib() -> float:
    """This process's resident set size now (Linux ``/proc``; else the peak so far)."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return max_rss_mib()
    kib = next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))
    return int(kib) / 1024


def max_rss_mib() -> float:
    """This process's peak resident set size so far (Linux: ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args: argparse.Namespace) -> dict[str, Any]:
    """Train one variant for warmup + steps optimizer steps; its timings and peak RSS."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fusion.train.config import fusion_config
    from fusion.train.data import FusionCollator, FusionDataset

    torch.set_num_threads(args.threads)
    dataset = FusionDataset([args.aligned])
    tokenizer = AutoTokenizer.from_pretrained(args.pivot)
    model = AutoModelForCausalLM.from_pretrained(args.pivot, dtype=torch.float32)
    config = fusion_config(
        args.work_dir / "runs" / args.child,
        **VARIANTS[args.child],
        max_steps=args.warmup + args.steps,
        per_device_train_batch_size=args.batch_size,
        seed=0,
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_pin_memory=False,
    )
    timer = step_timer()
    backbone = hook_backbone(model)
    trainer = timed_trainer_class()(
        model=model,
        args=config,
        train_dataset=dataset,
        data_collator=FusionCollator(pad_id=tokenizer.pad_token_id),
        callbacks=[timer],
    )
    rss_before = current_rss_mib()
    trainer.train()
    w = args.warmup
    tokens = sum(len(dataset.stores[0][i].input_ids) for i in range(len(dataset))) / len(dataset)
    return {
        "variant": args.child,
        "settings": VARIANTS[args.child],
        "params": sum(p.numel() for p in model.parameters()),
        "threads": torch.get_num_threads(),
        "tokens_per_step": tokens * args.batch_size,
        "step_s": timer.step[w:],
        "step_cpu_s": timer.step_cpu[w:],
        "interval_s": timer.interval[w - 1 :] if w else timer.interval,
        "loss_fwd_s": trainer.loss_times[w:],
        "backbone_fwd_s": backbone[w:],
        "rss_before_train_mib": rss_before,
        "peak_rss_mib": max_rss_mib(),
    }


# ------------------------------------------------------------ parent: run & report --


def run_variant(name: str, args: argparse.Namespace, pivot: Path, aligned: Path) -> dict[str, Any]:
    """Run one variant in a fresh interpreter; its result dict."""
    out = args.work_dir / f"result-{name}.json"
    out.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        name,
        "--pivot",
        str(pivot),
        "--aligned",
        str(aligned),
        "--result",
        str(out),
        "--work-dir",
        str(args.work_dir),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--batch-size",
        str(args.batch_size),
        "--threads",
        str(args.threads),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"variant {name} failed (exit {proc.returncode})")
    return json.loads(out.read_text())


def run_rounds(
    args: argparse.Namespace, pivot: Path, aligned: Path
) -> dict[str, list[dict[str, Any]]]:
    """``--repeat`` rounds, each running every variant once (interleaved, so a burst of
    other load on the machine hits one round rather than one variant)."""
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in args.variants}
    for round_ in range(args.repeat):
        for name in args.variants:
            started = time.perf_counter()
            results[name].append(run_variant(name, args, pivot, aligned))
            step = statistics.median(results[name][-1]["step_s"])
            print(
                f"round {round_ + 1}, {name}: median step {step:.3f}s "
                f"(run took {time.perf_counter() - started:.0f}s)",
                flush=True,
            )
    return results


def summarise(result: dict[str, Any]) -> dict[str, float]:
    """Medians of the timing lists, tokens/s and memory of one run."""
    keys = ("step", "step_cpu", "interval", "loss_fwd", "backbone_fwd")
    med = {k: statistics.median(result[f"{k}_s"]) for k in keys}
    return {
        **med,
        "head_loss_fwd": med["loss_fwd"] - med["backbone_fwd"],
        "bwd_optim": med["step"] - med["loss_fwd"],
        "step_min": min(result["step_s"]),
        "tokens_per_s": result["tokens_per_step"] / med["step"],
        "peak_rss_mib": result["peak_rss_mib"],
        "train_rss_mib": result["peak_rss_mib"] - result["rss_before_train_mib"],
    }


def best_round(runs: list[dict[str, Any]]) -> dict[str, float]:
    """The summary of the round with the lowest median step time (least disturbed by
    other load), with the lowest peak RSS over all rounds."""
    summaries = [summarise(r) for r in runs]
    best = dict(min(summaries, key=lambda s: s["step"]))
    low = min(summaries, key=lambda s: s["peak_rss_mib"])
    best.update(peak_rss_mib=low["peak_rss_mib"], train_rss_mib=low["train_rss_mib"])
    return best


COLUMNS = {
    "step": "step s",
    "step_cpu": "step CPU s",
    "interval": "interval s",
    "loss_fwd": "loss fwd s",
    "head_loss_fwd": "head+loss s",
    "bwd_optim": "bwd+optim s",
}


def print_table(summaries: dict[str, dict[str, float]]) -> None:
    """One row per variant, ratios against clm."""
    base = summaries["clm"]
    print(
        f"{'variant':<10}"
        + "".join(f"{c:>12}" for c in COLUMNS.values())
        + f"{'tok/s':>8}{'peak RSS MiB':>14}{'train ΔRSS':>12}{'time x':>8}{'mem x':>7}"
    )
    for name, s in summaries.items():
        print(
            f"{name:<10}"
            + "".join(f"{s[c]:>12.3f}" for c in COLUMNS)
            + f"{s['tokens_per_s']:>8,.0f}{s['peak_rss_mib']:>14,.0f}{s['train_rss_mib']:>12,.0f}"
            + f"{s['step'] / base['step']:>8.3f}{s['peak_rss_mib'] / base['peak_rss_mib']:>7.3f}"
        )


def verdicts(summaries: dict[str, dict[str, float]]) -> dict[str, dict[str, Any]]:
    """Each non-clm variant's time and memory ratios against the targets."""
    base = summaries["clm"]
    out = {}
    for name, s in summaries.items():
        if name == "clm":
            continue
        time_ratio = s["step"] / base["step"]
        mem_ratio = s["peak_rss_mib"] / base["peak_rss_mib"]
        out[name] = {
            "step_time_ratio": time_ratio,
            "step_cpu_ratio": s["step_cpu"] / base["step_cpu"],
            "interval_time_ratio": s["interval"] / base["interval"],
            "peak_rss_ratio": mem_ratio,
            "train_rss_ratio": s["train_rss_mib"] / max(base["train_rss_mib"], 1e-9),
            "time_met": time_ratio <= TIME_TARGET,
            "memory_met": mem_ratio <= MEMORY_TARGET,
        }
    return out


def print_verdicts(checks: dict[str, dict[str, Any]]) -> None:
    for name, c in checks.items():
        print(
            f"{name}/clm: step time {c['step_time_ratio']:.3f}x (target <= {TIME_TARGET}: "
            f"{'met' if c['time_met'] else 'NOT met'}; CPU time {c['step_cpu_ratio']:.3f}x, "
            f"end-to-end interval {c['interval_time_ratio']:.3f}x), peak RSS {c['peak_rss_ratio']:.3f}x "
            f"(target <= {MEMORY_TARGET}: {'met' if c['memory_met'] else 'NOT met'}; "
            f"training increment {c['train_rss_ratio']:.2f}x)"
        )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, default=Path("bench-work/train"))
    parser.add_argument("--json", type=Path, default=Path("bench-work/bench_train.json"))
    parser.add_argument(
        "--variants", nargs="+", choices=list(VARIANTS), help="all (quick: clm fusion)"
    )
    parser.add_argument("--steps", type=int, default=None, help="timed steps (10; quick 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed first steps (2; quick 1)")
    parser.add_argument(
        "--repeat", type=int, default=None, help="interleaved rounds, best kept (2; quick 1)"
    )
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument(
        "--seq-len", type=int, default=None, help="pivot max_length (512; quick 256)"
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--quick", action="store_true", help="~20M pivot, length 256, 1 + 2 steps")
    parser.add_argument("--child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--pivot", help=argparse.SUPPRESS)
    parser.add_argument("--aligned", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    defaults = (2, 1, 256, 1) if args.quick else (10, 2, 512, 2)
    args.steps = args.steps if args.steps is not None else defaults[0]
    args.warmup = args.warmup if args.warmup is not None else defaults[1]
    args.seq_len = args.seq_len or defaults[2]
    args.repeat = args.repeat or defaults[3]
    if args.variants is None:
        args.variants = ["clm", "fusion"] if args.quick else list(VARIANTS)
    return args


def main() -> None:
    args = parse_args()
    if args.child:
        args.result.write_text(json.dumps(child(args)))
        return
    if "clm" not in args.variants:
        args.variants.insert(0, "clm")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    n = (args.warmup + args.steps) * args.batch_size  # one epoch: every step sees new data
    pivot, aligned = build_aligned(args.work_dir, args.quick, n, args.seq_len)
    results = run_rounds(args, pivot, aligned)
    summaries = {name: best_round(runs) for name, runs in results.items()}
    first = results["clm"][0]
    print(
        f"pivot {first['params'] / 1e6:.1f}M params, fp32 CPU, {first['threads']} threads, batch "
        f"{args.batch_size} x {first['tokens_per_step'] / args.batch_size:.0f} tokens, "
        f"{args.warmup} warm-up + {args.steps} timed steps (medians)"
    )
    print_table(summaries)
    checks = verdicts(summaries)
    print_verdicts(checks)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {"quick": args.quick, "summaries": summaries, "checks": checks, "runs": results},
            indent=2,
        )
    )
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
