"""A work dir is not tied to where it lies: moved (or copied to a cluster's scratch) with a
stage cut midway, ``fusechat-merge run`` resumes it to the result of an undisturbed run,
and an option toggled after another move (``align.projection``) reruns what it changes.

The records inside the stores and checkpoints name their inputs by content fingerprint;
the paths they also keep are for the reader and are never compared or loaded from. The
old location is gone in every case (renamed away), so nothing can be read from it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from helpers import BIN, killed_once, load_weights, pivot_and_qwen, store_json

ENV = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
RECIPE = {
    "name": "moved",
    "pivot": {"name": "pivot", "model": "models/pivot"},
    "sources": [{"name": "qwen", "model": "models/qwen"}],
    "data": {"train": "data/train.jsonl"},
    "logits": {"top_k": 4, "max_length": 96, "batch_size": 2, "rows_per_shard": 2},
    # 12 rows in batches of 4: an epoch is 3 steps, and a checkpoint is saved after each
    "fuse": {"defaults": {"max_steps": 6, "per_device_train_batch_size": 4, "learning_rate": 1e-3,
                          "save_strategy": "epoch"}},
    "merges": [{"name": "linear", "method": "linear", "base": False, "model_parameters": {"weight": 0.5}}],
}


def fusechat(*args: str, check: bool = False) -> subprocess.CompletedProcess:
    result = subprocess.run([str(BIN / "fusechat-merge"), *args], capture_output=True, text=True, env=ENV,
                            timeout=600)
    assert result.returncode == 0 or not check, result.stdout + result.stderr
    return result


def fusechat_run(work: Path) -> subprocess.CompletedProcess:
    return fusechat("run", str(work / "recipe.yaml"), "--work-dir", str(work))


def killed_when(work: Path, cut: Path) -> None:
    """Start a whole run of ``work`` and SIGKILL it as soon as ``cut`` exists."""
    args = [str(BIN / "fusechat-merge"), "run", str(work / "recipe.yaml"), "--work-dir", str(work)]
    assert killed_once(args, cut.exists, timeout=300), "the run ended before it was cut"


def moved(work: Path) -> Path:
    """``work`` renamed to a sibling folder (the old path no longer exists)."""
    target = work.with_name(work.name + "-moved")
    work.rename(target)
    return target


def assert_same_results(work: Path, undisturbed: Path) -> None:
    for store in ("logits/pivot", "logits/qwen", "aligned/qwen"):
        assert store_json(work / store) == store_json(undisturbed / store), store
    for model in ("targets/seed-0/qwen", "merges/seed-0/linear"):
        ours, theirs = load_weights(work / model), load_weights(undisturbed / model)
        assert ours.keys() == theirs.keys()
        for name in ours:
            torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-7, msg=f"{model}: {name}")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, metaspace_tokenizer, bytelevel_tokenizer) -> Path:
    root = pivot_and_qwen(tmp_path_factory.mktemp("moved-inputs"), metaspace_tokenizer, bytelevel_tokenizer, 12)
    (root / "recipe.yaml").write_text(yaml.safe_dump(RECIPE, sort_keys=False), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def undisturbed(inputs, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("undisturbed") / "work"
    shutil.copytree(inputs, work)
    assert fusechat_run(work).returncode == 0
    return work


@pytest.mark.parametrize("cut", ["logits", "fuse"])
def test_a_work_dir_moved_with_a_stage_cut_midway_resumes_to_the_undisturbed_result(inputs, undisturbed,
                                                                                   tmp_path, cut):
    work = tmp_path / "work"
    shutil.copytree(inputs, work)
    if cut == "logits":  # the source's store has a shard, not all: its stage resumes shard by shard
        killed_when(work, work / "logits" / "qwen" / "shard-00001.arrow")
        assert not (work / "logits" / "qwen" / "manifest.json").exists()
    else:  # the target has a complete checkpoint, not its weights: training resumes from it
        killed_when(work, work / "targets" / "seed-0" / "qwen" / "checkpoints" / "checkpoint-3"
                    / "checkpoint_complete.json")
        assert not (work / "targets" / "seed-0" / "qwen" / "model.safetensors").exists()
    work = moved(work)
    result = fusechat_run(work)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "interrupted: resume" in result.stdout
    assert_same_results(work, undisturbed)
    if cut == "logits":  # moved again, an option toggled: the stores' tokenizers load from where they are now
        work = moved(work)
        recipe = json.loads(json.dumps(RECIPE))
        recipe["align"] = {"projection": "off"}
        (work / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
        result = fusechat_run(work)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "[align/qwen] ran" in result.stdout and "skipped: 2 stages (2 logits)" in result.stdout
        aligned = json.loads((work / "aligned" / "qwen" / "manifest.json").read_text(encoding="utf-8"))
        assert aligned["alignment"]["projection"] == "off"
        # the stores name model folders that are gone: `align` says which option gives them
        stores = ["--pivot", str(work / "logits" / "pivot"), "--source", str(work / "logits" / "qwen")]
        out = tmp_path / "aligned"
        gone = fusechat("align", *stores, "--out", str(out))
        assert gone.returncode == 1 and "Traceback" not in gone.stderr, gone.stderr
        assert "which is not there any more" in gone.stderr and "--pivot-model" in gone.stderr
        fusechat("align", *stores, "--out", str(out), "--pivot-model", str(work / "models" / "pivot"),
                 "--source-model", str(work / "models" / "qwen"), check=True)
        assert store_json(out) == store_json(undisturbed / "aligned" / "qwen")
