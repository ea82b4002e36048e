"""Atomic writes: whole files and directories or none, no temporary left behind."""

from __future__ import annotations

import json

import pytest

from fusechat_merge.demo.skills import skill_conversations
from fusion.artifacts.atomic import (
    atomic_path,
    publish_dir,
    stale_temp_files,
    write_json_atomic,
    write_jsonl_atomic,
)


def test_write_jsonl_round_trips_and_leaves_no_temporary(tmp_path):
    rows = skill_conversations("reversal", 5, seed=1)
    path = write_jsonl_atomic(tmp_path / "sub" / "rows.jsonl", rows)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == rows
    assert [p.name for p in path.parent.iterdir()] == ["rows.jsonl"]


def test_a_failed_write_keeps_the_old_file_and_no_temporary(tmp_path):
    path = write_json_atomic(tmp_path / "a.json", {"v": 1})
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert json.loads(path.read_text()) == {"v": 1}
    assert stale_temp_files(tmp_path) == [] and [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_a_left_temporary_is_found(tmp_path):
    with atomic_path(tmp_path / "shard-00000.arrow") as tmp:
        tmp.write_bytes(b"x")
        copy = tmp.with_name(tmp.name + "x")
        copy.write_bytes(b"x")  # what a SIGKILL leaves: a temp name that never got renamed
    assert stale_temp_files(tmp_path) == [copy]


def test_a_whole_output_is_published_only_on_success_and_replaced_whole(tmp_path):
    from fusion.artifacts.lifecycle import Output, writing

    out = tmp_path / "model"
    with pytest.raises(ValueError), writing(Output(out, "the model", {"v": 1}, whole=True)) as made:
        (made.dir / "config.json").write_text("{}")
        raise ValueError("broken")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    with writing(Output(out, "the model", {"v": 1}, whole=True)) as made:
        (made.dir / "old.txt").write_text("1")
    with writing(Output(out, "the model", {"v": 2}, whole=True), overwrite=True) as made:
        (made.dir / "new.txt").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt", "run.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_publish_without_replace_keeps_what_is_there(tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep").write_text("x")
    part = tmp_path / ".m.partial-1"
    part.mkdir()
    publish_dir(part, out)
    assert (out / "keep").exists() and not part.exists()
