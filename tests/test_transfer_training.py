"""The transfer measure after real training (tiny models, a real pipeline run): fusing a
source moves the model toward it, plain fine-tuning does not, and nor does a fusion term
switched off (λ 1) or given the wrong teacher."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from corpus import conversations, write_jsonl

from fusechat_merge.pipeline import run_pipeline
from fusechat_merge.pipeline_recipe import load_pipeline_recipe

# Three sources, each of its own random weights (so a distribution of its own, unlike the
# pivot's): qwen (another architecture and tokenizer), other (the pivot's tokenizer), and
# off, which is fused with the fusion term disabled (λ 1). SFT: the same corpus, steps and
# seed as every target, CLM alone.
RECIPE = {
    "name": "transfer",
    "seeds": [0],
    "pivot": {"name": "pivot", "model": "models/pivot"},
    "sources": [{"name": "qwen", "model": "models/qwen"}, {"name": "other", "model": "models/other"},
                {"name": "off", "model": "models/off"}],
    "data": {"train": "data/train.jsonl"},
    "logits": {"top_k": 5, "max_length": 96, "batch_size": 8},
    "fuse": {"baselines": {"sft": True, "multi": False},
             "defaults": {"max_steps": 12, "per_device_train_batch_size": 4, "learning_rate": 1e-2,
                          "lm_weight": 0.5},
             "per_source": {"off": {"lm_weight": 1.0}}},
    "merges": [],
    "evaluate": {"skills": {"chat": "data/held.jsonl"}, "max_length": 96, "diagnostics": False,
                 "source_skills": {"qwen": "chat"}},
}


@pytest.fixture(scope="module")
def report(tmp_path_factory, metaspace_tokenizer, bytelevel_tokenizer) -> dict:
    from fusechat_merge.demo.toy import make_model

    work = tmp_path_factory.mktemp("transfer")
    make_model(work / "models" / "pivot", "llama", tokenizer=metaspace_tokenizer, seed=1)
    make_model(work / "models" / "qwen", "qwen2", tokenizer=bytelevel_tokenizer, seed=2)
    make_model(work / "models" / "other", "llama", tokenizer=metaspace_tokenizer, seed=3)
    make_model(work / "models" / "off", "llama", tokenizer=metaspace_tokenizer, seed=4)
    (work / "data").mkdir()
    write_jsonl(work / "data" / "train.jsonl", conversations(16))
    write_jsonl(work / "data" / "held.jsonl", conversations(22)[16:])  # not trained on
    (work / "recipe.yaml").write_text(yaml.safe_dump(RECIPE, sort_keys=False))
    run_pipeline(load_pipeline_recipe(work / "recipe.yaml", work), work, log=lambda _: None)
    return json.loads((Path(work) / "report" / "results.json").read_text())


def _kl(report: dict, model: str, source: str) -> float:
    row = next(r for r in report["results"] if r.get("transfer") and r["model"] == model and r["source"] == source)
    assert row["positions"] > 0
    return row["kl_mean"]


def test_fusing_a_source_moves_the_model_toward_it_and_sft_does_not(report):
    pivot, sft = _kl(report, "pivot", "qwen"), _kl(report, "sft", "qwen")
    target = _kl(report, "target:qwen", "qwen")
    assert target < sft - 0.05 and target < pivot - 0.05, (pivot, sft, target)
    # the report's effect says so, with both sides' means
    effect = next(e for e in report["effects"]["fusion"] if e["model"] == "target:qwen")
    assert effect["kl"]["mean"] == pytest.approx(target - sft)
    assert effect["kl_sft"] == pytest.approx(sft) and effect["kl_model"] == pytest.approx(target)


def test_a_fusion_term_switched_off_moves_nothing_toward_the_source(report):
    # λ 1 with the same corpus, steps and seed is SFT: as close to its source as SFT, no closer
    off, sft = _kl(report, "target:off", "off"), _kl(report, "sft", "off")
    assert off == pytest.approx(sft, rel=1e-4)
    fused = _kl(report, "target:other", "other") - _kl(report, "sft", "other")
    assert fused < -0.05  # where the term is on, the same setup moves


def test_the_wrong_teacher_makes_the_measure_worse(report):
    # swapping the aligned stores: the target fused from other's store, measured against
    # qwen, is farther from qwen than the one fused from qwen's store, and vice versa
    assert _kl(report, "target:other", "qwen") > _kl(report, "target:qwen", "qwen") + 0.05
    assert _kl(report, "target:qwen", "other") > _kl(report, "target:other", "other") + 0.05
