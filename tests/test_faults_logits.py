"""`fusechat-merge logits` on faulty inputs: each fault is exit code 1 with a message naming
what is wrong (file, line, model, key), and leaves every user directory as it was."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from corpus import conversations, write_jsonl
from helpers import perturb_weights, refused, tree_hash

from fusechat_merge.cli import main


@pytest.fixture(scope="module")
def model(tmp_path_factory, metaspace_tokenizer) -> Path:
    from fusechat_merge.demo.toy import make_model

    return make_model(tmp_path_factory.mktemp("m") / "llama", "llama", tokenizer=metaspace_tokenizer, seed=1)


@pytest.fixture
def data(tmp_path) -> Path:
    return write_jsonl(tmp_path / "chats.jsonl", conversations(4))


def logits(model: Path | str, data: Path | str, out: Path, *extra: str):
    args = ["logits", "--model", str(model), "--data", str(data), "--out", str(out), "--top-k", "4",
            "--cache-dir", str(Path(out).parent / "cache"), *extra]
    return CliRunner().invoke(main, args)


def test_changed_weights_at_the_same_path_are_detected(model, data, tmp_path):
    own = shutil.copytree(model, tmp_path / "model")
    out = tmp_path / "store"
    assert logits(own, data, out).exit_code == 0
    before = tree_hash(out)
    perturb_weights(own)
    refused(logits(own, data, out), "model weights or config changed since this store was started",
            "--overwrite")
    assert tree_hash(out) == before
    result = logits(own, data, out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert tree_hash(out) != before


def test_changed_config_is_detected(model, data, tmp_path):
    own = shutil.copytree(model, tmp_path / "model")
    out = tmp_path / "store"
    assert logits(own, data, out).exit_code == 0
    config = json.loads((own / "config.json").read_text())
    config["rms_norm_eps"] = config.get("rms_norm_eps", 1e-6) * 10
    (own / "config.json").write_text(json.dumps(config))
    refused(logits(own, data, out), "model weights or config changed")


def test_changed_data_text_at_the_same_path_is_detected(model, data, tmp_path):
    out = tmp_path / "store"
    assert logits(model, data, out).exit_code == 0
    before = tree_hash(out)
    data.write_text(data.read_text().replace("Paris", "Lyon"))
    refused(logits(model, data, out), "data content changed since this store was started")
    assert tree_hash(out) == before


def test_top_k_above_the_vocabulary_does_not_block_the_corrected_command(model, data, tmp_path):
    out = tmp_path / "store"
    refused(logits(model, data, out, "--top-k", "999"), "--top-k 999 is above the vocabulary", str(model))
    assert not out.exists()
    assert logits(model, data, out, "--top-k", "3").exit_code == 0


def test_a_run_that_failed_before_its_first_shard_does_not_lock_its_options(model, data, tmp_path):
    from fusion.artifacts.lifecycle import RUN_FILE
    from fusion.artifacts.records import write_record

    out = tmp_path / "store"  # what a run killed while loading its model leaves: its record alone
    out.mkdir()
    write_record(out / RUN_FILE, {"model": "x", "top_k": 7, "data": str(data)})
    result = logits(model, data, out)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "run.json").read_text())["top_k"] == 4


@pytest.mark.parametrize(("content", "words"), [
    ("", ["chats.jsonl", "empty data file"]),
    ("\n\n", ["chats.jsonl", "empty data file"]),
    ('{"id": "a", "messages": []}\n{"id": "b", "messages": [}\n', ["chats.jsonl, line 2", "invalid JSON"]),
    ('{"id": "a"}\n[1, 2]\n', ["chats.jsonl, line 2", "JSON object"]),
    ('{"id": "a", "conversations": [{"from": "robot", "value": "x"}]}\n', ["no usable row", "unknown role"]),
])
def test_bad_data_files_are_named(model, tmp_path, content, words):
    data = tmp_path / "chats.jsonl"
    data.write_text(content)
    before = tree_hash(data)
    refused(logits(model, data, tmp_path / "store"), *words)
    assert not (tmp_path / "store").exists() and tree_hash(data) == before


def test_a_folder_without_data_files(model, tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "readme.txt").write_text("no data here")
    refused(logits(model, tmp_path / "d", tmp_path / "store"), "no .json, .jsonl or .parquet files")


@pytest.mark.parametrize("name", ["missing-model", "./missing", "models/a/b"])
def test_a_missing_local_model_says_so(data, tmp_path, name, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = logits(name, data, tmp_path / "store")
    refused(result, f"model path {name} does not exist")
    assert "huggingface.co" not in result.output and not (tmp_path / "store").exists()


def test_a_store_inside_the_model_directory_is_refused(model, data, tmp_path):
    own = shutil.copytree(model, tmp_path / "model")
    before = tree_hash(own)
    refused(logits(own, data, own / "store"), "lies inside the model directory")
    assert tree_hash(own) == before


def test_an_output_holding_the_data_is_refused(model, data, tmp_path):
    before = tree_hash(tmp_path)
    refused(logits(model, data, tmp_path), "contains the data")
    assert tree_hash(tmp_path) == before


def test_overwrite_leaves_a_foreign_directory_alone(model, data, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    before = tree_hash(out)
    refused(logits(model, data, out, "--overwrite"), "not an output of this tool")
    assert tree_hash(out) == before


def test_a_truncated_shard_is_named(model, data, tmp_path):
    out = tmp_path / "store"
    assert logits(model, data, out).exit_code == 0
    shard = out / "shard-00000.arrow"
    shard.write_bytes(shard.read_bytes()[:100])
    before = tree_hash(out)
    refused(logits(model, data, out), "shard-00000.arrow", "truncated or corrupt")
    assert tree_hash(out) == before
