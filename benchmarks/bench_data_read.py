"""What reading a local corpus costs when `datasets`' cache is keyed by content.

`fusion.data.conversations.load_conversations` names the `datasets` builder config after the files'
content fingerprint (`fusion.data.content_cache`), so an in-place edit that keeps size and mtime
is parsed anew. This prints, side by side in one run and best of ``--repeats``, on a
JSON-lines corpus of ``--conversations`` rows (three turns of a few sentences each):

* ``mtime``: `datasets` as before (key: path and mtime; stale after such an edit), cold
  (parse into an empty cache) and warm (a cache hit);
* ``content``: as shipped (sha256 of the file, then a cache hit or a parse), cold and warm;
* ``none``: no reuse at all (a fresh cache folder per read: parse every time).

The ratio that matters is content warm / mtime warm (what every rerun pays for being right)
and content warm / none (against the other correct choice). Run:

    python benchmarks/bench_data_read.py [--conversations 100000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path


def write_corpus(path: Path, n: int) -> Path:
    rng = random.Random(0)
    words = ["the", "a", "model", "merge", "fusion", "token", "pivot", "source", "reply", "prompt", "chat", "skill", "layer", "weight"]
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            turns = [{"from": "human" if t % 2 == 0 else "gpt",
                      "value": " ".join(rng.choice(words) for _ in range(rng.randint(20, 80)))} for t in range(3)]
            f.write(json.dumps({"id": f"c{i}", "conversations": turns}) + "\n")
    return path


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    import datasets

    from fusion.data.content_cache import load_local

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        corpus = write_corpus(root / "corpus.jsonl", args.conversations)
        print(f"{args.conversations} conversations, {corpus.stat().st_size / 2**20:.1f} MiB")
        files = {"train": [str(corpus)]}

        def mtime(cache: Path):
            return lambda: datasets.load_dataset("json", data_files=files, split="train", cache_dir=str(cache))

        def content(cache: Path):
            return lambda: load_local("json", [corpus], split="train", cache_dir=str(cache))

        runs: dict[str, list[float]] = {k: [] for k in ("mtime cold", "mtime warm", "content cold",
                                                        "content warm", "none")}
        for r in range(args.repeats):
            for kind, make in (("mtime", mtime), ("content", content)):
                cache = root / f"cache-{kind}-{r}"
                runs[f"{kind} cold"].append(timed(make(cache)))
                runs[f"{kind} warm"].append(timed(make(cache)))
            runs["none"].append(timed(mtime(root / f"cache-none-{r}")))  # an empty cache: a parse
        best = {k: min(v) for k, v in runs.items()}
        for kind, seconds in best.items():
            print(f"  {kind:13s} {seconds:7.3f} s")
        print(f"content warm / mtime warm: {best['content warm'] / best['mtime warm']:.2f}x")
        print(f"content warm / none:       {best['content warm'] / best['none']:.2f}x")
        print(f"content cold / mtime cold: {best['content cold'] / best['mtime cold']:.2f}x")


if __name__ == "__main__":
    main()
