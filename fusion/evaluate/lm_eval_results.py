"""lm-eval's results dictionary: as JSON (written atomically), as lm-eval's own table, and
as ``{task: {metric: value}}`` for reports."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fusion.artifacts.atomic import write_text_atomic

# Keys of lm-eval's per-task result entries that are not metrics.
_NOT_METRICS = frozenset({"alias", "name", "sample_len", "samples"})


def _json_default(value: Any) -> Any:
    """numpy scalars and arrays, sets, dtypes and the like as JSON."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    return str(value)


def results_json(results: Mapping[str, Any]) -> str:
    """lm-eval's results as JSON text (per-sample logs are not part of it)."""
    kept = {k: v for k, v in results.items() if k != "samples"}
    return json.dumps(kept, indent=2, default=_json_default, ensure_ascii=False)


def write_results(results: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write the results JSON atomically (a reader never sees half of it)."""
    return write_text_atomic(path, results_json(results) + "\n")


def format_table(results: Mapping[str, Any]) -> str:
    """lm-eval's own markdown table(s): tasks, then groups when there are any."""
    from lm_eval.utils import make_table

    table = make_table(dict(results))
    if results.get("groups"):
        table += "\n" + make_table(dict(results), "groups")
    return table


def metrics_by_task(results: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` from lm-eval's results, for reports.

    lm-eval keys a metric as ``"metric,filter"``; the filter is dropped when it is lm-eval's
    default ``none`` and kept otherwise (``"exact_match,strict-match"``). Standard errors
    and non-numeric entries are left out.
    """
    out: dict[str, dict[str, float]] = {}
    for task, entry in (results.get("results") or {}).items():
        metrics: dict[str, float] = {}
        for key, value in entry.items():
            if key in _NOT_METRICS or "_stderr" in key:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            metric, _, filter_name = key.partition(",")
            name = metric if filter_name in ("", "none") else key
            metrics[name] = float(value) if math.isfinite(float(value)) else float("nan")
        out[task] = metrics
    return out
