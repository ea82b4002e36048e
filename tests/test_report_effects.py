"""The fusion and merge effects: per-seed differences, their spread, and in words."""

from __future__ import annotations

import pytest
from corpus import write_jsonl

from fusechat_merge.report.effects import compute_effects, effect_verdicts, format_effects
from fusechat_merge.report.results import lm_eval_rows
from fusion.evaluate.lm_eval_results import metrics_by_task
from fusion.evaluate.lm_eval_tasks import write_skill_tasks


def test_effects_are_per_seed_differences_with_their_spread():
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
    rows = [{"model": "target:a", "kind": "target", "skill": "a", "loss": 1.0}]
    assert compute_effects([rows], {"a": "a"}, ["a"]) == {"fusion": [], "merge": []}


def test_exact_match_is_read_from_the_column_lm_eval_writes_for_any_skill_name(tmp_path):
    """A skill whose name is not a task name as it is (``code-gen``): its exact match is
    found under the task that `write_skill_tasks` wrote for it, so its effects are numbers."""
    skills = ["code-gen", "a.b c"]
    files = {}
    for skill in skills:
        files[skill] = write_jsonl(tmp_path / f"{skill}.jsonl", [
            {"id": "0", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}]}])
    tasks = write_skill_tasks(files, tmp_path / "tasks").by_skill()

    def rows(model, kind, em):  # what the report job reads: held-out losses and lm-eval's results
        lm_eval = {"results": {tasks[s].generate: {"exact_match,none": em[s], "exact_match_stderr,none": 0.0}
                               for s in skills}}
        return ([{"model": model, "kind": kind, "skill": s, "loss": 1.0 - em[s]} for s in skills]
                + lm_eval_rows(model, kind, metrics_by_task(lm_eval)))

    seed = (rows("sft", "sft", {"code-gen": 0.2, "a.b c": 0.4})
            + rows("target:code-gen", "target", {"code-gen": 0.5, "a.b c": 0.4})
            + rows("merge:sce", "merge", {"code-gen": 0.45, "a.b c": 0.3}))
    effects = compute_effects([seed], {"code-gen": "code-gen"}, skills)
    (fusion,) = effects["fusion"]
    assert fusion["em"]["mean"] == pytest.approx(0.3)
    merge = {e["skill"]: e for e in effects["merge"]}
    assert merge["code-gen"]["kept"]["mean"] == pytest.approx(0.9)
    assert merge["a.b c"]["em"]["mean"] == pytest.approx(-0.1)
    assert "| target:code-gen | code-gen | +0.300 ± 0.000 |" in format_effects(effects)


def _transfer(model: str, kind: str, kl: float, cover: float, skill: str = "pick", source: str = "pick") -> dict:
    return {"model": model, "kind": kind, "skill": skill, "source": source, "transfer_kl": kl,
            "transfer_cover": cover, "positions": 40}


def test_transfer_and_right_mass_effects_against_sft_in_numbers_and_words(tmp_path):
    from fusechat_merge.report.results import (
        aggregate_seeds,
        format_transfer_table,
        write_results_report,
    )

    seeds = []
    for target_kl, sft_kl, target_mass, sft_mass in ((0.27, 0.41, 0.60, 0.50), (0.25, 0.42, 0.62, 0.51),
                                                      (0.29, 0.40, 0.58, 0.52)):
        seeds.append([
            {"model": "target:pick", "kind": "target", "skill": "pick", "loss": 1.0},
            {"model": "sft", "kind": "sft", "skill": "pick", "loss": 1.1},
            {"model": "target:pick", "kind": "target", "skill": "pick/right_answer_mass", "value": target_mass},
            {"model": "sft", "kind": "sft", "skill": "pick/right_answer_mass", "value": sft_mass},
            _transfer("target:pick", "target", target_kl, 0.9), _transfer("sft", "sft", sft_kl, 0.8),
            _transfer("target:pick", "target", 2.0, 0.1, source="other"), _transfer("sft", "sft", 2.0, 0.1, source="other"),
        ])
    effects = compute_effects(seeds, {"pick": "pick"}, ["pick"])
    (e,) = effects["fusion"]
    assert e["source"] == "pick" and e["kl"]["mean"] == pytest.approx(-0.14) and e["kl"]["std"] == pytest.approx(0.03)
    assert e["kl_sft"] == pytest.approx(0.41) and e["kl_model"] == pytest.approx(0.27)
    assert e["cover"]["mean"] == pytest.approx(0.1) and e["mass"]["mean"] == pytest.approx(0.09)
    words = effect_verdicts(effects)
    assert "target:pick on pick is closer to its source pick than SFT: KL 0.41 → 0.27 (-0.14 ± 0.03); " \
           "cover 0.80 → 0.90 (+0.10 ± 0.00)." in words
    assert "target:pick puts more probability on right first answer tokens of pick than SFT (+0.090 ± 0.026)." in words
    assert "| target:pick | pick | - | -0.1000 ± 0.0000 | -0.140 ± 0.030 | +0.100 ± 0.000 | +0.090 ± 0.026 |" in \
        format_effects(effects)
    # the results: one transfer row per model, skill and source, apart from the scores
    results = aggregate_seeds(seeds)
    transfer = [r for r in results if r.get("transfer")]
    assert len(transfer) == 4 and {(r["model"], r["source"]) for r in transfer} == {
        ("target:pick", "pick"), ("sft", "pick"), ("target:pick", "other"), ("sft", "other")}
    row = next(r for r in transfer if r["model"] == "sft" and r["source"] == "pick")
    assert row["kl_mean"] == pytest.approx(0.41) and row["kl_std"] == pytest.approx(0.01) and row["positions"] == 40
    table = format_transfer_table(results, {"pick": "pick"})
    assert "pick ← pick KL" in table and "pick ← other" not in table  # own pairs only
    assert "pick ← other KL" in format_transfer_table(results)  # no own skills: every pair
    paths = write_results_report(results, tmp_path, title="t", effects=effects, own_skills={"pick": "pick"})
    markdown = paths["md"].read_text()
    assert "## Transfer to the sources" in markdown and "| sft | sft | 0.410 ± 0.010 | 0.800 ± 0.000 |" in markdown
    # a seed without the measure is an error, not a silent mean over fewer seeds
    with pytest.raises(ValueError, match="twice"):
        aggregate_seeds([[_transfer("sft", "sft", 0.1, 0.5), _transfer("sft", "sft", 0.2, 0.5)]])
