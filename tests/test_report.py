"""Reports: per-layer SCE aggregation, atomic CSV/PNG writes, seed statistics, tables."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from fusechat_merge.report import (
    aggregate_seeds,
    coefficients_by_layer,
    format_results_table,
    fractions_by_layer,
    layer_column,
    mean_coefficients,
    short_names,
    write_results_report,
    write_sce_report,
)
from fusechat_merge.sce import SCEStats
from fusechat_merge.stats_sink import TensorStats

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
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


def assert_png(path, min_bytes=5_000):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > min_bytes


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


def per_seed_results():
    return [
        [
            {"model": "pivot", "kind": "pivot", "skill": "math", "loss": 2.0, "exact_match": 0.1},
            {"model": "pivot", "kind": "pivot", "skill": "chat", "loss": 3.0, "exact_match": None},
            {"model": "sce", "kind": "merge", "skill": "math", "loss": 1.0, "exact_match": 0.5},
        ],
        [
            {"model": "sce", "kind": "merge", "skill": "math", "loss": 1.5, "exact_match": 0.6},
            {"model": "pivot", "kind": "pivot", "skill": "math", "loss": 4.0, "exact_match": 0.3},
            {"model": "pivot", "kind": "pivot", "skill": "chat", "loss": 3.0, "exact_match": None},
        ],
        [
            {"model": "sce", "kind": "merge", "skill": "math", "loss": 2.0, "exact_match": 0.7},
        ],
    ]


def test_aggregate_seeds_means_and_sample_stds():
    out = aggregate_seeds(per_seed_results())
    assert [(r["model"], r["skill"]) for r in out] == [
        ("pivot", "math"),
        ("pivot", "chat"),
        ("sce", "math"),
    ]
    pivot_math, pivot_chat, sce_math = out
    assert pivot_math["loss_mean"] == pytest.approx(3.0)
    assert pivot_math["loss_std"] == pytest.approx(math.sqrt(2.0))  # sample std, ddof=1
    assert pivot_math["em_mean"] == pytest.approx(0.2)
    assert pivot_math["em_std"] == pytest.approx(math.sqrt(0.02))
    assert pivot_math["seeds"] == 2 and pivot_math["kind"] == "pivot"
    assert pivot_chat["loss_std"] == 0.0
    assert pivot_chat["em_mean"] is None and pivot_chat["em_std"] is None
    assert sce_math["seeds"] == 3
    assert sce_math["loss_mean"] == pytest.approx(1.5)
    assert sce_math["loss_std"] == pytest.approx(0.5)
    assert sce_math["em_std"] == pytest.approx(0.1)


def test_aggregate_seeds_single_seed_has_zero_std():
    (row,) = aggregate_seeds(
        [[{"model": "m", "kind": "target", "skill": "s", "loss": 1.25, "exact_match": 0.5}]]
    )
    assert row["loss_mean"] == 1.25 and row["loss_std"] == 0.0 and row["em_std"] == 0.0


@pytest.mark.parametrize(
    "per_seed",
    [
        [[{"model": "m", "kind": "merge", "skill": "s", "loss": 1.0, "exact_match": None}] * 2],
        [
            [{"model": "m", "kind": "merge", "skill": "s", "loss": 1.0, "exact_match": None}],
            [{"model": "m", "kind": "target", "skill": "s", "loss": 1.0, "exact_match": None}],
        ],
        [
            [{"model": "m", "kind": "merge", "skill": "s", "loss": 1.0, "exact_match": None}],
            [{"model": "m", "kind": "merge", "skill": "s", "loss": 1.0, "exact_match": 0.5}],
        ],
    ],
    ids=["duplicate-in-seed", "kind-changes", "em-in-some-seeds"],
)
def test_aggregate_seeds_refuses_inconsistent_input(per_seed):
    with pytest.raises(ValueError):
        aggregate_seeds(per_seed)


def test_write_results_report(tmp_path):
    results = aggregate_seeds(per_seed_results())
    results.append({**results[2], "model": "a|b", "kind": "target", "em_mean": None})
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
    assert header == "| model | kind | math loss | math EM | chat loss |"
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
            "em_mean": None,
            "em_std": None,
            "seeds": np.int64(3),
        }
    ]
    paths = write_results_report(results, tmp_path, title="t")
    assert json.loads(paths["json"].read_text(encoding="utf-8"))["results"][0]["seeds"] == 3
    assert "EM" not in paths["md"].read_text(encoding="utf-8").splitlines()[2]
    assert_png(paths["png"])


def test_write_results_report_refuses_duplicates(tmp_path):
    results = aggregate_seeds(per_seed_results())
    with pytest.raises(ValueError, match="twice"):
        write_results_report([*results, results[0]], tmp_path, title="t")


def test_format_results_table_is_aligned():
    results = aggregate_seeds(per_seed_results())
    results.append({**results[2], "model": "a-much-longer-model-name", "loss_mean": 12.5})
    lines = format_results_table(results).splitlines()
    assert lines[0].split() == ["model", "kind", "math", "loss", "math", "EM", "chat", "loss"]
    assert set(lines[1]) == {"-", " "}
    assert len({len(line) for line in lines}) == 1  # every line padded to the same width
    body = lines[2:]
    assert [line.split()[0] for line in body] == ["pivot", "sce", "a-much-longer-model-name"]
    # numbers right-aligned: the "±" of each column at the same offset on every line
    plus_minus = [[i for i, ch in enumerate(line) if ch == "±"] for line in body]
    assert len(plus_minus[0]) == 3
    assert plus_minus[1] == plus_minus[2] == plus_minus[0][:2]  # no chat result: "-"
    assert body[1].endswith(" -") and body[2].endswith(" -")
    assert "12.5000 ± 0.5000" in body[2]


def test_effects_are_per_seed_differences_with_their_spread():
    from fusechat_merge.report import compute_effects, format_effects

    def seed(sft, t_a, t_b, merge):  # exact match on skills a and b per model
        rows = []
        for model, kind, (a, b) in (("sft", "sft", sft), ("target:a", "target", t_a), ("target:b", "target", t_b),
                                    ("merge:sce", "merge", merge)):
            for skill, em in (("a", a), ("b", b)):
                rows.append({"model": model, "kind": kind, "skill": skill, "loss": 1.0 - em})
                rows.append({"model": model, "kind": kind, "skill": f"fusechat_{skill}_gen/exact_match",
                             "value": em})
        return rows

    effects = compute_effects([seed((0.1, 0.2), (0.5, 0.2), (0.1, 0.6), (0.4, 0.3)),
                               seed((0.1, 0.2), (0.7, 0.2), (0.1, 0.8), (0.35, 0.4))],
                              {"a": "a", "b": "b"}, ["a", "b"])
    fusion = {e["model"]: e for e in effects["fusion"]}
    assert fusion["target:a"]["skill"] == "a"
    assert fusion["target:a"]["em"]["mean"] == pytest.approx(0.5)  # 0.4 and 0.6 over SFT
    assert fusion["target:a"]["em"]["std"] == pytest.approx(0.1414, abs=1e-4)
    assert fusion["target:b"]["loss"]["mean"] == pytest.approx(-0.5)
    merge = {e["skill"]: e for e in effects["merge"]}
    assert merge["a"]["em"]["mean"] == pytest.approx(((0.4 - 0.5) + (0.35 - 0.7)) / 2)
    assert merge["a"]["kept"]["mean"] == pytest.approx((0.4 / 0.5 + 0.35 / 0.7) / 2)
    # on the mean: the merge's mean over skills against the best target's mean over skills
    assert merge["mean"]["em"]["mean"] == pytest.approx(((0.35 - 0.35) + (0.375 - 0.45)) / 2)
    text = format_effects(effects)
    assert "| target:a | a | +0.500 ± 0.141 |" in text and "Merge effect" in text
    # in words: +0.5 ± 0.14 shows; kept on the mean (0.35/0.35 and 0.375/0.45) is 0.92 ± 0.12
    assert "* target:a beats SFT on a exact match (+0.500 ± 0.141)." in text
    assert "* merge:sce keeps most of the best single target's exact match on the mean over skills " \
           "(kept 0.92 ± 0.12)." in text


def test_effect_verdicts_within_the_spread_and_behind():
    from fusechat_merge.report import effect_verdicts

    def fusion(mean, std):
        return {"model": "target:a", "skill": "a", "em": {"mean": mean, "std": std}}

    assert effect_verdicts({"fusion": [fusion(0.02, 0.04)]}) == [
        "target:a is level with SFT on a exact match (+0.020 ± 0.040)."]
    assert effect_verdicts({"fusion": [fusion(-0.2, 0.05)]})[0].startswith("target:a falls behind SFT")
    merge = {"model": "merge:ties", "skill": "mean", "kept": {"mean": 0.2, "std": 0.1}}
    assert effect_verdicts({"merge": [merge, {**merge, "skill": "a"}]}) == [
        "merge:ties loses most of the best single target's exact match on the mean over skills "
        "(kept 0.20 ± 0.10)."]


def test_no_sft_no_fusion_effect():
    from fusechat_merge.report import compute_effects

    rows = [{"model": "target:a", "kind": "target", "skill": "a", "loss": 1.0}]
    assert compute_effects([rows], {"a": "a"}, ["a"]) == {"fusion": [], "merge": []}
