"""``fusechat-merge logits-merge`` faults (issue 11): it works, and it checks its parts.

The parts must be one ``--shard i/N`` split of the same run (model, tokenizer, data,
options), every part exactly once, in order; a missing part is named. Every test asserts
the exit code, the message, and that the parts did not change (hashed before and after);
a refused merge leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from corpus import conversations, write_jsonl
from helpers import BIN

from fusechat_merge.cli import main as cli
from fusion.artifacts.logit_store import LogitStore
from fusion.capture.logit_job import LogitJob, generate_logits


def tree_hash(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
    }


@pytest.fixture(scope="module")
def stores(tmp_path_factory, metaspace_tokenizer) -> Path:
    """stores/{p0,p1,p2} (--shard i/3), h1 (1/2), q1 (1/3 of another model), whole (0/1),
    c1 (1/3 of the same file grown to 12 rows)."""
    from fusechat_merge.demo.toy import make_model

    root = tmp_path_factory.mktemp("logit-stores")
    model = make_model(root / "m", "llama", tokenizer=metaspace_tokenizer, seed=1)
    other = make_model(root / "m2", base=model, seed=2)
    data = write_jsonl(root / "chats.jsonl", conversations(9))

    def job(name: str, shard: str, model_dir: Path = model) -> None:
        generate_logits(
            LogitJob(model=str(model_dir), data=str(data), out=str(root / "stores" / name), shard=shard,
                     top_k=4, max_length=64, cache_dir=str(root / "cache")),
            progress=False, log=lambda _: None,
        )

    for i in range(3):
        job(f"p{i}", f"{i}/3")
    job("h1", "1/2")
    job("q1", "1/3", model_dir=other)
    job("whole", "0/1")
    write_jsonl(data, conversations(12))  # the corpus changed before one machine ran
    job("c1", "1/3")
    return root / "stores"


def logits_merge(tmp_path: Path, stores: Path, *names: str):
    before = tree_hash(stores)
    out = tmp_path / "merged"
    result = CliRunner().invoke(cli, ["logits-merge", *(str(stores / n) for n in names), "--out", str(out)])
    assert tree_hash(stores) == before
    return result, out


def test_the_merge_of_all_parts_equals_the_single_run_in_a_fresh_process(stores, tmp_path):
    """A fresh interpreter that imports only ``fusion.artifacts.logit_store``: pyarrow.compute is not
    loaded by anything else (it crashed there, leaving shards without a manifest)."""
    out = tmp_path / "merged"
    code = (
        "import sys; from fusion.artifacts.logit_store import merge_stores; "
        "m = merge_stores(sys.argv[1:4], sys.argv[4]); print(m.sequences, m.rows)"
    )
    parts = [str(stores / f"p{i}") for i in range(3)]
    proc = subprocess.run([sys.executable, "-c", code, *parts, str(out)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[0] == "9"
    merged, whole = LogitStore(out), LogitStore(stores / "whole")
    assert merged.ids() == whole.ids()
    assert merged.manifest.rows == whole.manifest.rows == {"start": 0, "stop": 9, "corpus": 9}
    assert merged.options.shard == "0/1" and merged.manifest.tokens == whole.manifest.tokens
    for a, b in zip(merged, whole, strict=True):
        assert (a.topk_ids == b.topk_ids).all() and (a.input_ids == b.input_ids).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]
    # and through the installed command
    cmd = subprocess.run([str(BIN / "fusechat-merge"), "logits-merge", *parts, "--out", str(tmp_path / "cli")],
                         capture_output=True, text=True, timeout=300)
    assert cmd.returncode == 0, cmd.stderr
    assert "9 sequences" in cmd.stdout


@pytest.mark.parametrize(
    "names,texts",
    [
        (["p0", "p2"], ["missing part 1/3", "--shard 1/3"]),
        (["p0", "p1"], ["missing part 2/3"]),
        (["p0", "p1", "nowhere"], ["part 3 of 3", "nowhere does not exist"]),
        (["p0", "p1", "p1", "p2"], ["part 1/3 is given 2 times"]),
        (["p1", "p0", "p2"], ["give the parts in order 0..2", "got 1/3, 0/3, 2/3"]),
        (["p0", "h1"], ["different --shard splits", "0/3", "1/2"]),
        (["p0", "q1", "p2"], ["q1 is not a part of the same run", "model_fingerprint"]),  # another model
        (["p0", "c1", "p2"], ["is not a part of the same run", "data_fingerprint"]),  # the data changed
        (["p0", "p1", "p2", "../m"], ["part 4 of 4", "not a finished logit store"]),
    ],
)
def test_parts_that_are_not_one_split_are_refused(stores, tmp_path, names, texts):
    result, out = logits_merge(tmp_path, stores, *names)
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    for text in texts:
        assert text in result.output, result.output
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_an_output_that_overlaps_a_part_or_is_not_empty_is_refused(stores, tmp_path):
    before = tree_hash(stores)
    parts = [str(stores / f"p{i}") for i in range(3)]
    result = CliRunner().invoke(cli, ["logits-merge", *parts, "--out", str(stores / "p1" / "sub")])
    assert result.exit_code == 1 and "lies inside the part 2 of 3" in result.output
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    result = CliRunner().invoke(cli, ["logits-merge", *parts, "--out", str(taken)])
    assert result.exit_code == 1 and "is not empty" in result.output
    assert (taken / "notes.txt").read_text() == "mine" and len(list(taken.iterdir())) == 1
    assert tree_hash(stores) == before


def test_a_part_missing_a_shard_file_leaves_no_half_merged_store(stores, tmp_path):
    import shutil

    broken = tmp_path / "parts"
    for i in range(3):
        shutil.copytree(stores / f"p{i}", broken / f"p{i}")
    (broken / "p2" / "shard-00000.arrow").unlink()
    result, out = logits_merge(tmp_path / "o", broken, "p0", "p1", "p2")
    assert result.exit_code == 1 and "shard-00000.arrow" in result.output and "p2" in result.output
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


@pytest.mark.parametrize("spec", ["3", "3/3", "a/b"])
def test_a_part_whose_manifest_holds_a_bad_shard_spec_is_named(stores, tmp_path, spec):
    """The manifest's spec goes through the same parser as ``--shard`` (`parse_shard`)."""
    import json
    import shutil

    parts = tmp_path / "parts"
    for i in range(3):
        shutil.copytree(stores / f"p{i}", parts / f"p{i}")
    manifest = parts / "p1" / "manifest.json"
    document = json.loads(manifest.read_text(encoding="utf-8"))
    document["options"]["shard"] = spec
    manifest.write_text(json.dumps(document), encoding="utf-8")
    result, out = logits_merge(tmp_path / "o", parts, "p0", "p1", "p2")
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert f"p1: its manifest has an invalid shard {spec!r}" in result.output
    assert not out.exists()
