"""Teacher-logit throughput on a length-skewed corpus: token-budget batches against fixed
batches, and the store against a plain forward pass at the same batches.

The corpus is FuseChat-Mixture-like in length: conversation lengths drawn log-normally
(median ~300 tokens) between 20 and 2,048 tokens, so a fixed number of sequences per pass
is either small for the short ones or large for the long ones. Two batchings of the same
length-sorted corpus, in one process, alternating over ``--repeat`` rounds (best round):

* ``fixed``: ``batch_size`` 8, no token budget (the ``hf`` backend before the budget);
* ``budget``: ``batch_tokens`` 16,384 padded tokens, at most 128 sequences (the defaults).

For each, two paths over the very same batches:

* ``plain``: ``model(input_ids, attention_mask).logits`` (what any scoring script pays);
* ``store``: `fusion.capture.logit_job.score_shard` (top-K of float32 ``log_softmax`` at trained
  positions, the gold log-probability, the records) plus writing the Arrow shard.

It prints, per row, the batches, the padding share (padded tokens that are padding),
tokens/s and the peak memory above the start (CPU: the process's peak RSS, reset before
each row; CUDA: peak allocated), then the ratios: budget over fixed tokens/s, and store
over plain time at the same batches (target ≤ 1: the store is at least as fast). Run:

    python benchmarks/bench_logits.py [--conversations 256] [--repeat 2] [--device auto]

The default run takes a few minutes on two CPU cores (a ~5M-parameter Llama of 2 layers,
hidden size 256, vocabulary 8,000; user prompts are 10-50% of each conversation, so
about 70% of the tokens are trained positions). The store's extra work is per vocabulary
entry (log-sum-exp and top-K at each trained position) and its saving per hidden unit
(no output layer at padding and prompt positions), so the store/plain ratio falls with
the hidden size: a 7B model's decoder dwarfs both, a tiny model's does not. With ``--vllm`` (needs vLLM; a GPU for a meaningful number) it also times the
``vllm`` backend on the same data.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from common import peak_rss_kib, proc_status_kib, reply, reset_peak_rss, toy_model, write_chats

SHORTEST, LONGEST, MEDIAN = 20, 2048, 300  # tokens per conversation


def build_model(path: Path, quick: bool = False, vocab_size: int = 8000) -> Path:
    """A small Llama with the toy '▁' tokenizer, made locally (head_dim 64: vLLM's CPU
    attention accepts it); ``quick``: 1 layer instead of 2."""
    return toy_model(
        path,
        "metaspace",
        "llama",
        seed=0,
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=704,
        layers=1 if quick else 2,
        heads=4,
        kv_heads=4,
        max_position_embeddings=LONGEST + 64,
    )


def skewed_lengths(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Token lengths of ``n`` conversations, log-normal around MEDIAN within [SHORTEST,
    LONGEST], and the share of each that is the user's prompt (10-50%)."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(MEDIAN), 1.0, n), SHORTEST, LONGEST).astype(int)
    return lengths, rng.uniform(0.1, 0.5, n)


def build_corpus(path: Path, n: int, tokenizer) -> Path:
    """``n`` one-exchange conversations whose token lengths follow `skewed_lengths`
    (words set from the tokenizer's tokens per word)."""
    sample = reply(0, 400)
    per_word = len(tokenizer(sample)["input_ids"]) / len(sample.split())
    lengths, prompt = skewed_lengths(n)
    words = np.maximum(1, (lengths - 12) / per_word)
    return write_chats(
        path,
        ((reply(i + 1, int(w * share)), reply(i, int(w * (1 - share))))
         for i, (w, share) in enumerate(zip(words, prompt, strict=True))),
    )


def measure(fn: Callable[[], None], device: torch.device) -> tuple[float, float]:
    """(seconds, peak MiB above the start) of one call."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = proc_status_kib("VmRSS") * 1024
        reset = reset_peak_rss()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else peak_rss_kib(reset) * 1024
    return seconds, max(0, peak - base) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, default=Path("bench-work/logits"))
    parser.add_argument("--conversations", type=int, default=200)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--quick", action="store_true", help="2 layers and 64 conversations, one round")
    parser.add_argument("--vllm", action="store_true", help="also time the vllm backend")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from fusion.artifacts.logit_store import write_shard
    from fusion.backends.hf import HFBackend
    from fusion.capture.logit_job import score_shard
    from fusion.capture.throughput import Throughput
    from fusion.data.batching import length_sorted_batches, pad_sequences, padded_tokens
    from fusion.data.conversations import encode_rows, load_conversations
    from fusion.options import LogitOptions

    n, repeat = (64, 1) if args.quick else (args.conversations, args.repeat)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    model_dir = build_model(args.work_dir / ("model-quick" if args.quick else "model"), args.quick)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = build_corpus(args.work_dir / f"chats-skewed-{n}.jsonl", n, tokenizer)
    rows = load_conversations(str(data), cache_dir=str(args.work_dir / "cache"))
    encoded = list(encode_rows(rows, tokenizer, template="own", max_length=LONGEST, strict=True))
    lengths = [len(e.input_ids) for _, e in encoded]
    tokens = sum(lengths)
    torch.set_grad_enabled(False)
    backend = HFBackend(str(model_dir), LogitOptions(top_k=args.top_k, dtype="float32", device=args.device))
    device = backend.device
    params = sum(p.numel() for p in backend.model.parameters())
    defaults = LogitOptions()
    settings = {"fixed": {"batch_size": 8, "batch_tokens": 0},
                "budget": {"batch_size": defaults.batch_size, "batch_tokens": defaults.batch_tokens}}
    out_dir = Path(tempfile.mkdtemp(dir=args.work_dir))

    def plain(batches: list[list[int]]) -> Callable[[], None]:
        def run() -> None:
            for batch in batches:
                ids, mask = pad_sequences([encoded[i][1].input_ids for i in batch], 0)
                backend.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.sum().item()
        return run

    def store(name: str) -> Callable[[], None]:
        def run() -> None:
            records = score_shard(backend, encoded, Throughput(tokens), log=lambda _: None, **settings[name])
            write_shard(out_dir / f"shard-{name}.arrow", records, "uint16")
        return run

    runs = {}
    for name, s in settings.items():
        batches = length_sorted_batches(lengths, s["batch_size"], s["batch_tokens"])
        padded = sum(padded_tokens(lengths, b) for b in batches)
        runs[name] = {"batches": len(batches), "padding": 1 - tokens / padded,
                      "plain": plain(batches), "store": store(name)}
    plain(length_sorted_batches(lengths, 8)[-4:])()  # warm-up
    best: dict[tuple[str, str], tuple[float, float]] = {}
    for _ in range(repeat):
        for name, run in runs.items():
            for path in ("plain", "store"):
                seconds, mib = measure(run[path], device)
                prev = best.get((name, path))
                best[(name, path)] = (min(seconds, prev[0]) if prev else seconds, max(mib, prev[1]) if prev else mib)

    print(f"model: {params / 1e6:.1f}M params on {device}, {len(encoded)} conversations, {tokens:,} tokens "
          f"(lengths {min(lengths)}-{max(lengths)}, median {int(np.median(lengths))}), K={args.top_k}, "
          f"{torch.get_num_threads()} threads, best of {repeat}")
    memory = "peak alloc MiB" if device.type == "cuda" else "peak RSS+ MiB"
    print(f"{'batching':<26}{'batches':>8}{'padding':>9}{'path':>7}{'best s':>9}{'tok/s':>10}{memory:>16}")
    for name, s in settings.items():
        label = f"{name} ({s['batch_size']} seq, {s['batch_tokens']} tok)"
        for path in ("plain", "store"):
            seconds, mib = best[(name, path)]
            print(f"{label:<26}{runs[name]['batches']:>8}{runs[name]['padding']:>9.1%}{path:>7}{seconds:>9.3f}"
                  f"{tokens / seconds:>10,.0f}{mib:>16,.0f}")
    speedup = best[("fixed", "store")][0] / best[("budget", "store")][0]
    print(f"store tokens/s, budget over fixed: {speedup:.2f}x")
    for name in settings:
        ratio = best[(name, "store")][0] / best[(name, "plain")][0]
        print(f"store over plain time at the {name} batches: {ratio:.3f} "
              f"(target <= 1: {'met' if ratio <= 1 else 'NOT met'})")
    if args.vllm:
        from fusion.backends.vllm import VLLMBackend

        engine = VLLMBackend(str(model_dir), LogitOptions(backend="vllm", top_k=args.top_k, dtype="float32",
                                                        max_length=LONGEST))
        store_v = lambda: score_shard(engine, encoded, Throughput(tokens), batch_size=1)  # noqa: E731
        store_v()  # warm-up
        seconds, _ = measure(store_v, device)
        print(f"vllm store: {seconds:.3f}s, {tokens / seconds:,.0f} tok/s "
              f"({best[('budget', 'store')][0] / seconds:.2f}x the hf budget store)")
        engine.close()


if __name__ == "__main__":
    main()
