"""A Ray worker lost mid-stage costs a retry, not the run: `run --executor ray` on a real
local Ray instance, its worker SIGKILLed (as the OOM killer or a reclaimed node does) once
while it scores and once while it trains; the run finishes by itself, each retry resuming
from what the lost attempt completed (the store's shards, the last checkpoint), with the
stores and the target of an undisturbed Ray run; the records and ``status`` show the
attempts. (A stage's own error is not retried: tests/test_pipeline_ray.py.)"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import BIN, load_weights, pivot_and_qwen

pytest.importorskip("ray", reason="the Ray executor needs the ray extra (pip install 'fusechat-merge[ray]')")

ENV = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
RECIPE = {
    "name": "ray-faults",
    "pivot": {"name": "pivot", "model": "models/pivot"},
    "sources": [{"name": "qwen", "model": "models/qwen"}],
    "data": {"train": "data/train.jsonl"},
    "logits": {"top_k": 4, "max_length": 96, "batch_size": 1, "rows_per_shard": 2},
    "fuse": {"defaults": {"max_steps": 120, "per_device_train_batch_size": 2, "learning_rate": 1e-3,
                          "save_strategy": "steps", "save_steps": 30}},
    "merges": [{"name": "linear", "method": "linear", "base": False, "model_parameters": {"weight": 0.5}}],
    "resources": {"logits": {"num_cpus": 1}, "align": {"num_cpus": 1}, "fuse": {"num_cpus": 1}},
}


def run_args(work: Path, *extra: str) -> list[str]:
    return [str(BIN / "fusechat-merge"), "run", str(work / "recipe.yaml"), "--work-dir", str(work),
            "--executor", "ray", *extra]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, metaspace_tokenizer, bytelevel_tokenizer) -> Path:
    root = pivot_and_qwen(tmp_path_factory.mktemp("ray-faults"), metaspace_tokenizer, bytelevel_tokenizer, 16)
    (root / "recipe.yaml").write_text(yaml.safe_dump(RECIPE), encoding="utf-8")
    return root


def started(work: Path, stage_id: str) -> dict | None:
    try:
        return json.loads((work / "stages" / (stage_id.replace("/", "__") + ".started.json")).read_text())
    except (OSError, ValueError):
        return None


def done(work: Path, stage_id: str) -> dict:
    return json.loads((work / "stages" / (stage_id.replace("/", "__") + ".done.json")).read_text())


def kill_worker_when(work: Path, stage_id: str, ready, proc: subprocess.Popen, timeout: float = 300) -> int:
    """SIGKILL the Ray worker that runs ``stage_id`` once ``ready(work)``; its pid."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        record = started(work, stage_id)
        if record and ready(work):
            os.kill(record["pid"], signal.SIGKILL)
            return record["pid"]
        time.sleep(0.02)
    raise AssertionError(f"{stage_id} was never caught running; the run: {proc.poll()}")


@pytest.mark.slow
def test_a_worker_killed_while_scoring_and_while_training_is_retried_to_the_undisturbed_result(inputs, tmp_path):
    undisturbed, work = tmp_path / "undisturbed", tmp_path / "killed"
    for folder in (undisturbed, work):
        shutil.copytree(inputs, folder)
    clean = subprocess.run(run_args(undisturbed), capture_output=True, text=True, env=ENV, timeout=600)
    assert clean.returncode == 0, clean.stdout + clean.stderr

    proc = subprocess.Popen(run_args(work, "--retries", "1"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=ENV)
    shards = work / "logits" / "qwen"
    scoring = kill_worker_when(work, "logits/qwen", lambda w: len(list(shards.glob("shard-*"))) >= 2, proc)
    checkpoint = work / "targets" / "seed-0" / "qwen" / "checkpoints" / "checkpoint-30" / "checkpoint_complete.json"
    training = kill_worker_when(work, "fuse/seed-0/qwen", lambda w: checkpoint.exists(), proc)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output
    assert "Traceback" not in output

    for stage_id, pid in (("logits/qwen", scoring), ("fuse/seed-0/qwen", training)):
        attempts = done(work, stage_id)["attempts"]
        assert len(attempts) == 2, attempts
        assert attempts[0]["pid"] == pid and "WorkerCrashedError" in attempts[0]["lost"], attempts
        assert attempts[1]["pid"] != pid and "lost" not in attempts[1]
        assert re.search(rf"\[{stage_id}\] attempt 1 lost on \S+: WorkerCrashedError.*; attempt 2 of 2, resuming",
                         output), output
    assert "resuming: " in (work / "logs" / "logits__qwen.log").read_text()  # the shards on disk were kept
    status = subprocess.run([str(BIN / "fusechat-merge"), "status", str(work), str(work / "recipe.yaml")],
                            capture_output=True, text=True, env=ENV, timeout=120)
    assert re.search(r"fuse/seed-0/qwen\s+done .*; attempt 2, lost before: on \S+ \(WorkerCrashedError",
                     status.stdout), status.stdout

    for kind in ("logits", "aligned"):
        for name in ("pivot", "qwen") if kind == "logits" else ("qwen",):
            a, b = (sorted((w / kind / name).glob("shard-*")) for w in (undisturbed, work))
            assert [p.name for p in a] == [p.name for p in b]
            assert all(x.read_bytes() == y.read_bytes() for x, y in zip(a, b, strict=True)), (kind, name)
    for path in ("targets/seed-0/qwen", "merges/seed-0/linear"):
        wa, wb = load_weights(undisturbed / path), load_weights(work / path)
        assert wa.keys() == wb.keys()
        for name in wa:  # the same threads, batches and process: the resume is exact
            assert torch.equal(wa[name], wb[name]), (path, name)
