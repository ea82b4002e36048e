"""DTW token alignment: ``fusion.align.dtw.dtw_align`` against the plain per-pair reference.

Why: the issue's target is relative (``dtw_align`` >= 50x faster than ``dtw_align_plain`` on
~600-token sequences), so both run here on the same inputs, in one process, and must return
the same alignment.

Inputs: a deterministic English text with digits, punctuation, accents and emoji, grown a
sentence at a time until both toy tokenizers (``metaspace`` '▁' as source, ``bytelevel``
'Ġ' as pivot, trained locally) give at least ``--tokens`` tokens; the raw vocabulary pieces
(``convert_ids_to_tokens``) are aligned. Run::

    .venv/bin/python benchmarks/bench_dtw_kernel.py [--tokens 600] [--rounds 5] [--repeat 10]

Each round times one plain call and the best of ``--repeat`` fast calls, alternating, so
load from other processes hits both. Prints the sizes, the best time of each, the fast
path's stages, and the ratio (best/best and median over rounds). Nothing here asserts
absolute times.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable

from fusechat_merge.demo.toy import make_tokenizer
from fusion.align.dtw import (
    _accumulate,
    _backtrack,
    dtw_align,
    dtw_align_plain,
    dtw_cost_matrix,
)

TEXT_WORDS = (
    "the model merges weights quickly while tokenization differs between vocabularies and "
    "alignment keeps positions monotone; fusion distils knowledge from several chat models"
)
WORDS = TEXT_WORDS.split()
EXTRAS = ("1234", "3.14", "2+2=4", "café", "naïve", "Ünïcödé", "😀", "🚀", "→", "—", "(x)", "#42")


def sentence(rng: random.Random) -> str:
    """One varied sentence, so the text is not a single repeated tokenization."""
    words = [rng.choice(WORDS) if rng.random() < 0.8 else rng.choice(EXTRAS) for _ in range(12)]
    return " ".join(words).capitalize() + rng.choice([".", "!", "?", ";", ","]) + " "


def token_pair(tokens: int, seed: int = 0) -> tuple[list[str], list[str], str, str]:
    """Source ('▁') and pivot ('Ġ') raw pieces of one text, each at least ``tokens`` long."""
    src_tok, piv_tok = make_tokenizer("metaspace"), make_tokenizer("bytelevel")
    rng, text = random.Random(seed), ""

    def pieces(tok) -> list[str]:
        return tok.convert_ids_to_tokens(tok(text, add_special_tokens=False)["input_ids"])

    while min(len(pieces(src_tok)), len(pieces(piv_tok))) < tokens:
        text += sentence(rng)
    return pieces(src_tok), pieces(piv_tok), "▁", "Ġ"  # the toy tokenizers' space markers


def best_time(fn: Callable[[], object], repeat: int) -> float:
    """Smallest wall time of ``repeat`` calls (least disturbed by the rest of the machine)."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=600)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    src, piv, sm, pm = token_pair(args.tokens)
    kw = {"src_marker": sm, "piv_marker": pm}
    fast, plain = dtw_align(src, piv, **kw), dtw_align_plain(src, piv, **kw)
    if fast != plain:
        raise SystemExit("dtw_align and dtw_align_plain disagree")

    # Rounds alternate plain and fast, so a busy machine slows both alike; best of each.
    t_plain, t_fast, ratios = [], [], []
    for _ in range(args.rounds):
        t_plain.append(best_time(lambda: dtw_align_plain(src, piv, **kw), 1))
        t_fast.append(best_time(lambda: dtw_align(src, piv, **kw), args.repeat))
        ratios.append(t_plain[-1] / t_fast[-1])
    cost = dtw_cost_matrix(src, piv, **kw)
    grid = _accumulate(cost)
    stages = {
        "cost matrix": best_time(lambda: dtw_cost_matrix(src, piv, **kw), args.repeat),
        "accumulate": best_time(lambda: _accumulate(cost), args.repeat),
        "backtrack": best_time(lambda: _backtrack(grid), args.repeat),
    }
    print(f"source ({sm!r}): {len(src)} tokens, pivot ({pm!r}): {len(piv)} tokens")
    print(f"plain  : {min(t_plain) * 1e3:9.2f} ms (best of {args.rounds})")
    print(f"ours   : {min(t_fast) * 1e3:9.2f} ms (best of {args.rounds} x {args.repeat})")
    for name, seconds in stages.items():
        print(f"  {name:12s}: {seconds * 1e3:7.2f} ms")
    ratio = min(t_plain) / min(t_fast)
    print(f"speed-up: {ratio:.1f}x best/best, {statistics.median(ratios):.1f}x median of rounds")
    print(f"target >= 50x: {'met' if ratio >= 50 else 'NOT met'}")


if __name__ == "__main__":
    main()
