"""The stage plan: ids, dependencies and keys; jobs pickle (any executor can run them)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import yaml
from corpus import conversations, write_jsonl

from fusechat_merge.pipeline import WorkDir, plan_stages
from fusechat_merge.pipeline_recipe import load_pipeline_recipe

RECIPE = {
    "seeds": [0, 1],
    "pivot": {"name": "pivot", "model": "models/pivot"},
    "sources": [{"name": "a", "model": "models/a"}, {"name": "b", "model": "models/b"}],
    "data": {"train": "data/train.jsonl"},
    "merges": [{"name": "sce"}, {"name": "linear", "method": "linear", "base": False, "model_parameters": {"weight": 0.5}}],
    "evaluate": {"skills": {"chat": "data/train.jsonl"}},
}


@pytest.fixture(scope="module")
def work(tmp_path_factory, metaspace_tokenizer) -> Path:
    from fusechat_merge.demo.toy import make_model

    root = tmp_path_factory.mktemp("plan")
    pivot = make_model(root / "models" / "pivot", "llama", tokenizer=metaspace_tokenizer, seed=1)
    for i, name in enumerate("ab"):
        make_model(root / "models" / name, base=pivot, seed=i + 2)
    (root / "data").mkdir()
    write_jsonl(root / "data" / "train.jsonl", conversations(4))
    return root


def plan(work: Path, recipe: dict):
    path = work / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return plan_stages(load_pipeline_recipe(path, work), WorkDir(work))


def test_every_stage_waits_for_exactly_its_inputs(work):
    stages = {s.id: s for s in plan(work, RECIPE)}
    assert stages["logits/a"].after == []
    assert stages["align/a"].after == ["logits/pivot", "logits/a"]
    assert stages["fuse/seed-1/b"].after == ["align/b"]
    assert stages["merge/seed-0/sce"].after == ["fuse/seed-0/a", "fuse/seed-0/b"]
    assert set(stages["evaluate/seed-1"].after) == {"fuse/seed-1/a", "fuse/seed-1/b", "merge/seed-1/sce",
                                                     "merge/seed-1/linear"}
    assert stages["evaluate/report"].after == ["evaluate/base", "evaluate/seed-0", "evaluate/seed-1"]
    order = list(stages)
    for stage in stages.values():  # the list is a valid run order
        assert all(order.index(u) < order.index(stage.id) for u in stage.after)


def test_a_changed_option_changes_the_keys_downstream_only(work):
    before = {s.id: s.key for s in plan(work, RECIPE)}
    changed = {**RECIPE, "align": {"method": "dtw"}}
    after = {s.id: s.key for s in plan(work, changed)}
    moved = {k for k in before if before[k] != after[k]}
    assert not any(k.startswith("logits/") for k in moved)
    assert {"align/a", "align/b", "fuse/seed-0/a", "merge/seed-1/sce", "evaluate/report"} <= moved
    assert "evaluate/base" not in moved


def test_jobs_pickle_and_carry_their_recipe_section(work):
    stages = {s.id: s for s in plan(work, {**RECIPE, "logits": {"top_k": 7}})}
    job = pickle.loads(pickle.dumps(stages["logits/a"].job)).job
    assert job.top_k == 7 and job.out == str(work / "logits" / "a")
    fuse = pickle.loads(pickle.dumps(stages["fuse/seed-1/a"].job))
    assert fuse.settings["seed"] == 1 and fuse.aligned == [str(work / "aligned" / "a")]
    for stage in stages.values():
        pickle.dumps(stage.job)
