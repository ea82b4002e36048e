"""The results report: seed statistics, the terminal and Markdown tables, JSON and plot."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from helpers import assert_png

from fusechat_merge.report.results import (
    aggregate_seeds,
    format_results_table,
    lm_eval_rows,
    write_results_report,
)

EM = "fusechat_math_gen/exact_match"


def per_seed_results():
    """Three seeds of held-out losses and one lm-eval metric, in varying row order."""
    return [
        [
            {"model": "pivot", "kind": "pivot", "skill": "math", "loss": 2.0},
            {"model": "pivot", "kind": "pivot", "skill": EM, "value": 0.1},
            {"model": "pivot", "kind": "pivot", "skill": "chat", "loss": 3.0},
            {"model": "sce", "kind": "merge", "skill": "math", "loss": 1.0},
            {"model": "sce", "kind": "merge", "skill": EM, "value": 0.5},
        ],
        [
            {"model": "sce", "kind": "merge", "skill": "math", "loss": 1.5},
            {"model": "sce", "kind": "merge", "skill": EM, "value": 0.6},
            {"model": "pivot", "kind": "pivot", "skill": "math", "loss": 4.0},
            {"model": "pivot", "kind": "pivot", "skill": EM, "value": 0.3},
            {"model": "pivot", "kind": "pivot", "skill": "chat", "loss": 3.0},
        ],
        [
            {"model": "sce", "kind": "merge", "skill": "math", "loss": 2.0},
            {"model": "sce", "kind": "merge", "skill": EM, "value": 0.7},
        ],
    ]


def test_aggregate_seeds_means_and_sample_stds():
    out = aggregate_seeds(per_seed_results())
    assert [(r["model"], r["skill"]) for r in out] == [
        ("pivot", "math"), ("pivot", EM), ("pivot", "chat"), ("sce", "math"), ("sce", EM),
    ]
    pivot_math, pivot_em, pivot_chat, sce_math, sce_em = out
    assert pivot_math["loss_mean"] == pytest.approx(3.0)
    assert pivot_math["loss_std"] == pytest.approx(math.sqrt(2.0))  # sample std, ddof=1
    assert pivot_math["seeds"] == 2 and pivot_math["kind"] == "pivot"
    assert pivot_em["metric"] and pivot_em["value_mean"] == pytest.approx(0.2)
    assert pivot_em["value_std"] == pytest.approx(math.sqrt(0.02))
    assert pivot_chat["loss_std"] == 0.0
    assert sce_math["seeds"] == 3
    assert sce_math["loss_mean"] == pytest.approx(1.5)
    assert sce_math["loss_std"] == pytest.approx(0.5)
    assert sce_em["value_std"] == pytest.approx(0.1)


def test_aggregate_seeds_single_seed_has_zero_std():
    (row,) = aggregate_seeds([[{"model": "m", "kind": "target", "skill": "s", "loss": 1.25}]])
    assert row == {"model": "m", "kind": "target", "skill": "s", "loss_mean": 1.25, "loss_std": 0.0,
                   "seeds": 1}


@pytest.mark.parametrize(
    "per_seed",
    [
        [[{"model": "m", "kind": "merge", "skill": "s", "loss": 1.0}] * 2],
        [
            [{"model": "m", "kind": "merge", "skill": "s", "loss": 1.0}],
            [{"model": "m", "kind": "target", "skill": "s", "loss": 1.0}],
        ],
        [
            [{"model": "m", "kind": "merge", "skill": "t/acc", "value": 0.5}],
            [{"model": "m", "kind": "merge", "skill": "t/acc", "loss": 1.0}],
        ],
    ],
    ids=["duplicate-in-seed", "kind-changes", "metric-in-some-seeds"],
)
def test_aggregate_seeds_refuses_inconsistent_input(per_seed):
    with pytest.raises(ValueError):
        aggregate_seeds(per_seed)


def test_lm_eval_rows_drop_stderr_and_non_numbers():
    rows = lm_eval_rows("m", "merge", {"t": {"acc": 0.5, "acc_stderr": 0.1, "alias": "t"}})
    assert rows == [{"model": "m", "kind": "merge", "skill": "t/acc", "value": 0.5}]


def test_write_results_report(tmp_path):
    results = aggregate_seeds(per_seed_results())
    results.append({**results[3], "model": "a|b", "kind": "target"})
    paths = write_results_report(results, tmp_path / "res", title="merge methods")
    assert set(paths) == {"json", "md", "png"}
    assert sorted(p.name for p in (tmp_path / "res").iterdir()) == [
        "results.json",
        "results.md",
        "results.png",
    ]
    document = json.loads(paths["json"].read_text(encoding="utf-8"))
    assert document == {"title": "merge methods", "results": results}
    markdown = paths["md"].read_text(encoding="utf-8")
    assert markdown.startswith("# merge methods\n")
    assert "±" in markdown and "a\\|b" in markdown
    for model in ("pivot", "sce"):
        assert f"| {model} |" in markdown
    header = next(line for line in markdown.splitlines() if line.startswith("| model"))
    assert header == f"| model | kind | math loss | {EM} | chat loss |"
    assert "| 3.0000 ± 1.4142 | 0.200 ± 0.141 | 3.0000 ± 0.0000 |" in markdown
    assert_png(paths["png"])


def test_write_results_report_loss_only_and_numpy_values(tmp_path):
    results = [
        {
            "model": "m",
            "kind": "merge",
            "skill": "s",
            "loss_mean": np.float32(1.5),
            "loss_std": np.float64(0.25),
            "seeds": np.int64(3),
        }
    ]
    paths = write_results_report(results, tmp_path, title="t")
    assert json.loads(paths["json"].read_text(encoding="utf-8"))["results"][0]["seeds"] == 3
    assert paths["md"].read_text(encoding="utf-8").splitlines()[2] == "| model | kind | s loss |"
    assert_png(paths["png"])


def test_write_results_report_refuses_duplicates(tmp_path):
    results = aggregate_seeds(per_seed_results())
    with pytest.raises(ValueError, match="twice"):
        write_results_report([*results, results[0]], tmp_path, title="t")


def test_format_results_table_is_aligned():
    results = aggregate_seeds(per_seed_results())
    results.append({**results[3], "model": "a-much-longer-model-name", "loss_mean": 12.5})
    lines = format_results_table(results).splitlines()
    assert lines[0].split() == ["model", "kind", "math", "loss", EM, "chat", "loss"]
    assert set(lines[1]) == {"-", " "}
    assert len({len(line) for line in lines}) == 1  # every line padded to the same width
    body = lines[2:]
    assert [line.split()[0] for line in body] == ["pivot", "sce", "a-much-longer-model-name"]
    # numbers right-aligned: the "±" of each column at the same offset on every line
    plus_minus = [[i for i, ch in enumerate(line) if ch == "±"] for line in body]
    assert len(plus_minus[0]) == 3
    assert plus_minus[1] == plus_minus[0][:2]  # no chat result: "-"
    assert plus_minus[2] == plus_minus[0][:1]  # neither metric nor chat
    assert body[1].endswith(" -") and body[2].endswith(" -")
    assert "12.5000 ± 0.5000" in body[2]
