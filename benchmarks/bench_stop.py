"""How fast a ``run`` stops on SIGTERM in each long stage, and what it loses.

One work dir on tiny models made here: a ``run`` gets SIGTERM while it scores
(``logits/qwen``), its rerun while it aligns (``align/qwen``), the next while it trains
(``fuse/seed-0/qwen``, no periodic checkpoint), and the last rerun finishes. For each
stop: seconds from the signal to the "stopped by" line (the safe point reached and, for
training, the checkpoint saved) and to the process's exit (the interpreter's teardown
included), and what was lost (the dropped shard; training steps since the saved
checkpoint). Run:

    python benchmarks/bench_stop.py [--rows N] [--steps N]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

RECIPE = {
    "name": "bench-stop",
    "pivot": {"name": "pivot", "model": "models/pivot"},
    "sources": [{"name": "qwen", "model": "models/qwen"}],
    "data": {"train": "data/train.jsonl"},
    "logits": {"top_k": 4, "max_length": 96, "batch_size": 2, "rows_per_shard": 8},
    "fuse": {"defaults": {"per_device_train_batch_size": 2, "learning_rate": 1e-3}},
    "merges": [{"name": "linear", "method": "linear", "base": False, "model_parameters": {"weight": 0.5}}],
}


def inputs(root: Path, rows: int, steps: int) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from corpus import conversations, write_jsonl

    from fusechat_merge.demo.toy import make_model, make_tokenizer

    make_model(root / "models" / "pivot", "llama", tokenizer=make_tokenizer("metaspace"), seed=1)
    make_model(root / "models" / "qwen", "qwen2", tokenizer=make_tokenizer("bytelevel"), seed=2)
    (root / "data").mkdir()
    write_jsonl(root / "data" / "train.jsonl", conversations(rows))
    recipe = json.loads(json.dumps(RECIPE))
    recipe["fuse"]["defaults"]["max_steps"] = steps
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    return root


def progress(work: Path, stage: str) -> float:
    try:
        return json.loads((work / "stages" / (stage.replace("/", "__") + ".progress.json")).read_text())["n"]
    except (OSError, ValueError, KeyError):
        return 0


def stop_during(work: Path, stage: str, at_least: float) -> dict:
    cmd = [sys.executable, "-m", "fusechat_merge.cli", "run", str(work / "recipe.yaml"), "--work-dir", str(work)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"))
    while proc.poll() is None and progress(work, stage) < at_least:
        time.sleep(0.02)
    if proc.poll() is not None:
        raise SystemExit(f"the run ended before {stage} could be stopped:\n{proc.stderr.read()[-3000:]}")
    done_before = progress(work, stage)
    proc.send_signal(signal.SIGTERM)
    sent = time.perf_counter()
    said: dict[str, object] = {}

    def read() -> None:
        for line in proc.stderr:
            if "stopped by" in line and "line" not in said:
                said.update(line=line.strip(), seconds=time.perf_counter() - sent)

    reader = threading.Thread(target=read)
    reader.start()
    proc.wait()
    reader.join()
    exit_s = time.perf_counter() - sent
    line = str(said.get("line", ""))
    row = {"stage": stage, "exit_code": proc.returncode, "to_message_s": round(float(said.get("seconds", -1)), 2),
           "to_exit_s": round(exit_s, 2), "progress_at_signal": done_before, "said": line}
    step = re.search(r"checkpoint-(\d+)", line)
    if step:  # the progress record lags: steps at the signal ≤ the checkpoint's step
        row["checkpoint_step"] = int(step.group(1))
        row["steps_lost"] = 0
    shard = re.search(r"shard (\d+)/(\d+) was being \w+ and is dropped", line)
    if shard:
        row["dropped_shard"] = f"{shard.group(1)}/{shard.group(2)}"
        row["sequences_redone_at_most"] = RECIPE["logits"]["rows_per_shard"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=64, help="conversations in the corpus")
    parser.add_argument("--steps", type=int, default=2000, help="training steps of the fuse stage")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = inputs(Path(tmp) / "work", args.rows, args.steps)
        rows = [stop_during(work, "logits/qwen", 1), stop_during(work, "align/qwen", 1),
                stop_during(work, "fuse/seed-0/qwen", 5)]
        finish = subprocess.run([sys.executable, "-m", "fusechat_merge.cli", "run", str(work / "recipe.yaml"),
                                 "--work-dir", str(work)], capture_output=True, text=True, check=False)
    for row in rows:
        print(json.dumps(row))
    print(json.dumps({"rerun_after_the_three_stops": finish.returncode}))


if __name__ == "__main__":
    main()
