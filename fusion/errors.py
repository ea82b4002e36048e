"""The one "did you mean" of every error that names an unknown key, method or task."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def did_you_mean(name: str, candidates: Iterable[str], n: int = 3) -> str:
    """``" (did you mean 'a' or 'b'?)"`` for the closest of ``candidates`` (empty: none close)."""
    close = [repr(c) for c in difflib.get_close_matches(name, list(candidates), n=n, cutoff=0.6)]
    if not close:
        return ""
    listed = close[0] if len(close) == 1 else f"{', '.join(close[:-1])} or {close[-1]}"
    return f" (did you mean {listed}?)"
