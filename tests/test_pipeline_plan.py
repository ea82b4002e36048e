"""The stage plan: ids, dependencies and keys; jobs pickle (any executor can run them)."""

from __future__ import annotations

import copy
import dataclasses
import os
import pickle
import re
from pathlib import Path

import pytest
import yaml
from corpus import conversations, write_jsonl

from fusechat_merge.pipeline import WorkDir, plan_stages
from fusechat_merge.pipeline.plan import Planner
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
                                                     "merge/seed-1/linear", "align/eval-chat/a", "align/eval-chat/b"}
    # the transfer measure's inputs: the held-out file scored by each model and aligned with
    # the corpus's vocabulary map
    assert stages["logits/eval-chat/a"].after == []
    assert stages["align/eval-chat/a"].after == ["logits/eval-chat/pivot", "logits/eval-chat/a", "align/a"]
    assert stages["evaluate/base"].after == ["align/eval-chat/a", "align/eval-chat/b"]
    # the report reads the scores, and for its diagnostics the targets and the aligned stores
    assert stages["evaluate/report"].after == ["evaluate/base", "evaluate/seed-0", "evaluate/seed-1",
                                               "fuse/seed-0/a", "fuse/seed-0/b", "fuse/seed-1/a",
                                               "fuse/seed-1/b", "align/a", "align/b"]
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
    # the base models' transfer measure reads the held-out files aligned the new way
    assert {"align/eval-chat/a", "evaluate/base"} <= moved


def _perturbed(value, annotation: str = ""):
    """A different value of the same shape (a field edited by a recipe change)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, dict):  # one more entry like the first
        return {**value, **({_perturbed(k): v for k, v in list(value.items())[:1]} or {"added": "x"})}
    if isinstance(value, list | tuple):
        return type(value)([*value, value[0] if value else "x"])
    if value is None:  # an optional field given a value
        return {"added": 1} if "dict" in str(annotation) else "x"
    raise AssertionError(f"no perturbation for {value!r}")


def _edits(obj):
    """Copies of ``obj`` with one field (nested dataclass fields too) changed, by name
    (set directly: a copy, without the options' validation)."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        changed = [(f"{f.name}.{n}", v) for n, v in _edits(value)] if dataclasses.is_dataclass(value) \
            else [(f.name, _perturbed(value, f.type))]
        for name, new in changed:
            edited = copy.copy(obj)
            object.__setattr__(edited, f.name, new)
            yield name, edited


def test_every_field_of_every_job_is_in_its_key(work):
    recipe = {**RECIPE, "evaluate": {**RECIPE["evaluate"], "lm_eval": {"tasks": ["t"]}},
              "fuse": {"baselines": {"sft": True}}}
    stages = plan(work, recipe)
    planner = Planner(WorkDir(work), stages)
    kinds = set()
    for stage in stages:
        kinds.add(type(stage.job).__name__)
        assert planner.key(stage.job)[0] == stage.key, stage.id
        for name, edited in _edits(stage.job):
            assert planner.key(edited)[0] != stage.key, f"{stage.id}: {name} is not in the key"
    assert kinds == {"LogitsJob", "AlignJob", "FuseJob", "MergeJob", "EvalJob", "LmEvalJob", "ReportJob"}


def test_inputs_enter_the_key_by_content(work):
    before = {s.id: s.key for s in plan(work, RECIPE)}
    weights = work / "models" / "a" / "model.safetensors"
    data = weights.read_bytes()
    stat = weights.stat()
    try:
        weights.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, same mtime
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        after = {s.id: s.key for s in plan(work, RECIPE)}
    finally:
        weights.write_bytes(data)
    moved = {k for k in before if before[k] != after[k]}
    assert {"logits/a", "align/a", "fuse/seed-1/a", "merge/seed-0/sce", "evaluate/base"} <= moved
    assert not moved & {"logits/pivot", "logits/b", "align/b", "fuse/seed-0/b", "fuse/seed-1/b"}


def test_lm_eval_stages_follow_the_task_files_and_the_lm_eval_version(work):
    tasks = work / "tasks"
    tasks.mkdir(exist_ok=True)
    (tasks / "t.yaml").write_text("task: t\n", encoding="utf-8")
    recipe = {**RECIPE, "evaluate": {"lm_eval": {"tasks": ["t"], "include_path": "tasks"}}}
    before = {s.id: s for s in plan(work, recipe)}
    assert before["evaluate/lm-eval/base/pivot"].job.lm_eval_version == "0.4.13"
    (tasks / "t.jsonl").write_text("{}\n", encoding="utf-8")
    after = {s.id: s.key for s in plan(work, recipe)}
    lm_eval = {k for k in before if k.startswith("evaluate/lm-eval/")}
    assert lm_eval and all(before[k].key != after[k] for k in lm_eval)
    assert all(before[k].key == after[k] for k in before if k.startswith(("logits/", "fuse/", "merge/")))


def test_jobs_pickle_and_carry_their_recipe_section(work):
    stages = {s.id: s for s in plan(work, {**RECIPE, "logits": {"top_k": 7}})}
    job = pickle.loads(pickle.dumps(stages["logits/a"].job))
    assert job.top_k == 7 and job.out == str(work / "logits" / "a")
    fuse = pickle.loads(pickle.dumps(stages["fuse/seed-1/a"].job))
    assert fuse.settings["seed"] == 1 and fuse.aligned == [str(work / "aligned" / "a")]
    for stage in stages.values():
        pickle.dumps(stage.job)


def test_a_hub_id_neither_cached_nor_reachable_is_a_warning_at_the_check_and_refused_at_run_time(
        work, tmp_path):
    """The 7B recipe plans offline: ``--dry-run`` says which ids cannot be had here; a run
    refuses before any stage starts (not after hours of scoring the other models)."""
    import subprocess

    from helpers import BIN, lay_out_in_hub_cache

    hf_home = tmp_path / "hf-home"
    lay_out_in_hub_cache(hf_home, "toy-org/pivot", work / "models" / "pivot")
    recipe = copy.deepcopy(RECIPE)
    recipe["pivot"]["model"] = "toy-org/pivot"  # cached: fine
    recipe["sources"][0]["model"] = "toy-org/not-cached"
    recipe["sources"][1]["model"] = "toy-org/nor-this@v2"
    run_dir = tmp_path / "run"
    (run_dir / "data").mkdir(parents=True)
    (run_dir / "data" / "train.jsonl").write_bytes((work / "data" / "train.jsonl").read_bytes())
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    env = dict(os.environ, HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")

    def fusechat(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "fusechat-merge"), "run", str(run_dir / "recipe.yaml"), "--work-dir",
                               str(run_dir), *args], env=env, capture_output=True, text=True, timeout=300)

    planned = fusechat("--dry-run")
    assert planned.returncode == 0, planned.stderr
    for key, ref in (("sources[0].model", "toy-org/not-cached"), ("sources[1].model", "toy-org/nor-this")):
        assert re.search(rf"warning: {re.escape(key)}: .*'{ref}'.* not in the Hugging Face cache and cannot be "
                         r"downloaded: HF_HUB_OFFLINE is set", planned.stderr), planned.stderr
    assert "toy-org/pivot" not in planned.stderr
    for args in ((), ("--stage", "logits/a")):
        refused = fusechat(*args)
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert "no stage was started" in refused.stderr and "'toy-org/not-cached'" in refused.stderr
        assert "needed by logits/a" in refused.stderr and "Traceback" not in refused.stderr
        assert not (run_dir / "stages").exists() or not list((run_dir / "stages").glob("*.json"))
        assert not (run_dir / "logits").exists()
