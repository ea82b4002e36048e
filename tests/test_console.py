"""What a person sees: a tiny whole run's terminal holds our lines only (one per stage, the
report, the timings), each stage's log holds the libraries' output; `status` reads the
records of an interrupted, then edited, run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from test_pipeline import RECIPE, work, write_recipe  # noqa: F401 (the fixture)

# lines only a library prints (its bars, warnings, the Trainer's log dicts)
LIBRARY_MARKERS = ("it/s]", "s/it]", "{'loss'", "'train_runtime'", "Executing graph", "Generating train split",
                   "Running generate_until", "Running loglikelihood", "UserWarning", "FutureWarning", "warnings.warn",
                   "INFO", "WARNING")
ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environment = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(ROOT),
                       **(env or {}))
    return subprocess.run([sys.executable, "-m", "fusechat_merge.cli", *args], env=environment,
                          capture_output=True, text=True, timeout=900)


def summarised(terminal: str) -> dict[str, str]:
    """Stage id → its time, from the summary lines: ``[id] ran in 1.2s, peak ...`` or, for a
    family of short stages, ``[merge/seed-0/] ran: sce 1.2s, linear 0.3s (peak ...)``."""
    shown: dict[str, str] = {}
    for line in terminal.splitlines():
        own = re.match(r"\[(\S+)\] ran in (\S+), peak \d+ MiB", line)
        folded = re.match(r"\[(\S+/)\] ran: (.*) \(peak \d+ MiB\)$", line)
        if own:
            shown[own[1]] = own[2]
        elif folded:
            for part in folded[2].split(", "):
                name, seconds = part.split(" ")
                shown[folded[1] + name] = seconds
    return shown


def with_lm_eval(root: Path) -> dict:
    from fusion.evaluate.lm_eval_tasks import write_skill_tasks

    tasks = write_skill_tasks({"chat": root / "data" / "held.jsonl"}, root / "data" / "lm_eval", max_gen_toks=4)
    recipe = json.loads(json.dumps(RECIPE))
    recipe["evaluate"]["lm_eval"] = {"tasks": [tasks.tag], "include_path": "data/lm_eval",
                                     "apply_chat_template": True, "bootstrap_iters": 0}
    recipe["fuse"]["defaults"]["logging_steps"] = 1
    return recipe


CAPTURE_SCRIPT = """
import logging, os, subprocess, sys, warnings
from fusion.runtime.log_capture import captured, echo
from fusion.runtime.progress import bar
library = logging.getLogger("somelibrary")
library.addHandler(logging.StreamHandler(sys.stderr))  # made before the stage, like transformers'
print("before", flush=True)
with captured(sys.argv[1], label="stage/x"):
    print("python print")
    os.write(1, b"fd one\\n")
    os.write(2, b"fd two\\n")
    subprocess.run([sys.executable, "-c", "print('child process')"], check=True)
    library.warning("library warning")
    warnings.warn_explicit("library deprecation", FutureWarning, "/site-packages/lib/x.py", 1)
    for _ in range(2):
        warnings.warn_explicit("our warning", UserWarning, "/x/fusion/data/conversations.py", 1)
    with bar(3, "step") as steps:
        steps.update(3)
    echo("our line")
