"""Token-alignment throughput: ``offsets`` and ``dtw`` against the reference-style plain DP.

A corpus of conversations (~600 tokens each with the toy tokenizers) is rendered with a
'▁' pivot tokenizer and a byte-level 'Ġ' source tokenizer (`fusion.data.conversations.render`), then
aligned position by position:

* ``offsets``: `fusion.align.positions.offsets_alignment` (exact, from character spans);
* ``dtw``: `fusion.align.positions.dtw_alignment` (rapidfuzz cost matrix + vectorised DP);
* ``plain``: the same DTW with `fusion.align.dtw.dtw_align_plain` (a Python double loop calling
  the edit distance once per pair, as the reference code does), on a subset.

It prints aligned pivot tokens per second for each, the dtw/plain ratio (target ≥ 50×),
whether offsets reaches 1M tokens/s, and how often offsets and dtw agree.

Then the byte-prefix projection (`fusion.align.projection`): `fusechat-merge align` end to end
(`fusion.align.job.align_stores`: read the stores, align, write the aligned store) with
``offsets`` and projection off, then on, side by side on the same stores on disk (the tests'
tokenizer pairs, both directions, under one template; top-K lists of the gold token plus
random ids, K = 10), on the reply corpus and on a numeral-heavy one. It prints coverage with and without, time per
million pivot tokens, the time ratio (target ≤ 1.5×) and the aligned shard's growth over
today's columns (target ≤ 10%). Run:

    python benchmarks/bench_align.py [--conversations 2000] [--plain-subset 20] [--projection-conversations 150]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from common import reply


def encode_all(tokenizer, n: int, words: int):
    from fusion.align.positions import TokenView
    from fusion.data.conversations import Turn, render

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
    parser.add_argument("--projection-conversations", type=int, default=150)
    args = parser.parse_args()

    from fusechat_merge.demo.toy import make_tokenizer
    from fusion.align import dtw
    from fusion.align import positions as align
    from fusion.align.vocab_map import piece_texts

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
    bench_projection(args.projection_conversations, args.words)


NUMERAL_SENTENCES = (
    "In 2024 we shipped 1,234,567 units at 19.99 each, 365 days a year.",
    "12 * 12 = 144, 256 + 512 = 768 and 1000 - 1 = 999.",
    "The 3rd of 10 runs took 87.5 s; 4096 tokens at 128 per step is 32 steps.",
    "Version 3.14.159 was released on 2023-11-07 with 42 fixes.",
)


def write_store(root, name: str, tokenizer, texts: list[str], k: int, seed: int):
    """A logit store on disk of the conversations rendered under one template, with top-K
    lists of the actual next token plus random ids (what alignment reads; no model needed).
    The tokenizer is saved beside it, as a model directory would hold it."""
    from transformers import AutoTokenizer

    from fusion.artifacts.logit_store import (
        SequenceLogits,
        StoreOptions,
        finish_run,
        id_type_for,
        shard_name,
        tokenizer_fingerprint,
        write_shard,
    )
    from fusion.data.conversations import Turn, render

    model = root / f"tokenizer-{name}"
    tokenizer.save_pretrained(model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    rng = np.random.default_rng(seed)
    rows = []
    for i, text in enumerate(texts):
        enc = render(tokenizer, [Turn("user", f"Question {i}?"), Turn("assistant", text)],
                     template="shared", max_length=4096)
        ids, mask = np.asarray(enc.input_ids), np.asarray(enc.loss_mask, dtype=bool)
        pos = np.flatnonzero(mask[1:])
        top = rng.integers(0, len(tokenizer), (len(pos), k))
        top[:, 0] = ids[pos + 1]
        logits = np.sort(rng.normal(size=(len(pos), k)), axis=1)[:, ::-1] * 2
        lps = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True) - 0.1
        rows.append(SequenceLogits(f"c{i}", ids, mask, np.asarray(enc.token_offsets, dtype=np.int32).reshape(-1, 2),
                                   np.asarray(enc.reply_spans, dtype=np.int32).reshape(-1, 2), top,
                                   lps.astype(np.float16), lps[:, 0].astype(np.float32), 1.0, f"row-{i}"))
    out = root / f"store-{name}"
    out.mkdir()
    options = StoreOptions(model=str(model), tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
                           vocab_size=len(tokenizer), template="shared", top_k=k, max_length=4096, backend="hf",
                           dtype="float32", data="bench")
    write_shard(out / shard_name(0), rows, id_type_for(len(tokenizer)))
    finish_run(out, options, {})
    return out


def bench_projection(conversations: int, words: int) -> None:
    import shutil
    import tempfile
    from pathlib import Path

    import pyarrow as pa

    from fusechat_merge.demo.toy import make_tokenizer
    from fusion.align.job import StoreAlignment, align_stores

    k = 10
    tokenizers = {"metaspace": make_tokenizer("metaspace"), "bytelevel": make_tokenizer("bytelevel"),
                  "digits-1": make_tokenizer("metaspace", 600, digits="single"),
                  "digits-3": make_tokenizer("bytelevel", 600, digits="triples")}
    corpora = {"replies": [reply(i, words // 4) for i in range(conversations)],
               "numerals": [reply(i, words // 4, NUMERAL_SENTENCES) for i in range(conversations)]}
    pairs = [("metaspace", "bytelevel"), ("bytelevel", "metaspace"), ("digits-1", "digits-3"), ("digits-3", "digits-1")]
    print(f"\nprojection: {conversations} conversations per corpus, K = {k}, one template for both models, "
          "`align` end to end on stores on disk (vocab mode em), best of three")
    print(f"{'pair':<24}{'corpus':<10}{'coverage off':>13}{'on':>8}{'s/M tok off':>13}{'on':>8}{'ratio':>7}{'growth':>8}")
    worst_ratio = worst_growth = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for corpus, texts in corpora.items():
            root = Path(tmp) / corpus
            root.mkdir()
            stores = {name: write_store(root, name, tok, texts, k, seed)
                      for seed, (name, tok) in enumerate(tokenizers.items())}
            for pivot, source in pairs:
                seconds, manifests = {}, {}
                for _ in range(3):  # alternating, best of three: least disturbed by the machine
                    for mode in ("off", "on"):
                        out = root / f"aligned-{mode}"
                        shutil.rmtree(out, ignore_errors=True)
                        start = time.perf_counter()
                        manifests[mode] = align_stores(
                            StoreAlignment(pivot=str(stores[pivot]), source=str(stores[source]), out=str(out),
                                     projection=mode, vocab_mode="em"), progress=False, log=lambda _: None)
                        seconds[mode] = min(seconds.get(mode, np.inf), time.perf_counter() - start)
                tokens = manifests["on"].alignment["statistics"]["positions"]
                coverage = {m: manifests[m].alignment["statistics"]["aligned_fraction"] for m in manifests}
                # today's aligned shard: the same table without src_rule and the statistics
                shard = root / "aligned-on" / manifests["on"].shards[0]["file"]
                with pa.memory_map(str(shard)) as source_file:
                    table = pa.ipc.open_stream(source_file).read_all()
                table = table.drop_columns(["src_rule"]).replace_schema_metadata(None)
                with pa.OSFile(str(root / "today.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
                    w.write_table(table)
                today = (root / "today.arrow").stat().st_size
                ratio = seconds["on"] / seconds["off"]
                growth = manifests["on"].shards[0]["bytes"] / today - 1
                worst_ratio, worst_growth = max(worst_ratio, ratio), max(worst_growth, growth)
                per_m = {m: t / tokens * 1e6 for m, t in seconds.items()}
                print(f"{pivot + ' <- ' + source:<24}{corpus:<10}{coverage['off']:>13.1%}{coverage['on']:>8.1%}"
                      f"{per_m['off']:>13.1f}{per_m['on']:>8.1f}{ratio:>6.2f}x{growth:>7.1%}")
    print(f"worst time ratio on/off: {worst_ratio:.2f}x (target <= 1.5x: {'met' if worst_ratio <= 1.5 else 'NOT met'}); "
          f"worst aligned-store growth: {worst_growth:.1%} (target <= 10%: {'met' if worst_growth <= 0.10 else 'NOT met'})")


if __name__ == "__main__":
    main()
