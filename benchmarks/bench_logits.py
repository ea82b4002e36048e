"""Teacher-logit throughput: the ``hf`` backend and store writing vs a plain forward pass.

Both run on the same length-sorted, padded batches of the same encoded corpus, one after
the other, in one process, alternating over ``--repeat`` rounds (best round reported):

* ``plain``: ``model(input_ids, attention_mask).logits`` (what any scoring script pays);
* ``ours``: ``HFBackend.score`` (top-K of float32 ``log_softmax`` at trained positions and
  the gold log-probability) plus building the records and writing an Arrow shard.

It prints tokens/s of each, their ratio (target: ours ≤ 1.15× plain's time), and the
store's bytes per token (target ≤ 60 at K = 10). Run:

    python benchmarks/bench_logits.py [--conversations 64] [--repeat 3] [--quick]

With ``--vllm`` (needs vLLM; a GPU for a meaningful number) it also times the ``vllm``
backend on the same data.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import toy_model, write_chats


def build_model(path: Path, quick: bool) -> Path:
    """A ~50M-parameter Llama (vocab 32000) with the toy '▁' tokenizer, made locally."""
    hidden, layers = (256, 4) if quick else (512, 8)
    return toy_model(
        path,
        "metaspace",
        "llama",
        seed=0,
        vocab_size=32000,
        hidden_size=hidden,
        intermediate_size=int(hidden * 2.75),
        layers=layers,
        heads=8,
        kv_heads=8,
        max_position_embeddings=2048,
    )


def build_corpus(path: Path, n: int) -> Path:
    """Conversations of a few hundred tokens with the toy tokenizer."""
    sentences = [
        "Knowledge fusion distils several chat models into one pivot.",
        "The capital of France is Paris, and 12 * 12 = 144.",
        "Model merging combines the weights of several fine-tuned models.",
        "Bonjour le monde! Hallo Welt! ÄÖÜ ß é",
    ]
    return write_chats(
        path,
        (
            (
                f"Question {i}: {sentences[i % 4]}",
                " ".join(sentences[(i + j) % 4] for j in range(3 + i % 5)),
            )
            for i in range(n)
        ),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, default=Path("bench-work/logits"))
    parser.add_argument("--conversations", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a ~10M model and 16 conversations")
    parser.add_argument("--vllm", action="store_true", help="also time the vllm backend")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from fusion.artifacts.logit_store import write_shard
    from fusion.backends.hf import HFBackend
    from fusion.data import encode_rows, load_conversations
    from fusion.logits import length_sorted_batches, score_shard

    n = 16 if args.quick else args.conversations
    args.work_dir.mkdir(parents=True, exist_ok=True)
    model_dir = build_model(
        args.work_dir / ("model-quick" if args.quick else "model-50M"), args.quick
    )
    data = build_corpus(args.work_dir / f"chats-{n}.jsonl", n)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = load_conversations(str(data), cache_dir=str(args.work_dir / "cache"))
    encoded = list(encode_rows(rows, tokenizer, template="own", max_length=2048, strict=True))
    tokens = sum(len(e.input_ids) for _, e in encoded)
    torch.set_grad_enabled(False)
    backend = HFBackend(str(model_dir), top_k=args.top_k, dtype="float32", device="cpu")
    params = sum(p.numel() for p in backend.model.parameters())
    batches = length_sorted_batches([len(e.input_ids) for _, e in encoded], args.batch_size)

    def plain() -> None:
        for batch in batches:
            seqs = [encoded[i][1].input_ids for i in batch]
            t_max = max(map(len, seqs))
            ids = torch.zeros(len(seqs), t_max, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for b, s in enumerate(seqs):
                ids[b, : len(s)] = torch.tensor(s)
                mask[b, : len(s)] = 1
            backend.model(input_ids=ids, attention_mask=mask).logits.sum()

    out_dir = Path(tempfile.mkdtemp(dir=args.work_dir))

    def ours() -> None:
        records = score_shard(backend, encoded, args.batch_size, lambda _: None)
        write_shard(out_dir / "shard-00000.arrow", records, "uint16")

    timings: dict[str, list[float]] = {"plain": [], "ours": []}
    plain()  # warm-up
    for _ in range(args.repeat):
        for name, fn in (("plain", plain), ("ours", ours)):
            start = time.perf_counter()
            fn()
            timings[name].append(time.perf_counter() - start)
    best = {k: min(v) for k, v in timings.items()}
    size = (out_dir / "shard-00000.arrow").stat().st_size
    print(
        f"model: {params / 1e6:.1f}M params, {len(encoded)} conversations, {tokens:,} tokens, "
        f"K={args.top_k}, batch {args.batch_size}, {torch.get_num_threads()} threads"
    )
    print(f"{'path':<8}{'best s':>10}{'tok/s':>12}")
    for name in ("plain", "ours"):
        print(f"{name:<8}{best[name]:>10.3f}{tokens / best[name]:>12,.0f}")
    ratio = best["ours"] / best["plain"]
    print(
        f"time ratio ours/plain: {ratio:.3f} (target <= 1.15: {'met' if ratio <= 1.15 else 'NOT met'})"
    )
    bpt = size / tokens
    print(
        f"store: {size:,} bytes, {bpt:.1f} bytes/token (target <= 60: {'met' if bpt <= 60 else 'NOT met'})"
    )
    positions = sum(int(np.asarray(e.loss_mask)[1:].sum()) for _, e in encoded)
    print(f"trained positions: {positions / tokens:.0%} of tokens")
    if args.vllm:
        from fusion.backends.vllm import VLLMBackend

        engine = VLLMBackend(str(model_dir), top_k=args.top_k, dtype="auto", max_length=2048)
        seqs = [e.input_ids for _, e in encoded]
        pos = [np.flatnonzero(np.asarray(e.loss_mask)[1:]) for _, e in encoded]
        engine.score(seqs, pos)
        start = time.perf_counter()
        engine.score(seqs, pos)
        t_vllm = time.perf_counter() - start
        print(
            f"vllm    {t_vllm:>10.3f}{tokens / t_vllm:>12,.0f}  ({best['ours'] / t_vllm:.2f}x hf)"
        )


if __name__ == "__main__":
    main()
