"""Stage records and ``status`` that never mislead: a broken record, a progress record
missing a field, a work dir of another package version, a folder that is no work dir and
a name too long for a file name each get one answer from ``status`` and ``run`` alike,
with the way forward; a model named ``qwen2.5`` keeps its stage id without the recipe.

One tiny run's logits (``run --stage`` each) is copied for each case;
everything goes through the CLI.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from helpers import pivot_and_qwen, refused, store_json

from fusechat_merge import __version__
from fusechat_merge.cli import main

RECIPE = {
    "name": "records",
    "pivot": {"name": "pivot", "model": "models/pivot"},
    "sources": [{"name": "qwen2.5", "model": "models/qwen"}],
    "data": {"train": "data/train.jsonl"},
    "logits": {"top_k": 4, "max_length": 96, "batch_size": 4, "rows_per_shard": 2},
    "fuse": {"defaults": {"max_steps": 1, "per_device_train_batch_size": 4}},
    "merges": [{"name": "linear", "method": "linear", "base": False, "model_parameters": {"weight": 0.5}}],
}
SOURCE = "logits/qwen2.5"


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def run(work: Path, *extra: str):
    return cli("run", work / "recipe.yaml", "--work-dir", work, *extra)


def record(work: Path, stage_id: str, kind: str) -> Path:
    return work / "stages" / f"{stage_id.replace('/', '__')}.{kind}.json"


def status_rows(work: Path, *recipe: Path) -> dict[str, dict]:
    result = cli("status", work, *recipe, "--json")
    assert result.exit_code == 0, result.output
    return {row["id"]: row for row in json.loads(result.output)}


@pytest.fixture(scope="module")
def logits_done(tmp_path_factory, metaspace_tokenizer, bytelevel_tokenizer) -> tuple[Path, str]:
    """A work dir whose logits stages are done (and what the first stage's run printed)."""
    root = pivot_and_qwen(tmp_path_factory.mktemp("records"), metaspace_tokenizer, bytelevel_tokenizer, 6)
    (root / "recipe.yaml").write_text(yaml.safe_dump(RECIPE, sort_keys=False), encoding="utf-8")
    first = run(root, "--stage", "logits/pivot")
    assert first.exit_code == 0, first.output
    assert run(root, "--stage", SOURCE).exit_code == 0
    return root, first.output


@pytest.fixture
def work(logits_done, tmp_path) -> Path:
    copy = tmp_path / "work"
    shutil.copytree(logits_done[0], copy)
    return copy


def test_a_first_run_says_no_reason_and_status_keeps_a_dotted_name_without_the_recipe(logits_done):
    root, printed = logits_done
    line = next(line for line in printed.splitlines() if line.startswith("[logits/pivot] ran in"))
    assert "(" not in line.split("peak")[1], line  # no "(not run yet)"
    rows = status_rows(root)
    assert set(rows) == {"logits/pivot", SOURCE} and rows[SOURCE]["state"] == "done"
    assert rows[SOURCE]["log"] == str(root / "logs" / "logits__qwen2.5.log")
    assert status_rows(root, root / "recipe.yaml")[SOURCE]["state"] == "done"
    table = cli("status", root).output
    assert any(line.split()[:2] == [SOURCE, "done"] for line in table.splitlines()), table


def test_the_stage_id_and_its_file_name_map_one_to_one():
    from fusechat_merge.pipeline.stage_records import parse_record_name, record_file, stage_file

    for stage_id in ("logits/qwen2.5", "fuse/seed-0/qwen2.5", "evaluate/lm-eval/seed-1/target-q.v2", "merge/seed-0/a_b"):
        for kind in ("done", "started", "failed", "progress"):
            name = record_file(Path("stages"), stage_id, kind).name
            assert name == f"{stage_file(stage_id)}.{kind}.json"
            assert parse_record_name(name) == (stage_id, kind)
    assert parse_record_name("fuse__seed-0__q.lock") is None and parse_record_name(".done.json") is None


def test_a_first_run_states_no_reason_and_a_rerun_says_why():
    from types import SimpleNamespace

    from fusechat_merge.console import summary_line
    from fusechat_merge.pipeline.stage_records import StageRecords, run_state

    assert run_state(StageRecords(), "k", []) == ("new", "")
    stage, record = SimpleNamespace(id="logits/pivot"), {"seconds": 4.3, "peak_rss_mb": 687}
    assert summary_line(stage, record, "") == "[logits/pivot] ran in 4.3s, peak 687 MiB"
    resumed = run_state(StageRecords(started={"key": "k"}), "k", [])
    assert summary_line(stage, record, resumed[1]).endswith("peak 687 MiB (interrupted: resume)")


def test_a_stage_whose_output_is_gone_is_redone_and_everyone_says_why(work):
    shutil.rmtree(work / "logits" / "qwen2.5")
    said = f"its output {work / 'logits' / 'qwen2.5'} is gone"
    row = status_rows(work, work / "recipe.yaml")[SOURCE]
    assert row["state"] == "stale" and row["reason"] == said
    assert f"{said}: it reruns" in cli("status", work, work / "recipe.yaml").output
    dry = run(work, "--dry-run")
    assert dry.exit_code == 0 and f"run: {said}" in dry.output, dry.output
    again = run(work, "--stage", SOURCE)
    assert again.exit_code == 0 and f"({said})" in again.output, again.output
    assert status_rows(work, work / "recipe.yaml")[SOURCE]["state"] == "done"


@pytest.mark.parametrize("kind", ["done", "started"])
def test_a_broken_stage_record_is_one_answer_everywhere_and_the_stage_is_redone(work, kind):
    before = store_json(work / "logits" / "qwen2.5")
    if kind == "started":  # an interrupted stage whose started record was cut
        record(work, SOURCE, "done").unlink()
    record(work, SOURCE, kind).write_text('{"key": "4f2a', encoding="utf-8")
    said = f"its record stages/logits__qwen2.5.{kind}.json is unreadable"
    for rows in (status_rows(work), status_rows(work, work / "recipe.yaml")):
        assert rows[SOURCE]["state"] == "stale" and said in rows[SOURCE]["reason"]
    table = cli("status", work).output
    assert f"{said}: it reruns" in table
    dry = run(work, "--dry-run")
    assert dry.exit_code == 0 and f"run: {said}" in dry.output, dry.output
    plan = run(work, "--plan")
    assert plan.exit_code == 0 and {s["id"]: s["status"] for s in json.loads(plan.output)}[SOURCE] == "stale"
    again = run(work, "--stage", SOURCE)
    assert again.exit_code == 0, again.output
    assert status_rows(work)[SOURCE]["state"] == "done"
    assert store_json(work / "logits" / "qwen2.5") == before


def test_a_broken_failed_record_is_advice_for_status_and_run_alike(work):
    record(work, SOURCE, "failed").write_text("\x00\x01", encoding="utf-8")
    assert status_rows(work)[SOURCE]["state"] == "done"
    assert status_rows(work, work / "recipe.yaml")[SOURCE]["state"] == "done"
    assert {s["id"]: s["status"] for s in json.loads(run(work, "--plan").output)}[SOURCE] == "done"


@pytest.mark.parametrize("progress", [{"total": 10, "unit": "tok"}, {"n": 3}, {"n": "three", "at": "now"}])
def test_a_progress_record_missing_a_field_still_gives_the_status(work, progress):
    done = json.loads(record(work, SOURCE, "done").read_text(encoding="utf-8"))
    record(work, SOURCE, "done").unlink()
    record(work, SOURCE, "started").write_text(json.dumps(
        {"key": done["key"], "host": done["host"], "pid": 2**22 + 1, "started_at": done["started_at"]}))
    record(work, SOURCE, "progress").write_text(json.dumps(progress))
    for args in ((work,), (work, work / "recipe.yaml")):
        result = cli("status", *args)
        assert result.exit_code == 0 and result.exception is None, result.output
        assert "interrupted" in result.output and "a rerun resumes it" in result.output
    if "n" in progress and progress["n"] == 3:
        assert "; 3 (" in cli("status", work).output


def test_a_work_dir_of_another_version_says_the_version_changed(work):
    for stage_id in ("logits/pivot", SOURCE):
        path = record(work, stage_id, "done")
        done = json.loads(path.read_text(encoding="utf-8"))
        path.write_text(json.dumps({**done, "key": "0" * 16, "version": "0.0.1"}), encoding="utf-8")
    said = f"made by fusechat-merge 0.0.1, this is {__version__}"
    dry = run(work, "--dry-run")
    assert dry.exit_code == 0 and dry.output.count(f"run: {said}") == 2, dry.output
    assert "inputs or options changed" not in dry.output
    assert f"{said}: it reruns" in cli("status", work, work / "recipe.yaml").output


def test_status_of_a_folder_that_is_no_work_dir_says_so(work, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for folder in (empty, work / "models" / "pivot"):
        refused(cli("status", folder), "is not a work dir of `fusechat-merge run`", "stages/")
    shutil.rmtree(work / "stages")
    (work / "stages").mkdir()
    result = cli("status", work)
    assert result.exit_code == 0 and "no stage of the run" in result.output and "has started yet" in result.output


@pytest.mark.parametrize("where", [("sources", 0), ("merges", 0)])
def test_a_name_too_long_for_a_file_is_refused_by_the_recipe_check(work, where):
    recipe = json.loads(json.dumps(RECIPE))
    recipe[where[0]][where[1]]["name"] = "q" * 240
    (work / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    key = f"{where[0]}[{where[1]}].name"
    for result in (run(work, "--dry-run"), run(work), cli("status", work, work / "recipe.yaml")):
        refused(result, key, "240 characters", "at most 100")


def test_a_store_that_cannot_be_resumed_points_to_what_run_offers(work):
    """The stage's own command would say --overwrite; ``run`` has none: it says how to start over."""
    done = json.loads(record(work, SOURCE, "done").read_text(encoding="utf-8"))
    record(work, SOURCE, "done").unlink()
    record(work, SOURCE, "started").write_text(json.dumps({"key": done["key"], "host": "elsewhere", "pid": 1}))
    store = work / "logits" / "qwen2.5"
    (store / "manifest.json").unlink()
    (store / "run.json").write_text("{not json", encoding="utf-8")
    result = run(work, "--stage", SOURCE)
    refused(result, "broken run record", "to start stage logits/qwen2.5 over, remove", str(store),
            "--from logits")
    assert "--overwrite" not in result.output and "--out" not in result.output