print("after", flush=True)
library.warning("after the stage")
"""


def test_captured_sends_every_kind_of_library_output_to_the_log_and_restores(tmp_path):
    log = tmp_path / "stage.log"
    done = subprocess.run([sys.executable, "-c", CAPTURE_SCRIPT, str(log)], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["before", "warning: our warning", "our line", "after"]
    assert done.stderr.splitlines() == ["after the stage"]
    text = log.read_text()
    for line in ("python print", "fd one", "fd two", "child process", "library warning", "library deprecation",
                 "our warning"):
        assert line in text, line
    assert "after" not in text


def test_the_terminal_shows_our_lines_and_the_logs_the_libraries(work):  # noqa: F811
    write_recipe(work, with_lm_eval(work))
    plan = json.loads(cli("run", str(work / "recipe.yaml"), "--work-dir", str(work), "--plan").stdout)
    ids = [s["id"] for s in plan]
    done = cli("run", str(work / "recipe.yaml"), "--work-dir", str(work))
    assert done.returncode == 0, done.stderr[-3000:]
    terminal = done.stdout + done.stderr
    for marker in LIBRARY_MARKERS:
        assert marker not in terminal, (marker, terminal)
    shown = summarised(terminal)
    assert sorted(shown) == sorted(ids), terminal  # every stage, once, with its time
    assert all(seconds.endswith("s") for seconds in shown.values())
    assert "target:qwen" in terminal and "stage timings" in terminal  # the report and the timings
    # a line per stage plus its few result lines, the report's tables (results, transfer, effects)
    assert len(terminal.splitlines()) < 3 * len(ids) + 40, terminal

    logs = {p.name: p.read_text(encoding="utf-8", errors="replace") for p in (work / "logs").glob("*.log")}
    assert set(logs) == {sid.replace("/", "__") + ".log" for sid in ids}
    assert "{'loss'" in logs["fuse__seed-0__qwen.log"]  # the Trainer's log dicts
    assert "Executing graph" in logs["merge__seed-0__sce.log"]  # mergekit's bar
    assert "Running generate_until" in logs["evaluate__lm-eval__seed-0__target-qwen.log"]  # lm-eval's
    for name, text in logs.items():
        assert text.startswith("==> ["), name

    again = cli("run", str(work / "recipe.yaml"), "--work-dir", str(work), "-v")
    assert again.returncode == 0 and f"up to date, skipped: {len(ids)} stages" in again.stdout


def test_verbose_shows_the_libraries_live_and_still_logs_them(work):  # noqa: F811
    done = cli("run", str(work / "recipe.yaml"), "--work-dir", str(work), "--stage", "logits/pivot", "--verbose")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "logits/pivot" in summarised(done.stdout)
    log = (work / "logs" / "logits__pivot.log").read_text()
    for line in ("==> [logits/pivot]", "Generating train split"):  # ours and a library's, both live
        assert line in done.stdout and line in log


def test_a_failed_stage_names_itself_its_error_and_its_log(work):  # noqa: F811
    for weights in (work / "models" / "qwen").glob("*.safetensors"):
        weights.write_bytes(b"not weights")
    done = cli("run", str(work / "recipe.yaml"), "--work-dir", str(work))
    assert done.returncode == 1
    log = work / "logs" / "logits__qwen.log"
    assert "stage logits/qwen failed:" in done.stderr and str(log) in done.stderr
    assert "Traceback" not in done.stdout + done.stderr and "Traceback" in log.read_text()
    failed = json.loads((work / "stages" / "logits__qwen.failed.json").read_text())
    assert failed["log"] == str(log) and failed["error"]


def status_of(root: Path, *extra: str) -> dict[str, dict]:
    done = cli("status", str(root), *extra, "--json")
    assert done.returncode == 0, done.stderr
    return {row["id"]: row for row in json.loads(done.stdout)}


def test_status_tells_done_failed_stale_and_waiting_apart(work):  # noqa: F811
    # the held-out file is first read by its store for the transfer measure: the run stops there
    (work / "data" / "held.jsonl").write_text("not json\n")
    failing = "logits/eval-chat/pivot"
    failed_run = cli("run", str(work / "recipe.yaml"), "--work-dir", str(work))
    assert failed_run.returncode == 1 and f"stage {failing} failed" in failed_run.stderr
    edited = json.loads(json.dumps(RECIPE))
    edited["merges"][0]["parameters"]["select_topk"] = 0.6  # the sce merge's key changes
    write_recipe(work, edited)

    rows = status_of(work, str(work / "recipe.yaml"))
    states = {stage_id: row["state"] for stage_id, row in rows.items()}
    assert states == {"logits/pivot": "done", "logits/qwen": "done", "align/qwen": "done",
                      "fuse/seed-0/qwen": "done", "merge/seed-0/sce": "stale", "merge/seed-0/linear": "done",
                      failing: "failed", "logits/eval-chat/qwen": "waiting", "align/eval-chat/qwen": "waiting",
                      "evaluate/base": "waiting", "evaluate/seed-0": "waiting", "evaluate/report": "waiting"}
    assert rows[failing]["log"] == str(work / "logs" / "logits__eval-chat__pivot.log")
    assert "Error" in rows[failing]["error"]
    assert rows["fuse/seed-0/qwen"]["seconds"] > 0 and rows["fuse/seed-0/qwen"]["peak_rss_mb"] > 0
    assert set(rows["evaluate/seed-0"]["waits_for"]) == {"merge/seed-0/sce", "align/eval-chat/qwen"}

    text = cli("status", str(work), str(work / "recipe.yaml")).stdout
    assert text.splitlines()[-1] == "5 done, 1 failed, 1 stale, 5 waiting"
    assert "the recipe or an input changed" in text and "log: " in text
    # without the recipe: what the records say (no keys to compare)
    recorded = status_of(work)
    assert recorded["merge/seed-0/sce"]["state"] == "done" and recorded[failing]["state"] == "failed"
    assert "evaluate/report" not in recorded


def test_status_follows_a_running_stage_and_tells_a_killed_one(work):  # noqa: F811
    import signal
    import time

    from fusechat_merge.pipeline import pipeline_runner
    from fusechat_merge.pipeline.status import stage_status
    from fusechat_merge.pipeline_recipe import load_pipeline_recipe

    long = json.loads(json.dumps(RECIPE))
    long["fuse"]["defaults"].update(max_steps=2000, save_strategy="no")
    write_recipe(work, long)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "fusechat_merge.cli", "run", str(work / "recipe.yaml"),
                             "--work-dir", str(work)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = work / "stages" / "fuse__seed-0__qwen.progress.json"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None and not progress.exists():
        time.sleep(0.05)

    def fuse_row() -> dict:
        runner = pipeline_runner(load_pipeline_recipe(work / "recipe.yaml", work), work)
        return next(r for r in stage_status(runner) if r["id"] == "fuse/seed-0/qwen")

    try:
        assert progress.exists(), "the fuse stage never reported progress"
        running = fuse_row()
        assert running["state"] == "running" and running["pid"] == proc.pid
        assert running["progress"]["unit"] == "step" and running["progress"]["total"] == 2000
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert fuse_row()["state"] == "interrupted"

