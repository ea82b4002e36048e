"""SIGTERM and Ctrl-C (preemption, ``scancel --signal``, a user) during a whole ``run``:
each long stage stops at its next safe point within a bounded time (training saves a
checkpoint at the step it reached, scoring and alignment drop the shard in progress), the
run exits with 128 + the signal number naming the stage, what is kept and that a rerun
resumes, and the rerun ends with the undisturbed run's outputs.

Every run here is a ``fusechat-merge run`` process with the same threads, batches and
process count, so the outputs compare bit for bit where the resume is exact."""

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

ENV = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
RECIPE = {
    "name": "signals",
    "pivot": {"name": "pivot", "model": "models/pivot"},
    "sources": [{"name": "qwen", "model": "models/qwen"}],
    "data": {"train": "data/train.jsonl"},
    "logits": {"top_k": 4, "max_length": 96, "batch_size": 2, "rows_per_shard": 4},
    "fuse": {"defaults": {"max_steps": 200, "per_device_train_batch_size": 2, "learning_rate": 1e-3,
                          "lr_scheduler_type": "linear", "logging_steps": 1}},
    "merges": [{"name": "linear", "method": "linear", "base": False, "model_parameters": {"weight": 0.5}}],
}


def fusechat(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "fusechat-merge"), *args], capture_output=True, text=True, env=ENV,
                          timeout=600, **kw)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, metaspace_tokenizer, bytelevel_tokenizer) -> Path:
    root = pivot_and_qwen(tmp_path_factory.mktemp("signals"), metaspace_tokenizer, bytelevel_tokenizer, 32)
    (root / "recipe.yaml").write_text(yaml.safe_dump(RECIPE), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def undisturbed(inputs, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("undisturbed") / "work"
    shutil.copytree(inputs, work)
    result = fusechat("run", str(work / "recipe.yaml"), "--work-dir", str(work))
    assert result.returncode == 0, result.stdout + result.stderr
    return work


def trainer_logs(work: Path, stage_id: str) -> int:
    """How many steps the Trainer logged in the stage's log so far (``logging_steps: 1``)."""
    try:
        return (work / "logs" / (stage_id.replace("/", "__") + ".log")).read_text(errors="replace").count("{'loss'")
    except OSError:
        return 0


def signal_when(work: Path, signum: int, ready, timeout: float = 300) -> tuple[subprocess.CompletedProcess, float]:
    """Run the recipe in ``work``; send ``signum`` once ``ready(work)``; (the result, seconds
    from the signal to the exit)."""
    proc = subprocess.Popen([str(BIN / "fusechat-merge"), "run", str(work / "recipe.yaml"), "--work-dir", str(work)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None and not ready(work):
        time.sleep(0.005)
    assert proc.poll() is None, "the run ended before the signal: " + proc.communicate()[1]
    proc.send_signal(signum)
    sent = time.monotonic()
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), time.monotonic() - sent


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_weights(a), load_weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def test_sigterm_in_a_fuse_stage_saves_the_step_reached_and_the_rerun_ends_as_undisturbed(
        inputs, undisturbed, tmp_path):
    """No periodic checkpoint (the pipeline's default ``save_strategy: no``): without the
    stop, every step would be lost."""
    work = tmp_path / "work"
    shutil.copytree(inputs, work)
    stage = "fuse/seed-0/qwen"
    result, seconds = signal_when(work, signal.SIGTERM, lambda w: trainer_logs(w, stage) >= 3)
    assert result.returncode == 143, result.stdout + result.stderr
    said = re.search(rf"stopped by SIGTERM in stage {stage}: training saved checkpoint-(\d+) \(step \1 of 200\) "
                     rf"in \S+checkpoints\. .*run the same command again to resume \(exit code 143\)",
                     result.stderr)
    assert said, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    step = int(said.group(1))
    assert 3 <= step < 200
    target = work / "targets" / "seed-0" / "qwen"
    checkpoint = target / "checkpoints" / f"checkpoint-{step}"
    assert (checkpoint / "checkpoint_complete.json").is_file()
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == step
    assert not (target / "model.safetensors").exists()
    print(f"\nfuse: stopped {seconds:.2f}s after SIGTERM at step {step}, 0 steps lost")

    status = fusechat("status", str(work), str(work / "recipe.yaml"))
    assert re.search(rf"{stage}\s+interrupted .*a rerun resumes it", status.stdout), status.stdout

    rerun = fusechat("run", str(work / "recipe.yaml"), "--work-dir", str(work))
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"[{stage}] ran" in rerun.stdout and "interrupted: resume" in rerun.stdout
    log = (work / "logs" / (stage.replace("/", "__") + ".log")).read_text()
    assert "stopped by SIGTERM" in log
    assert_same_weights(undisturbed / "targets" / "seed-0" / "qwen", target)
    assert_same_weights(undisturbed / "merges" / "seed-0" / "linear", work / "merges" / "seed-0" / "linear")


def store_shards(store: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(store.glob("shard-*"))}


def test_ctrl_c_while_scoring_then_sigterm_while_aligning_drop_the_shard_in_progress_and_the_rerun_ends_as_undisturbed(
        inputs, undisturbed, tmp_path):
    """Ctrl-C (SIGINT) names the stage as SIGTERM does: no bare "Aborted!". One work dir:
    stopped while it scores, its rerun stopped while it aligns, the last rerun finishes."""
    work = tmp_path / "work"
    shutil.copytree(inputs, work)
    for stage, signum in (("logits/qwen", signal.SIGINT), ("align/qwen", signal.SIGTERM)):
        out = work / ("logits" if stage.startswith("logits") else "aligned") / "qwen"
        result, seconds = signal_when(work, signum, lambda w, out=out: len(store_shards(out)) >= 1)
        name = signal.Signals(signum).name
        assert result.returncode == 128 + signum, result.stdout + result.stderr
        said = re.search(rf"stopped by {name} in stage {stage}: shard (\d+)/8 was being \w+ and is dropped; "
                         rf"(\d+) of 8 shards are kept in {re.escape(str(out))}\. .*resume "
                         rf"\(exit code {128 + signum}\)", result.stderr)
        assert said, result.stderr
        assert "Aborted!" not in result.stderr and "Traceback" not in result.stderr + result.stdout
        assert len(store_shards(out)) == int(said.group(2)) < 8
        print(f"\n{stage}: stopped {seconds:.2f}s after {name}, shard {said.group(1)} dropped")

    rerun = fusechat("run", str(work / "recipe.yaml"), "--work-dir", str(work))
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    for kind in ("logits", "aligned"):
        a, b = store_shards(undisturbed / kind / "qwen"), store_shards(work / kind / "qwen")
        assert a.keys() == b.keys() and all(a[k] == b[k] for k in a), kind
    assert_same_weights(undisturbed / "targets" / "seed-0" / "qwen", work / "targets" / "seed-0" / "qwen")
