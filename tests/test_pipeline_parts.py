"""``logits: {parts: N}``: a model's scoring as N part stages and one combine stage, giving
the store, targets and merges of the unsplit run; each part resumes on its own."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from corpus import conversations, write_jsonl
from helpers import BIN, assert_close_weights, assert_same_columns, killed_once, pivot_and_qwen
from test_pipeline_ray import record

from fusechat_merge.pipeline import WorkDir, plan_stages, run_pipeline
from fusechat_merge.pipeline_recipe import load_pipeline_recipe
from fusion.artifacts.logit_store import LogitStore

RECIPE = {
    "name": "parts",
    "pivot": {"name": "pivot", "model": "models/pivot"},
    "sources": [{"name": "qwen", "model": "models/qwen", "parts": 3}],
    "data": {"train": "data/train.jsonl"},
    # one sequence per forward pass: a part batches other neighbours than the whole corpus does,
    # and a batch's shape moves float sums in the last bit; the parts themselves are exact
    "logits": {"top_k": 5, "max_length": 96, "batch_size": 1, "parts": 2},
    "fuse": {"defaults": {"max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 1e-3}},
    "merges": [{"name": "sce", "method": "fusechat_sce", "parameters": {"select_topk": 0.5}}],
    "resources": {"stages": {"logits/qwen/part-1": {"num_cpus": 2}}},
}
PART_STAGES = ["logits/pivot/part-0", "logits/pivot/part-1", "logits/qwen/part-0", "logits/qwen/part-1",
               "logits/qwen/part-2"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, metaspace_tokenizer, bytelevel_tokenizer) -> Path:
    # 11 conversations: not a multiple of 2 or 3
    return pivot_and_qwen(tmp_path_factory.mktemp("parts-inputs"), metaspace_tokenizer, bytelevel_tokenizer, 11)


@pytest.fixture(scope="module")
def unsplit(inputs, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("unsplit") / "work"
    shutil.copytree(inputs, work)
    recipe = json.loads(json.dumps(RECIPE))
    recipe["logits"].pop("parts")
    recipe["sources"][0].pop("parts")
    recipe.pop("resources")
    _write(work, recipe)
    run_pipeline(load_pipeline_recipe(work / "recipe.yaml", work), work, log=lambda _: None)
    return work


def _write(work: Path, recipe: dict) -> None:
    (work / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")


def assert_same_as_unsplit(work: Path, unsplit: Path) -> None:
    """Parts run with their own thread counts (1 and 2 here) and the unsplit run with the
    machine's: ids equal, floats to float32 rounding (`helpers.assert_close_values`)."""
    for model in ("pivot", "qwen"):
        assert_same_columns(work / "logits" / model, unsplit / "logits" / model)
    assert_same_columns(work / "aligned" / "qwen", unsplit / "aligned" / "qwen")
    assert_close_weights(work / "targets" / "seed-0" / "qwen", unsplit / "targets" / "seed-0" / "qwen")
    assert_close_weights(work / "merges" / "seed-0" / "sce", unsplit / "merges" / "seed-0" / "sce")


def test_the_plan_has_part_stages_with_their_resources(inputs):
    _write(inputs, RECIPE)
    stages = {s.id: s for s in plan_stages(load_pipeline_recipe(inputs / "recipe.yaml", inputs), WorkDir(inputs))}
    assert [s for s in stages if s.startswith("logits/")] == [
        *PART_STAGES[:2], "logits/pivot", *PART_STAGES[2:], "logits/qwen"]
    assert stages["logits/qwen"].after == PART_STAGES[2:]
    assert stages["align/qwen"].after == ["logits/pivot", "logits/qwen"]
    assert [stages[s].job.shard for s in PART_STAGES] == ["0/2", "1/2", "0/3", "1/3", "2/3"]
    assert stages["logits/qwen/part-1"].resources["num_cpus"] == 2 and stages["logits/qwen/part-1"].job.threads == 2
    assert stages["logits/qwen/part-0"].job.threads == 1


def test_parts_make_the_unsplit_runs_stores_targets_and_merges(inputs, unsplit, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(inputs, work)
    _write(work, RECIPE)
    stages = run_pipeline(load_pipeline_recipe(work / "recipe.yaml", work), work, log=lambda _: None)
    assert all(s.status == "ran" for s in stages)
    assert_same_as_unsplit(work, unsplit)
    assert LogitStore(work / "logits" / "qwen").manifest.sequences == 11


def test_a_killed_part_is_redone_alone(inputs, tmp_path):
    from fusion.capture.logit_job import LogitJob, generate_logits

    work = tmp_path / "work"
    shutil.copytree(inputs, work)
    write_jsonl(work / "data" / "train.jsonl", conversations(60))  # parts long enough to be cut
    recipe = json.loads(json.dumps(RECIPE))
    recipe["logits"]["rows_per_shard"] = 1  # a part resumes shard by shard
    _write(work, recipe)
    args = [str(BIN / "fusechat-merge"), "run", str(work / "recipe.yaml"), "--work-dir", str(work)]
    part = work / "logit-parts" / "qwen" / "part-1"
    killed_once(args, lambda: list(part.glob("shard-*.arrow")), timeout=300)
    assert list(part.glob("shard-*.arrow")) and not (part / "manifest.json").exists(), "killed too late"
    done_before = {s: record(work, s) for s in ("logits/pivot/part-0", "logits/pivot/part-1", "logits/pivot",
                                                "logits/qwen/part-0")}
    stages = {s.id: s for s in run_pipeline(load_pipeline_recipe(work / "recipe.yaml", work), work,
                                            log=lambda _: None)}
    assert all(stages[s].status.startswith("skipped") for s in done_before)
    assert all(record(work, s) == r for s, r in done_before.items())
    assert stages["logits/qwen/part-1"].status == "ran" and stages["logits/qwen/part-2"].status == "ran"
    for model in ("pivot", "qwen"):  # the oracle: the model's corpus scored whole, uninterrupted
        whole = tmp_path / "whole" / model
        generate_logits(LogitJob(model=str(work / "models" / model), data=str(work / "data" / "train.jsonl"),
                                 out=str(whole), top_k=5, max_length=96, batch_size=1,
                                 cache_dir=str(tmp_path / "cache")), progress=False, log=lambda _: None)
        assert_same_columns(work / "logits" / model, whole)
