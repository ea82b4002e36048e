"""Tokens scored against time: the progress line of a scoring run and its record.

A real corpus takes hours per model; the stage log says how far a run is, how fast it
goes and when it ends, and the store's manifest keeps the figures (``scoring``), so a
slow part or a batch setting that pads too much shows after the fact.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Throughput:
    """Counts of one run (tokens real and padded, batches, halvings) and their rates."""

    total: int
    """Tokens this run has to score (resumed shards excluded)."""
    on_tokens: Callable[[int], None] | None = None
    """Told the real tokens of each pass (a progress bar's ``update``)."""
    clock: Callable[[], float] = time.perf_counter
    tokens: int = 0
    padded: int = 0
    """Tokens the forward passes occupied, padding included."""
    batches: int = 0
    halved: int = 0
    """Batches split in two after running out of device memory."""
    started: float = field(init=False)

    def __post_init__(self) -> None:
        self.started = self.clock()

    def add(self, tokens: int, padded: int) -> None:
        """One forward pass (one generate call for vLLM) of ``tokens`` real tokens."""
        self.tokens += tokens
        self.padded += padded
        self.batches += 1
        if self.on_tokens is not None:
            self.on_tokens(tokens)

    @property
    def seconds(self) -> float:
        return self.clock() - self.started

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)

    @property
    def padding_share(self) -> float:
        """Share of the forward passes' tokens that were padding."""
        return 1.0 - self.tokens / self.padded if self.padded else 0.0

    def eta_s(self) -> float | None:
        """Seconds left at the rate so far (None before the first token)."""
        return (self.total - self.tokens) / self.tokens_per_s if self.tokens else None

    def line(self) -> str:
        """``1,234/5,678 tokens (22%), 456 tok/s, padding 7%, ETA 0:00:09``."""
        share = self.tokens / self.total if self.total else 1.0
        eta = self.eta_s()
        return (f"{self.tokens:,}/{self.total:,} tokens ({share:.0%}), {self.tokens_per_s:,.0f} tok/s, "
                f"padding {self.padding_share:.0%}, ETA {_clock(eta) if eta is not None else '?'}")

    def record(self) -> dict[str, Any]:
        """The figures for the store's manifest and the stage record (JSON types)."""
        return {"tokens": self.tokens, "seconds": round(self.seconds, 3),
                "tokens_per_s": round(self.tokens_per_s, 1), "padding_share": round(self.padding_share, 4),
                "batches": self.batches, "oom_halvings": self.halved}


def _clock(seconds: float) -> str:
    whole = int(round(seconds))
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"
