"""What users bring, third round (issue 29): options that must reach the Trainer or be
refused naming the key, and exits that say what happened (a second demo, a model folder
without weights, eval's output, OpenAI content parts). Through the CLI, on the tiny models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from corpus import write_jsonl
from helpers import BIN, refused, sce_recipe, tree_hash, write_recipe
from test_faults_users import cli, ok

TRAIN = ["--per-device-train-batch-size", "2", "--learning-rate", "1e-3", "--seed", "0",
         "--disable-tqdm", "true"]


# --- 29.1: options that silently vanished ---------------------------------------------------


def test_flags_equal_to_the_library_default_override_the_config_and_ours(world, tmp_path):
    """`--save-strategy steps` equals TrainingArguments' default: it was dropped, and the
    tool's `epoch` (or the --config file's) trained instead; `--logging-steps 500` too."""
    config = tmp_path / "train.yaml"
    config.write_text("save_strategy: epoch\nlogging_steps: 3\n", encoding="utf-8")
    out = tmp_path / "target"
    ok(cli("fuse", "--pivot", world["pivot"], "--aligned", world["aligned"], "--out", out, "--config", config,
           *TRAIN, "--max-steps", "3", "--save-strategy", "steps", "--save-steps", "2", "--logging-steps", "500"))
    # 8 rows, batch 2: an epoch is 4 steps, so only the steps strategy saves at step 2
    state = json.loads((out / "checkpoints" / "checkpoint-2" / "trainer_state.json").read_text())
    assert (state["save_steps"], state["logging_steps"]) == (2, 500)


def test_output_dir_is_refused_naming_the_key(world, tmp_path):
    out = tmp_path / "target"
    refused(cli("fuse", "--pivot", world["pivot"], "--aligned", world["aligned"], "--out", out, *TRAIN,
                "--output-dir", tmp_path / "elsewhere"), "output_dir", "--out")
    assert not out.exists() and not (tmp_path / "elsewhere").exists()


def recipe(world, **changes) -> dict:
    base = {
        "name": "opts", "seeds": [0],
        "pivot": {"name": "pivot", "model": str(world["pivot"])},
        "sources": [{"name": "src", "model": str(world["source"])}],
        "data": {"train": str(world["data"])},
        "logits": {"top_k": 4}, "fuse": {"defaults": {"max_steps": 1}},
        "merges": [{"name": "sce", "method": "fusechat_sce", "parameters": {"select_topk": 0.5}}],
    }
    return {**base, **changes}


def test_recipe_training_options_reach_the_run_or_are_refused_naming_the_key(world, tmp_path):
    """A `fuse.defaults` block of mapping values was read as per-source blocks ("unknown
    training option min_lr"); `seeds: [0, 0]` trained every seed stage twice and reported
    "± 0 over 2 seeds"; `seed` in fuse.defaults was replaced by the run's without a word."""
    path = tmp_path / "recipe.yaml"
    work = tmp_path / "work"
    kwargs = {"lr_scheduler_type": "cosine_with_min_lr", "lr_scheduler_kwargs": {"min_lr": 1e-6}}
    write_recipe(path, recipe(world, fuse={"defaults": {"lr_scheduler_kwargs": {"min_lr": 1e-6}}}))
    ok(cli("run", path, "--work-dir", work, "--dry-run"))
    write_recipe(path, recipe(world, fuse={"defaults": {"max_steps": 1, **kwargs}}))
    plan = json.loads(ok(cli("run", path, "--work-dir", work, "--plan")).output)
    assert any(s["id"] == "fuse/seed-0/src" for s in plan)
    for changes, words in (
        ({"seeds": [0, 1, 0]}, ["seeds (line 2)", "seed 0 is listed twice"]),
        ({"fuse": {"defaults": {"seed": 7}}}, ["fuse.defaults", "seed cannot be set here", "`seeds`"]),
        ({"fuse": {"per_source": {"src": {"output_dir": "x"}}}}, ["fuse.per_source", "output_dir cannot be set"]),
        ({"fuse": {"defaults": {"src": {"max_steps": 1}}}}, ["unknown training option(s) src", "fuse.per_source"]),
        ({"sources": [{"name": "src", "model": str(world["source"]), "tensor_parallel_size": 2}]},
         ["sources[0].backend", "tensor_parallel_size is for the vllm backend"]),
    ):
        write_recipe(path, recipe(world, **changes))
        refused(cli("run", path, "--work-dir", work, "--dry-run"), str(path), *words)
    assert not work.exists()


def test_engine_options_of_another_backend_are_refused_not_dropped(world, tmp_path):
    """`--tensor-parallel-size 4` with the hf backend scored on one device without a word."""
    for extra, words in ((["--tensor-parallel-size", "4"], "tensor_parallel_size is for the vllm backend"),
                         (["--device", "cpu", "--device-map", "auto"], "device cpu and device_map auto")):
        refused(cli("logits", "--model", world["pivot"], "--data", world["data"], "--out", tmp_path / "s",
                    "--top-k", "4", *extra), words)
    assert not (tmp_path / "s").exists()


def test_lm_eval_model_args_that_are_options_of_their_own_are_refused(world, tmp_path):
    """Before: lm-eval's TypeError "got multiple values for keyword argument 'batch_size'"."""
    tasks = tmp_path / "tasks"
    from fusion.evaluate.lm_eval_tasks import write_skill_tasks

    write_skill_tasks({"chat": world["data"]}, tasks, cache_dir=tmp_path / "cache")
    for key in ("batch_size", "device"):
        refused(cli("eval", "--model", world["pivot"], "--tasks", "fusechat_skills", "--include-path", tasks,
                    "--model-args", f"dtype=float32,{key}=1", "--out", tmp_path / "e.json"),
                f"model_args: {key} is an option of its own", f"--{key.replace('_', '-')}")
    assert not (tmp_path / "e.json").exists()


# --- 29.5: exits that say what happened -------------------------------------------------------


def shell(*args, env: dict[str, str] | None = None, timeout: float = 300, **kw):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[1]),
                                                                        os.environ.get("PYTHONPATH")])),
           **(env or {})}
    return subprocess.run([str(BIN / "fusechat-merge"), *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=timeout, **kw)


def test_a_model_folder_without_weights_is_named_before_any_work(world, tmp_path, model_family):
    """config.json and tokenizer, no weights (an unfinished copy): before, raw tracebacks
    from transformers in logits (after the store was begun) and from mergekit in merge."""
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(world["pivot"], bare, ignore=shutil.ignore_patterns("*.safetensors"))
    sharded = tmp_path / "sharded"  # an index whose shards are not all there
    shutil.copytree(world["pivot"], sharded, ignore=shutil.ignore_patterns("*.safetensors"))
    (sharded / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    shutil.copy(world["pivot"] / "model.safetensors", sharded / "model-00001-of-00002.safetensors")
    base, t1, _ = model_family["llama"][:3]
    bare_merge = tmp_path / "bare-t1"
    shutil.copytree(t1, bare_merge, ignore=shutil.ignore_patterns("*.safetensors"))
    write_recipe(tmp_path / "r.yaml", sce_recipe([base, bare_merge]))
    before = tree_hash(world["root"])
    cases = [
        (["logits", "--model", bare, "--data", world["data"], "--out", tmp_path / "store", "--top-k", "4"],
         [str(bare), "no weights"]),
        (["logits", "--model", sharded, "--data", world["data"], "--out", tmp_path / "store", "--top-k", "4"],
         [str(sharded), "1 of the 2 weight files", "model-00002-of-00002.safetensors"]),
        (["fuse", "--pivot", bare, "--aligned", world["aligned"], "--out", tmp_path / "target", *TRAIN],
         [str(bare), "no weights"]),
        (["merge", tmp_path / "r.yaml", tmp_path / "merged"], [str(bare_merge), "no weights"]),
        (["eval", "--model", bare, "--tasks", "t", "--out", tmp_path / "e.json"], [str(bare), "no weights"]),
    ]
    for args, words in cases:
        refused(cli(*args), *words)
    assert not any((tmp_path / n).exists() for n in ("store", "target", "merged", "e.json"))
    write_recipe(tmp_path / "p.yaml", recipe(world, sources=[{"name": "src", "model": str(bare)}]))
    refused(cli("run", tmp_path / "p.yaml", "--work-dir", tmp_path / "work"), "sources[0].model", str(bare),
            "no weights")
    assert tree_hash(world["root"]) == before


def test_eval_keeps_the_libraries_output_in_its_log(world, tmp_path):
    """Before: lm-eval's and transformers' bars, warnings and git's "fatal: not a git
    repository" on the terminal, and no --log (unlike logits, align, fuse, merge)."""
    from fusion.evaluate.lm_eval_tasks import write_skill_tasks

    tasks = tmp_path / "tasks"
    write_skill_tasks({"chat": world["data"]}, tasks, cache_dir=tmp_path / "cache")
    out, log = tmp_path / "scores.json", tmp_path / "eval.log"
    args = ["eval", "--model", world["pivot"], "--tasks", "fusechat_skills", "--include-path", tasks,
            "--limit", "2", "--bootstrap-iters", "0", "--out", out]
    proc = shell(*args, "--log", log, cwd=tmp_path, env={"HF_DATASETS_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr
    assert "fatal" not in proc.stderr and "%|" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert "|Tasks" in proc.stdout.replace(" ", "") and f"results: {out}" in proc.stdout
    assert "eval: done in" in proc.stdout + proc.stderr
    assert "==> eval" in log.read_text(encoding="utf-8") and json.loads(out.read_text())["results"]
    proc = shell(*args[:-1], tmp_path / "again.json", cwd=tmp_path, env={"HF_DATASETS_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0 and (tmp_path / "again.json.log").is_file()  # default: OUT.log beside --out


def test_openai_content_parts_are_joined_and_other_parts_refused(world, tmp_path):
    """Before: every row whose content was a list of parts was "skipped as malformed"."""
    def messages(content_user, content_reply):
        return {"messages": [{"role": "user", "content": content_user},
                             {"role": "assistant", "content": content_reply}]}

    plain = write_jsonl(tmp_path / "plain.jsonl", [messages("Say hi.\nPlease.", "Hi there!")] * 3)
    parts = write_jsonl(tmp_path / "parts.jsonl", [messages(
        [{"type": "text", "text": "Say hi."}, {"type": "text", "text": "Please."}],
        [{"type": "text", "text": "Hi there!"}])] * 3)
    stores = {}
    for name, data in (("plain", plain), ("parts", parts)):
        stores[name] = tmp_path / f"s-{name}"
        result = ok(cli("logits", "--model", world["pivot"], "--data", data, "--out", stores[name], "--top-k", "4",
                        "--cache-dir", tmp_path / "cache"))
        assert "malformed" not in result.output
    shard = "shard-00000.arrow"
    assert (stores["plain"] / shard).read_bytes() == (stores["parts"] / shard).read_bytes()
    image = [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": "x.png"}}]
    rows = [messages("Say hi.", "Hi!"), {"id": "pic-1", **messages(image, [{"type": "text", "text": "A cat."}])}]
    mixed = write_jsonl(tmp_path / "mixed.jsonl", rows)
    refused(cli("logits", "--model", world["pivot"], "--data", mixed, "--out", tmp_path / "s-mixed", "--top-k", "4",
                "--cache-dir", tmp_path / "cache"), str(mixed), "row pic-1", "'image_url'", "only text parts")
    assert not (tmp_path / "s-mixed").exists()


def test_a_second_demo_in_the_same_folder_is_refused_at_once(tmp_path):
    """Before: both demos made the models and trained for minutes, then the second died with
    a raw LockError. Now the first holds the work dir from its first step on."""
    from fusechat_merge.pipeline import WorkDir

    work = tmp_path / "demo"
    code = ("import sys, time; from pathlib import Path; from fusion.artifacts.locks import OutputLock; "
            "OutputLock(Path(sys.argv[1]), 'work dir').acquire(); print('held', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(WorkDir(work.absolute()).run_lock)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        proc = shell("demo", "--work-dir", work, timeout=120)
        seconds = time.monotonic() - started
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and f"pid {holder.pid}" in proc.stderr, proc.stderr
    assert "is being written by another process" in proc.stderr
    assert not (work / "models").exists() and seconds < 60
