"""A small conversation corpus written as real files (both row formats)."""

from __future__ import annotations

import json
from pathlib import Path

REPLIES = [
    "The capital of France is Paris.",
    "2 + 2 = 4, and 12 * 12 = 144.",
    "Sure! Here's a list: apples, pears; plums.",
    "Bonjour le monde! Ünïcode works: ÄÖÜ ß é 😀",
    "def add(a, b):\n    return a + b",
    "Model merging combines the weights of several fine-tuned models.",
]
# CJK, emoji (with a skin-tone modifier), typographic quotes and dashes, ×, ≈, and numerals:
# where byte-level and byte-fallback tokenizers, and digit-splitting rules, part ways
UNICODE_REPLIES = [
    "价格是 1234 元。你好世界！",
    "“Quotes” — ‘single’ … 3×4≈12, naïve café",
    "Emoji 😀🎉 👍🏽 ok → done",
    "In 2024, 365 days × 24 h = 8760 h; 1234567 ≈ 1.23e6.",
    "東京タワーは 333 m です。",
    "Total: 19.99 + 250.5 = 270.49 (≈ 270)",
]
QUESTIONS = [
    "What is the capital of France?",
    "Compute 2+2 and 12*12.",
    "List three fruits, please.",
    "Say hello in French and show some Unicode.",
    "Write a Python add function.",
    "What is model merging?",
]


def conversations(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        q, a = QUESTIONS[i % len(QUESTIONS)], REPLIES[i % len(REPLIES)]
        turns = [{"from": "human", "value": f"{q} (#{i})"}, {"from": "gpt", "value": a}]
        if i % 3 == 0:
            turns += [{"from": "human", "value": "And again?"}, {"from": "gpt", "value": REPLIES[(i + 1) % 6]}]
        rows.append({"id": f"conv-{i}", "conversations": turns})
    return rows


def unicode_conversations(n: int) -> list[dict]:
    """Like `conversations`, with replies from ``UNICODE_REPLIES`` and `REPLIES` alternating."""
    rows = conversations(n)
    for i, row in enumerate(rows):
        if i % 2 == 0:
            row["conversations"][1]["value"] = UNICODE_REPLIES[(i // 2) % len(UNICODE_REPLIES)]
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path
