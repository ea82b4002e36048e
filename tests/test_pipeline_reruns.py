"""A rerun redoes exactly the stages whose jobs read what a recipe edit changed (and what
depends on them), skips every other stage, and ends with the results of a fresh run.

One tiny run (a pivot, a byte-level source, a source with the pivot's tokenizer, two
merges, held-out loss and lm-eval) is copied for each edit; the edited copy is rerun and
compared with a fresh run of the edited recipe in an empty work dir. Which stages ran is
read from the stage records (``WORK/stages/*.done.json``), not from the output.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from corpus import conversations, write_jsonl
from helpers import perturb_weights

from fusechat_merge.pipeline import run_pipeline
from fusechat_merge.pipeline_recipe import load_pipeline_recipe

RECIPE = {
    "name": "reruns",
    "seeds": [0],
    "pivot": {"name": "pivot", "model": "models/pivot"},
    "sources": [{"name": "qwen", "model": "models/qwen"}, {"name": "twin", "model": "models/twin"}],
    "data": {"train": "data/train.jsonl"},
    "logits": {"top_k": 4, "max_length": 128, "batch_size": 8},
    "fuse": {"defaults": {"max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 1e-3}},
    "merges": [
        {"name": "sce", "method": "fusechat_sce", "parameters": {"select_topk": 0.5}},
        {"name": "linear", "method": "linear", "base": False, "model_parameters": {"weight": 0.5}},
    ],
    "evaluate": {"skills": {"chat": "data/held.jsonl"}, "max_length": 64, "diagnostics": False,
                 "lm_eval": {"tasks": ["fusechat_chat_gen"], "include_path": "tasks", "limit": 2,
                             "apply_chat_template": True, "bootstrap_iters": 0}},
}
ALL_LM_EVAL = {f"evaluate/lm-eval/{g}" for g in ("base/pivot", "base/qwen", "base/twin",
                                                  "seed-0/target-qwen", "seed-0/target-twin",
                                                  "seed-0/merge-sce", "seed-0/merge-linear")}
# the held-out file's stores for the transfer measure (scored by every model, aligned per
# source with the corpus's vocabulary map)
EVAL_STORES = {"logits/eval-chat/pivot", "logits/eval-chat/qwen", "logits/eval-chat/twin",
               "align/eval-chat/qwen", "align/eval-chat/twin"}
MERGES = {"merge/seed-0/sce", "merge/seed-0/linear", "evaluate/lm-eval/seed-0/merge-sce",
          "evaluate/lm-eval/seed-0/merge-linear"}


def _run(work: Path) -> None:
    run_pipeline(load_pipeline_recipe(work / "recipe.yaml", work), work, log=lambda _: None)


def _write_recipe(work: Path, recipe: dict) -> None:
    (work / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")


def _finished(work: Path) -> dict[str, float]:
    """Stage id → when its done record says it started."""
    records = {}
    for path in (work / "stages").glob("*.done.json"):
        record = json.loads(path.read_text(encoding="utf-8"))
        records[path.name.removesuffix(".done.json").replace("__", "/")] = record["started_at"]
    return records


def _results(work: Path) -> list[dict]:
    return json.loads((work / "report" / "results.json").read_text(encoding="utf-8"))["results"]


@pytest.fixture(scope="module")
def base(tmp_path_factory, metaspace_tokenizer, bytelevel_tokenizer) -> Path:
    from fusechat_merge.demo.toy import make_model
    from fusion.evaluate.lm_eval_tasks import write_skill_tasks

    root = tmp_path_factory.mktemp("reruns") / "base"
    pivot = make_model(root / "models" / "pivot", "llama", tokenizer=metaspace_tokenizer, seed=1)
    make_model(root / "models" / "qwen", "qwen2", tokenizer=bytelevel_tokenizer, seed=2)
    make_model(root / "models" / "twin", base=pivot, seed=3)
    (root / "data").mkdir()
    write_jsonl(root / "data" / "train.jsonl", conversations(8))
    write_jsonl(root / "data" / "held.jsonl", conversations(3))
    write_skill_tasks({"chat": root / "data" / "held.jsonl"}, root / "tasks", max_gen_toks=4)
    _write_recipe(root, RECIPE)
    _run(root)
    return root


def _same_size_and_mtime(path: Path, edit: Callable[[bytes], bytes]) -> None:
    """Rewrite ``path`` in place with other bytes of the same size, its mtime restored."""
    stat = path.stat()
    data = path.read_bytes()
    new = edit(data)
    assert len(new) == len(data) and new != data
    path.write_bytes(new)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def _recipe(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(work: Path) -> None:
        recipe = json.loads(json.dumps(RECIPE))
        edit(recipe)
        _write_recipe(work, recipe)
    return apply


def _swap_digits(data: bytes) -> bytes:  # "(#1)" → "(#2)": same size, other content
    return data.replace(b"(#1)", b"(#2)", 1)


EDITS = {
    "a model's template": (
        _recipe(lambda r: r["sources"][0].update(template="shared")),
        {"logits/qwen", "align/qwen", "fuse/seed-0/qwen", "evaluate/base", "evaluate/seed-0",
         "logits/eval-chat/qwen", "align/eval-chat/qwen",
         "evaluate/lm-eval/seed-0/target-qwen", *MERGES, "evaluate/report"}),
    "an evaluation option": (
        _recipe(lambda r: r["evaluate"].update(max_length=48)),
        {"evaluate/base", "evaluate/seed-0", "evaluate/report"}),
    "a merge parameter": (
        _recipe(lambda r: r["merges"][0]["parameters"].update(select_topk=0.8)),
        {"merge/seed-0/sce", "evaluate/lm-eval/seed-0/merge-sce", "evaluate/seed-0", "evaluate/report"}),
    "a fuse option of one source": (
        _recipe(lambda r: r["fuse"].update(per_source={"twin": {"learning_rate": 2e-3}})),
        {"fuse/seed-0/twin", "evaluate/lm-eval/seed-0/target-twin", *MERGES, "evaluate/seed-0",
         "evaluate/report"}),
    "a skill file's content": (
        lambda work: _same_size_and_mtime(work / "data" / "held.jsonl", _swap_digits),
        {"evaluate/base", "evaluate/seed-0", "evaluate/report", *EVAL_STORES}),
    "the corpus's content": (
        lambda work: _same_size_and_mtime(work / "data" / "train.jsonl", _swap_digits),
        {"logits/pivot", "logits/qwen", "logits/twin", "align/qwen", "align/twin", "fuse/seed-0/qwen",
         "fuse/seed-0/twin", "evaluate/seed-0", "evaluate/base", "align/eval-chat/qwen", "align/eval-chat/twin", "evaluate/lm-eval/seed-0/target-qwen",
         "evaluate/lm-eval/seed-0/target-twin", *MERGES, "evaluate/report"}),
    "a model's weights rewritten in place": (
        lambda work: perturb_weights(work / "models" / "twin"),
        {"logits/twin", "align/twin", "fuse/seed-0/twin", "evaluate/base", "evaluate/seed-0",
         "logits/eval-chat/twin", "align/eval-chat/twin",
         "evaluate/lm-eval/base/twin", "evaluate/lm-eval/seed-0/target-twin", *MERGES, "evaluate/report"}),
    "the lm-eval settings": (
        _recipe(lambda r: r["evaluate"]["lm_eval"].update(limit=1)),
        {*ALL_LM_EVAL, "evaluate/report"}),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_a_rerun_redoes_exactly_what_reads_the_edit(base, tmp_path, edit):
    apply, expected = EDITS[edit]
    work = tmp_path / "work"
    shutil.copytree(base, work, symlinks=True)
    # the copy's absolute paths differ from the base's: the keys hold work-dir paths relative
    before = _finished(work)
    _run(work)
    assert _finished(work) == before, "an unchanged copy of the work dir must rerun nothing"

    apply(work)
    _run(work)
    after = _finished(work)
    assert set(after) == set(before)
    redone = {stage for stage in after if after[stage] != before[stage]}
    assert redone == expected, f"redone but not expected: {sorted(redone - expected)}; " \
                               f"expected but skipped: {sorted(expected - redone)}"

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    for part in ("models", "data", "tasks"):
        shutil.copytree(work / part, fresh / part)
    shutil.copy2(work / "recipe.yaml", fresh / "recipe.yaml")
    _run(fresh)
    _assert_same_results(work, fresh)


def _assert_same_results(work: Path, fresh: Path) -> None:
    ours, theirs = _results(work), _results(fresh)
    assert [(r["model"], r["skill"]) for r in ours] == [(r["model"], r["skill"]) for r in theirs]
    for a, b in zip(ours, theirs, strict=True):
        for key, value in a.items():
            if isinstance(value, float):
                assert value == pytest.approx(b[key], rel=1e-6, abs=1e-9), (a["model"], a["skill"], key)
            else:
                assert value == b[key], (a["model"], a["skill"], key)


def _lm_eval_metrics(work: Path) -> dict[str, dict]:
    """Every lm-eval result file's per-task metrics (the numbers, not the timings)."""
    found = {}
    for path in sorted((work / "eval" / "lm-eval").rglob("*.json")):
        results = json.loads(path.read_text(encoding="utf-8")).get("results", {})
        found[path.relative_to(work).as_posix()] = {
            task: {k: v for k, v in metrics.items() if isinstance(v, (int, float))} for task, metrics in results.items()}
    assert found, "no lm-eval results"
    return found


