"""The SCE tensor report: per-layer aggregation, atomic CSV/PNG writes."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
from helpers import assert_png

from fusechat_merge.report.sce import (
    coefficients_by_layer,
    fractions_by_layer,
    layer_column,
    mean_coefficients,
    short_names,
    write_sce_report,
)
from fusechat_merge.sce import SCEStats
from fusechat_merge.stats_sink import TensorStats

MODELS = ("/ckpt/run1/target_a", "/ckpt/run2/target_b/")


def stats(tensor, etas, numel, selected=None, erased=0, nonzero=None, models=MODELS):
    """A TensorStats as the merge would record it (defaults: all selected, none erased)."""
    nonzero = numel * len(etas) if nonzero is None else nonzero
    selected = numel if selected is None else selected
    return TensorStats(tensor, models, SCEStats(tuple(etas), numel, selected, erased, nonzero))


@pytest.fixture
def rows():
    return [
        stats("model.layers.1.mlp.down_proj.weight", (0.5, 0.5), 10),
        stats("model.layers.0.self_attn.q_proj.weight", (0.8, 0.2), 300, selected=150),
        stats("model.layers.0.input_layernorm.weight", (0.2, 0.8), 100, erased=50),
        stats("lm_head.weight", (0.4, 0.6), 40),
        stats("model.embed_tokens.weight", (0.1, 0.9), 40),
        stats("model.norm.weight", (0.3, 0.7), 4),
        stats("model.layers.10.mlp.up_proj.weight", (0.6, 0.4), 10),
    ]


def test_layer_column():
    assert layer_column("model.layers.3.self_attn.q_proj.weight") == "3"
    assert layer_column("transformer.h.12.attn.c_attn.weight") == "12"
    assert layer_column("model.embed_tokens.weight") == "embed"
    assert layer_column("lm_head.weight") == "lm_head"
    assert layer_column("model.norm.weight") == "final"
    assert layer_column(None) == "other"
    assert layer_column("rotary.inv_freq") == "other"


def test_short_names_take_last_component_unless_they_collide():
    assert short_names(list(MODELS)) == ["target_a", "target_b"]
    assert short_names(["a/x", "b/x", "c/y"]) == ["a/x", "b/x", "y"]
    assert short_names(["C:\\models\\m1", "hub-org/m2"]) == ["m1", "m2"]


def test_coefficients_by_layer_groups_and_weights_by_numel(rows):
    targets, columns, eta = coefficients_by_layer(rows)
    assert targets == ["target_a", "target_b"]
    # layers in numeric order (10 after 1), embed first, final and lm_head last
    assert columns == ["embed", "0", "1", "10", "final", "lm_head"]
    assert eta.shape == (2, 6)
    # layer 0: (0.8·300 + 0.2·100) / 400, not the unweighted (0.8 + 0.2) / 2
    assert eta[0, 1] == pytest.approx((0.8 * 300 + 0.2 * 100) / 400)
    assert eta[1, 1] == pytest.approx((0.2 * 300 + 0.8 * 100) / 400)
    np.testing.assert_allclose(eta[:, 0], [0.1, 0.9])
    np.testing.assert_allclose(eta[:, 4], [0.3, 0.7])
    np.testing.assert_allclose(eta[:, 5], [0.4, 0.6])
    np.testing.assert_allclose(eta.sum(axis=0), 1.0)  # η sums to 1 per tensor, so per column


def test_coefficients_by_layer_marks_missing_targets_and_empty_tensors():
    rows = [
        stats("model.layers.0.a.weight", (0.25, 0.75), 8),
        stats("model.layers.1.a.weight", (1.0,), 8, models=("/m/only_a",)),
        stats("model.layers.2.a.weight", (0.3, 0.7), 0, models=("/m/only_a", "/x/b")),
        stats("model.layers.2.b.weight", (0.5, 0.5), 0, models=("/m/only_a", "/x/b")),
    ]
    targets, columns, eta = coefficients_by_layer(rows)
    assert targets == ["target_a", "target_b", "only_a", "b"]
    assert columns == ["0", "1", "2"]
    assert math.isnan(eta[0, 1]) and math.isnan(eta[2, 0])
    assert eta[2, 1] == 1.0
    # all tensors empty: unweighted mean instead of 0/0
    assert eta[2, 2] == pytest.approx(0.4) and eta[3, 2] == pytest.approx(0.6)


def test_fractions_by_layer_pool_counts(rows):
    columns, selected, erased = fractions_by_layer(rows)
    j = columns.index("0")
    assert selected[j] == pytest.approx((150 + 100) / 400)
    assert erased[j] == pytest.approx(50 / 800)
    assert selected[columns.index("1")] == 1.0 and erased[columns.index("1")] == 0.0


def test_write_sce_report_writes_csv_and_png_atomically(tmp_path, rows):
    out = tmp_path / "report"
    csv_path = write_sce_report(rows, out)
    assert csv_path == out / "sce_report.csv"
    assert sorted(p.name for p in out.iterdir()) == ["sce_coefficients.png", "sce_report.csv"]
    with csv_path.open(encoding="utf-8") as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == 2 * len(rows)
    assert {r["model"] for r in table} == set(MODELS)
    assert_png(out / "sce_coefficients.png")
    # overwriting an existing report also leaves no temporary file behind
    write_sce_report(rows[:2], out)
    assert sorted(p.name for p in out.iterdir()) == ["sce_coefficients.png", "sce_report.csv"]


def test_write_sce_report_with_many_layers_and_no_rows(tmp_path):
    many = [stats(f"model.layers.{i}.mlp.weight", (0.5, 0.5), 4) for i in range(40)]
    assert_png(write_sce_report(many, tmp_path / "many").with_name("sce_coefficients.png"))
    empty = write_sce_report([], tmp_path / "empty")
    assert empty.read_text(encoding="utf-8").count("\n") == 1  # header only
    assert_png(empty.with_name("sce_coefficients.png"), min_bytes=1_000)


def test_failed_write_keeps_previous_file_and_no_tmp(tmp_path, rows, monkeypatch):
    out = tmp_path / "report"
    write_sce_report(rows, out)
    before = (out / "sce_coefficients.png").read_bytes()

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("matplotlib.figure.Figure.savefig", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        write_sce_report(rows, out)
    assert (out / "sce_coefficients.png").read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["sce_coefficients.png", "sce_report.csv"]


def test_mean_coefficients_unchanged(rows):
    means = mean_coefficients(rows)
    assert list(means) == list(MODELS)
    assert means[MODELS[0]] == pytest.approx(sum(r.stats.coefficients[0] for r in rows) / 7)
