"""Token-alignment throughput: ``offsets`` and ``dtw`` against the reference-style plain DP.

A corpus of conversations (~600 tokens each with the toy tokenizers) is rendered with a
'▁' pivot tokenizer and a byte-level 'Ġ' source tokenizer (`fusion.data.render`), then
aligned position by position:

* ``offsets``: `fusion.align.offsets_alignment` (exact, from character spans);
* ``dtw``: `fusion.align.dtw_alignment` (rapidfuzz cost matrix + vectorised DP);
* ``plain``: the same DTW with `fusion.dtw.dtw_align_plain` (a Python double loop calling
  the edit distance once per pair, as the reference code does), on a subset.

It prints aligned pivot tokens per second for each, the dtw/plain ratio (target ≥ 50×),
whether offsets reaches 1M tokens/s, and how often offsets and dtw agree. Run:

    python benchmarks/bench_align.py [--conversations 2000] [--plain-subset 20]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from common import reply


def encode_all(tokenizer, n: int, words: int):
    from fusion.align import TokenView
    from fusion.data import Turn, render

    views = []
    for i in range(n):
        turns = [Turn("user", f"Question {i}: tell me more."), Turn("assistant", reply(i, words))]
        enc = render(tokenizer, turns, max_length=4096)
        views.append(
            TokenView(
                np.asarray(enc.input_ids),
                np.asarray(enc.loss_mask, dtype=bool),
                np.asarray(enc.token_offsets).reshape(-1, 2),
                np.asarray(enc.reply_spans).reshape(-1, 2),
            )
        )
    return views


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=2000)
    parser.add_argument("--words", type=int, default=320, help="reply length (~600 toy tokens)")
    parser.add_argument("--plain-subset", type=int, default=20)
    args = parser.parse_args()

    from fusechat_merge.demo.toy import make_tokenizer
    from fusion import align, dtw
    from fusion.vocab_map import piece_texts

    piv_tok, src_tok = make_tokenizer("metaspace"), make_tokenizer("bytelevel")
    started = time.perf_counter()
    pivots = encode_all(piv_tok, args.conversations, args.words)
    sources = encode_all(src_tok, args.conversations, args.words)
    tokens = sum(len(v.positions) for v in pivots)
    print(
        f"{args.conversations} conversations, {tokens / args.conversations:.0f} trained pivot "
        f"tokens each on average (encoded in {time.perf_counter() - started:.1f}s)"
    )
    piv_texts, src_texts = piece_texts(piv_tok), piece_texts(src_tok)

    def run_offsets(pairs):
        return [align.offsets_alignment(p, s) for p, s in pairs]

    def run_dtw(pairs, kernel=dtw.dtw_align):
        return [
            align.dtw_alignment(
                p, s, piv_texts, src_texts, pivot_marker=" ", source_marker=" ", kernel=kernel
            )
            for p, s in pairs
        ]

    pairs = list(zip(pivots, sources, strict=True))
    subset = pairs[: args.plain_subset]
    sub_tokens = sum(len(p.positions) for p, _ in subset)
    rates: dict[str, float] = {}

    start = time.perf_counter()
    by_offsets = run_offsets(pairs)
    rates["offsets"] = tokens / (time.perf_counter() - start)
    start = time.perf_counter()
    by_dtw = run_dtw(pairs)
    rates["dtw"] = tokens / (time.perf_counter() - start)
    # side by side on the subset: the fast kernel, then the plain one in its place
    start = time.perf_counter()
    fast_subset = run_dtw(subset)
    rates["dtw (subset)"] = sub_tokens / (time.perf_counter() - start)
    start = time.perf_counter()
    plain_subset = run_dtw(subset, kernel=dtw.dtw_align_plain)
    rates["plain (subset)"] = sub_tokens / (time.perf_counter() - start)
    assert all(np.array_equal(a, b) for a, b in zip(fast_subset, plain_subset, strict=True))

    print(f"{'method':<16}{'tokens/s':>14}")
    for name, rate in rates.items():
        print(f"{name:<16}{rate:>14,.0f}")
    ratio = rates["dtw (subset)"] / rates["plain (subset)"]
    print(
        f"dtw / plain (same {len(subset)} conversations): {ratio:.0f}x "
        f"(target >= 50x: {'met' if ratio >= 50 else 'NOT met'})"
    )
    print(
        f"offsets: {rates['offsets'] / 1e6:.2f}M tokens/s "
        f"(target >= 1M: {'met' if rates['offsets'] >= 1e6 else 'NOT met'})"
    )
    agree = sum(int((a == b).sum()) for a, b in zip(by_offsets, by_dtw, strict=True))
    aligned = sum(int((a >= 0).sum()) for a in by_offsets)
    print(
        f"offsets and dtw agree on {agree / tokens:.1%} of pivot positions; "
        f"offsets aligns {aligned / tokens:.1%}"
    )


if __name__ == "__main__":
    main()