def test_files_edited_in_place_with_size_and_mtime_kept_are_read_anew(base, tmp_path):
    """The corpus, a skill file and an lm-eval task's data, each rewritten in place as
    ``rsync -a``/``cp -p`` leave them, are read as they are now (not from `datasets`' cache,
    which keys a local file by path and mtime): the rerun equals a fresh run on the edits."""
    from fusion.artifacts.logit_store import LogitStore
    from fusion.evaluate.lm_eval_tasks import write_skill_tasks

    work = tmp_path / "work"
    shutil.copytree(base, work, symlinks=True)
    recipe = json.loads(json.dumps(RECIPE))
    recipe["evaluate"]["lm_eval"]["tasks"] = ["fusechat_chat_ll"]  # a log-likelihood: moves with any edit
    recipe["logits"]["top_k"] = 3  # with the evaluation's max_length: every stage that reads a file reruns
    recipe["evaluate"]["max_length"] = 48
    _write_recipe(work, recipe)
    write_skill_tasks({"chat": work / "data" / "held.jsonl"}, work / "tasks", max_gen_toks=4)
    _run(work)  # every stage reads its files here, so `datasets` has cached them at these paths

    for name in ("data/train.jsonl", "data/held.jsonl", "tasks/fusechat_chat.jsonl"):
        _same_size_and_mtime(work / name, _swap_digits)
    _run(work)

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    for part in ("models", "data", "tasks"):
        shutil.copytree(work / part, fresh / part)
    shutil.copy2(work / "recipe.yaml", fresh / "recipe.yaml")
    task_yaml = (fresh / "tasks" / "fusechat_chat_ll.yaml")
    task_yaml.write_text(task_yaml.read_text(encoding="utf-8").replace(str(work), str(fresh)), encoding="utf-8")
    _run(fresh)

    for model in ("pivot", "qwen", "twin"):
        ours, theirs = LogitStore(work / "logits" / model), LogitStore(fresh / "logits" / model)
        assert [s.input_ids.tolist() for s in ours] == [s.input_ids.tolist() for s in theirs], model
        assert ours.options.data_fingerprint == theirs.options.data_fingerprint, model
    _assert_same_results(work, fresh)
    ours, theirs = _lm_eval_metrics(work), _lm_eval_metrics(fresh)
    assert ours.keys() == theirs.keys()
    for name, tasks in ours.items():
        for task, metrics in tasks.items():
            assert metrics == pytest.approx(theirs[name][task], rel=1e-6), (name, task)
