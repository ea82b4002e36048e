"""`fusechat-merge align` on faulty inputs (exit code 1, a message naming the store, file or
row, user directories unchanged), and a kill test: SIGKILL mid-run, rerun, same bytes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from corpus import conversations, write_jsonl
from helpers import BIN, killed_once, perturb_weights, refused, stray_files, tree_hash

from fusechat_merge.cli import main


def score(model: Path, data: Path, out: Path, *extra: str) -> Path:
    result = CliRunner().invoke(main, ["logits", "--model", str(model), "--data", str(data), "--out", str(out),
                                       "--top-k", "4", "--cache-dir", str(out.parent / "cache"), *extra])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory, metaspace_tokenizer, bytelevel_tokenizer):
    from fusechat_merge.demo.toy import make_model

    root = tmp_path_factory.mktemp("align-faults")
    rows = conversations(6)
    data = write_jsonl(root / "chats.jsonl", rows)
    edited = [dict(r) for r in rows]
    edited[2] = {**rows[2], "conversations": [dict(t) for t in rows[2]["conversations"]]}
    edited[2]["conversations"][1]["value"] = "A different reply."
    other = write_jsonl(root / "other.jsonl", edited)
    no_ids = write_jsonl(root / "noids.jsonl", [{k: v for k, v in r.items() if k != "id"} for r in rows])
    no_ids_edited = write_jsonl(root / "noids-edited.jsonl",
                                [{k: v for k, v in r.items() if k != "id"} for r in edited])
    pivot = make_model(root / "pivot", "llama", tokenizer=metaspace_tokenizer, seed=1)
    source = make_model(root / "source", "qwen2", tokenizer=bytelevel_tokenizer, seed=2)
    return {
        "root": root, "source_model": source,
        "pivot": score(pivot, data, root / "s-pivot", "--rows-per-shard", "2"),
        "source": score(source, data, root / "s-source"),
        "source-other-text": score(source, other, root / "s-source-other"),
        "pivot-noids": score(pivot, no_ids, root / "s-pivot-noids"),
        "source-noids-edited": score(source, no_ids_edited, root / "s-source-noids"),
    }


def align(pivot: Path, source: Path, out: Path, *extra: str):
    return CliRunner().invoke(main, ["align", "--pivot", str(pivot), "--source", str(source), "--out", str(out),
                                     *extra])


def test_same_ids_with_other_texts_are_refused(world, tmp_path):
    before = tree_hash(world["root"])
    refused(align(world["pivot"], world["source-other-text"], tmp_path / "a"),
            "sequence 2 (id 'conv-2')", "conversation texts differ")
    assert not (tmp_path / "a").exists() and tree_hash(world["root"]) == before


def test_rows_without_ids_pair_only_when_their_texts_match(world, tmp_path):
    refused(align(world["pivot-noids"], world["source-noids-edited"], tmp_path / "a"),
            "sequence 2 (id '2')", "conversation texts differ")


@pytest.mark.parametrize("where", ["pivot", "source"])
def test_an_output_equal_to_or_inside_an_input_store_is_refused(world, tmp_path, where):
    store = world[where]
    before = tree_hash(store)
    refused(align(world["pivot"], world["source"], store), f"is the {where} store")
    refused(align(world["pivot"], world["source"], store / "aligned"), f"lies inside the {where} store")
    refused(align(world["pivot"], world["source"], store / "aligned", "--overwrite"), "lies inside")
    assert tree_hash(store) == before


def test_a_missing_store_says_so(world, tmp_path):
    refused(align(tmp_path / "nope", world["source"], tmp_path / "a"), f"store path {tmp_path / 'nope'} does not exist")
    assert not (tmp_path / "a").exists()


def test_a_truncated_shard_is_named(world, tmp_path):
    store = shutil.copytree(world["source"], tmp_path / "s")
    shard = store / "shard-00000.arrow"
    shard.write_bytes(shard.read_bytes()[:-50])
    before = tree_hash(store)
    refused(align(world["pivot"], store, tmp_path / "a"), str(shard), "truncated or corrupt")
    assert tree_hash(store) == before and not (tmp_path / "a").exists()


@pytest.mark.parametrize(("edit", "words"), [
    (lambda m: "{not json", ["broken manifest, not valid JSON"]),
    (lambda m: json.dumps({k: v for k, v in json.loads(m).items() if k != "options"}), ["broken manifest", "options"]),
    (lambda m: json.dumps({**json.loads(m), "shards": [{"file": "x"}]}), ["broken manifest", "'shards'"]),
])
def test_a_broken_manifest_is_named(world, tmp_path, edit, words):
    store = shutil.copytree(world["source"], tmp_path / "s")
    manifest = store / "manifest.json"
    manifest.write_text(edit(manifest.read_text()))
    refused(align(world["pivot"], store, tmp_path / "a"), str(manifest), *words)


def test_a_changed_upstream_store_is_detected_and_overwrite_redoes(world, tmp_path):
    model = shutil.copytree(world["source_model"], tmp_path / "model")
    source = score(model, world["root"] / "chats.jsonl", tmp_path / "s")
    out = tmp_path / "a"
    assert align(world["pivot"], source, out).exit_code == 0
    before = tree_hash(out)
    perturb_weights(model)
    score(model, world["root"] / "chats.jsonl", source, "--overwrite")
    refused(align(world["pivot"], source, out), "the source store changed since this store was started",
            "--overwrite")
    assert tree_hash(out) == before
    result = align(world["pivot"], source, out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert tree_hash(out) != before


def test_changed_options_are_refused(world, tmp_path):
    out = tmp_path / "a"
    assert align(world["pivot"], world["source"], out).exit_code == 0
    refused(align(world["pivot"], world["source"], out, "--vocab-mode", "em"), "vocab_mode: 'ms' then, 'em' now")


def test_resume_after_kill_gives_the_same_store(world, tmp_path):
    big = write_jsonl(tmp_path / "big.jsonl", conversations(40))
    pivot = score(world["root"] / "pivot", big, tmp_path / "p", "--rows-per-shard", "1")
    source = score(world["source_model"], big, tmp_path / "s")

    def args(out: Path) -> list[str]:
        return [str(BIN / "fusechat-merge"), "align", "--pivot", str(pivot), "--source", str(source),
                "--out", str(out), "--method", "dtw"]

    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    subprocess.run(args(tmp_path / "clean"), env=env, check=True, capture_output=True, timeout=300)
    killed = tmp_path / "killed"
    killed_once(args(killed), lambda: (killed / "shard-00002.arrow").exists(), timeout=120)
    assert not (killed / "manifest.json").exists(), "the run finished before it could be killed"
    subprocess.run(args(killed), env=env, check=True, capture_output=True, timeout=300)
    clean = tmp_path / "clean"
    # byte for byte, the manifest too once its own path (the vocabulary map's) is the same
    manifest = (killed / "manifest.json").read_text().replace(str(killed), str(clean))
    assert manifest == (clean / "manifest.json").read_text()
    assert {k: v for k, v in tree_hash(killed).items() if k != "manifest.json"} == \
        {k: v for k, v in tree_hash(clean).items() if k != "manifest.json"}
    assert stray_files(killed) == [] and stray_files(tmp_path) == []
