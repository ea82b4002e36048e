"""One writer at a time: every command that writes an output, and a whole run or a stage
of a work dir, is refused at once while another live process writes it, naming that
process; a lock left by a killed process never blocks the next writer.

The other writer is a real process holding the output's lock (`records.locked`) or a real
second ``fusechat-merge run``; the commands run through the CLI.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import BIN, pivot_and_qwen, tree_hash

from fusion.artifacts.locks import lock_path

ENV = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
RECIPE = {
    "name": "locks",
    "pivot": {"name": "pivot", "model": "models/pivot"},
    "sources": [{"name": "qwen", "model": "models/qwen"}],
    "data": {"train": "data/train.jsonl"},
    "logits": {"top_k": 4, "max_length": 96, "batch_size": 8},
    "fuse": {"defaults": {"max_steps": 2, "per_device_train_batch_size": 4}},
    "merges": [{"name": "linear", "method": "linear", "base": False, "model_parameters": {"weight": 0.5}}],
}


@pytest.fixture(scope="module")
def work(tmp_path_factory, metaspace_tokenizer, bytelevel_tokenizer) -> Path:
    """A finished tiny run: models, stores, an aligned store and a target to write from."""
    from fusechat_merge.pipeline import run_pipeline
    from fusechat_merge.pipeline_recipe import load_pipeline_recipe

    root = pivot_and_qwen(tmp_path_factory.mktemp("locks"), metaspace_tokenizer, bytelevel_tokenizer, 8)
    (root / "recipe.yaml").write_text(yaml.safe_dump(RECIPE), encoding="utf-8")
    run_pipeline(load_pipeline_recipe(root / "recipe.yaml", root), root, log=lambda _: None)
    return root


def hold(lock: Path, shared: bool = False) -> subprocess.Popen:
    """Another process holding ``lock`` until it is stopped."""
    code = ("import sys, time; from pathlib import Path; from fusion.artifacts.locks import OutputLock; "
            f"OutputLock(Path(sys.argv[1]), 'x', shared={shared}).acquire(); print('held', flush=True); "
            "time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(lock)], stdout=subprocess.PIPE, text=True, env=ENV)
    assert proc.stdout.readline().strip() == "held"
    return proc


def fusechat(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "fusechat-merge"), *args], capture_output=True, text=True, env=ENV,
                          timeout=600)


def commands(work: Path, out: Path) -> dict[str, list[str]]:
    linear = work / "linear.yaml"
    linear.write_text(yaml.safe_dump({"merge_method": "linear", "dtype": "float32", "models": [
        {"model": str(work / "models" / "pivot"), "parameters": {"weight": 0.5}},
        {"model": str(work / "targets" / "seed-0" / "qwen"), "parameters": {"weight": 0.5}}]}))
    return {
        "logits": ["logits", "--model", str(work / "models" / "pivot"), "--data", str(work / "data" / "train.jsonl"),
                   "--out", str(out), "--top-k", "4", "--max-length", "96"],
        "align": ["align", "--pivot", str(work / "logits" / "pivot"), "--source", str(work / "logits" / "qwen"),
                  "--out", str(out)],
        "fuse": ["fuse", "--pivot", str(work / "models" / "pivot"), "--aligned", str(work / "aligned" / "qwen"),
                 "--out", str(out), "--max-steps", "1"],
        "merge": ["merge", str(linear), str(out)],
        "logits-merge": ["logits-merge", str(work / "logits" / "pivot"), "--out", str(out)],
    }


@pytest.mark.parametrize("command", ["logits", "align", "fuse", "merge", "logits-merge"])
def test_a_second_writer_of_an_output_is_refused_naming_the_first(work, tmp_path, command):
    out = tmp_path / "out"
    args = commands(work, out)[command]
    before = tree_hash(work)
    holder = hold(lock_path(out))
    try:
        started = time.monotonic()
        refused = fusechat(*args)
    finally:
        holder.kill()
        holder.wait()
    assert refused.returncode == 1, refused.stderr
    assert "being written by another process" in refused.stderr and f"pid {holder.pid} " in refused.stderr
    assert "Traceback" not in refused.stderr and time.monotonic() - started < 60
    assert not out.exists() and tree_hash(work) == before
    # the holder was killed: its lock file stays, and binds nothing
    assert lock_path(out).exists()
    done = fusechat(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not lock_path(out).exists()  # the writer removes its lock file when it ends


def _start_run(work: Path, *extra: str, recipe: str = "recipe.yaml") -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "fusechat-merge"), "run", str(work / recipe), "--work-dir", str(work),
                             *extra], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_a_second_run_of_a_work_dir_is_refused_and_a_killed_run_does_not_block(work):
    slow = json.loads(json.dumps(RECIPE))
    slow["fuse"]["defaults"]["max_steps"] = 10**6  # still training while the others try
    (work / "slow.yaml").write_text(yaml.safe_dump(slow), encoding="utf-8")
    first = _start_run(work, recipe="slow.yaml")
    started = work / "stages" / "fuse__seed-0__qwen.started.json"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and first.poll() is None and not started.exists():
        time.sleep(0.02)
    try:
        assert first.poll() is None, "the first run ended before its fuse stage started"
        records = {p.name: p.read_bytes() for p in (work / "stages").glob("*.json")}
        for args in (["--from", "merge"], []):
            second = _start_run(work, *args)
            _, err = second.communicate(timeout=120)
            assert second.returncode == 1, err
            assert f"work dir {work} is being written by another process (pid {first.pid} " in err
            assert "Traceback" not in err
        stage = fusechat("run", str(work / "recipe.yaml"), "--work-dir", str(work), "--stage", "merge/seed-0/linear")
        assert stage.returncode == 1 and f"pid {first.pid} " in stage.stderr
        # the refused runs touched no record (the first one may have moved on meanwhile)
        for name, data in records.items():
            path = work / "stages" / name
            assert not path.exists() or path.read_bytes() == data or name.startswith("fuse__"), name
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    again = fusechat("run", str(work / "recipe.yaml"), "--work-dir", str(work))
    assert again.returncode == 0, again.stderr[-3000:]
    times = {t["stage"]: t["status"] for t in
             json.loads((work / "report" / "stage_times.json").read_text(encoding="utf-8"))}
    # the killed run's fuse stage (another key) is redone; the merge of the same target is up to date
    assert times["logits/pivot"].startswith("skipped") and times["fuse/seed-0/qwen"] == "ran"
    assert times["merge/seed-0/linear"].startswith("skipped")


def test_stages_run_by_a_scheduler_share_the_work_dir_but_not_a_stage(work):
    run_lock = work / "stages" / ".run.lock"
    others = hold(run_lock, shared=True)  # another `run --stage` in progress: allowed beside
    try:
        whole = fusechat("run", str(work / "recipe.yaml"), "--work-dir", str(work))
        assert whole.returncode == 1 and "is being written by another process" in whole.stderr
        stage = fusechat("run", str(work / "recipe.yaml"), "--work-dir", str(work), "--stage", "logits/pivot")
        assert stage.returncode == 0, stage.stderr[-2000:]
    finally:
        others.kill()
        others.wait()
    same = hold(work / "stages" / "merge__seed-0__linear.lock")
    try:
        (work / "stages" / "merge__seed-0__linear.done.json").unlink()
        refused = fusechat("run", str(work / "recipe.yaml"), "--work-dir", str(work), "--stage",
                           "merge/seed-0/linear")
        assert refused.returncode == 1 and f"stage merge/seed-0/linear is being written by another process " \
            f"(pid {same.pid} " in refused.stderr
    finally:
        same.kill()
        same.wait()
