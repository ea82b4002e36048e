"""`fuse.launch` in the recipe: the fuse stage under a real `accelerate launch`
(recipes/accelerate/ddp.yaml, two CPU processes over gloo) trains the target that one
process trains with the same global batch, and its record says it ran on two processes; a
launched stage that fails names its stage, exit code and the last lines of its log."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from corpus import write_jsonl
from helpers import load_weights
from test_distributed import needs_gloo, same_length_replies

from fusechat_merge.pipeline import run_pipeline
from fusechat_merge.pipeline.runner import StageError
from fusechat_merge.pipeline_recipe import PipelineRecipeError, load_pipeline_recipe

DDP = Path(__file__).resolve().parents[1] / "recipes" / "accelerate" / "ddp.yaml"
# --use-cpu: the Trainer joins a CPU-only torchrun in a gloo group (see test_distributed.py)
TRAIN = {"max_steps": 3, "learning_rate": 1e-3, "use_cpu": True, "dataloader_num_workers": 0}
LAUNCH = {"accelerate_config": str(DDP), "num_processes": 2, "args": ["--mixed_precision", "no",
                                                                      "--dynamo_backend", "no"]}
RECIPE = {
    "name": "tiny-launch",
    "pivot": {"name": "pivot", "model": "models/pivot"},
    "sources": [{"name": "qwen", "model": "models/qwen"}],
    "data": {"train": "data/train.jsonl"},
    "logits": {"top_k": 5, "max_length": 96, "batch_size": 8},
    "fuse": {"defaults": {**TRAIN, "per_device_train_batch_size": 4}},
    "merges": [{"name": "linear", "method": "linear", "base": False, "model_parameters": {"weight": 1.0}}],
}


@pytest.fixture
def work(tmp_path, metaspace_tokenizer, bytelevel_tokenizer) -> Path:
    from fusechat_merge.demo.toy import make_model

    make_model(tmp_path / "models" / "pivot", "llama", tokenizer=metaspace_tokenizer, seed=1)
    make_model(tmp_path / "models" / "qwen", "qwen2", tokenizer=bytelevel_tokenizer, seed=2)
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "train.jsonl", same_length_replies(16))  # equal trained tokens
    return tmp_path


def run(work: Path, recipe: dict) -> dict[str, str]:
    (work / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    stages = run_pipeline(load_pipeline_recipe(work / "recipe.yaml", work), work, log=lambda _: None)
    return {s.id: s.status for s in stages}


def fuse_record(work: Path) -> dict:
    return json.loads((work / "stages" / "fuse__seed-0__qwen.done.json").read_text())


@pytest.mark.slow
@needs_gloo
def test_launched_fuse_stage_trains_the_one_process_target_on_two_processes(work):
    run(work, RECIPE)
    single = work / "single"
    shutil.copytree(work / "targets" / "seed-0" / "qwen", single)
    assert fuse_record(work)["world_size"] == 1 and fuse_record(work)["executor"] == "local"

    launched = json.loads(json.dumps(RECIPE))  # global batch 4 = 2 processes × 2
    launched["fuse"] = {"defaults": {**TRAIN, "per_device_train_batch_size": 2}, "launch": LAUNCH}
    statuses = run(work, launched)
    assert statuses["logits/qwen"].startswith("skipped") and statuses["fuse/seed-0/qwen"] == "ran"
    record = fuse_record(work)
    assert record["world_size"] == 2  # as the training run recorded it
    assert record["peak_rss_of"] == "largest launched process" and record["peak_rss_mb"] > 0
    target = work / "targets" / "seed-0" / "qwen"
    assert json.loads((target / "train_run.json").read_text())["global_batch"] == 4
    one, two = load_weights(single), load_weights(target)
    assert one.keys() == two.keys()
    # all-reduced gradients round differently from one process's batch; Adam scales a near-zero
    # gradient's rounding up to the step size (seen: 3.5e-6 on this CPU); a wrong global batch
    # or a missing all-reduce moves weights by about the learning rate (1e-3)
    for name in one:
        assert torch.allclose(one[name], two[name], rtol=0, atol=2e-5), (name, (one[name] - two[name]).abs().max())
    log = (work / "logs" / "fuse__seed-0__qwen.log").read_text()
    assert "accelerate.commands.launch" in log and "--num_processes 2" in log
    assert yaml.safe_load((work / "logs" / "fuse__seed-0__qwen.fuse.yaml").read_text())["seed"] == 0


@pytest.mark.slow
def test_a_failed_launch_names_its_stage_exit_code_and_log_tail(work):
    broken = json.loads(json.dumps(RECIPE))  # an argument accelerate launch refuses
    broken["fuse"]["launch"] = {**LAUNCH, "args": ["--num_cpu_threads_per_process", "many"]}
    with pytest.raises(StageError) as err:
        run(work, broken)
    message = str(err.value)
    assert message.startswith("stage fuse/seed-0/qwen failed: LaunchError: accelerate launch exited with code 2")
    assert "fuse__seed-0__qwen.log" in message and "invalid int value: 'many'" in message
    assert (work / "stages" / "fuse__seed-0__qwen.started.json").exists()  # a rerun resumes it


def test_launch_keys_are_checked(work):
    recipe = json.loads(json.dumps(RECIPE))
    recipe["fuse"]["launch"] = {"accelerate_config": "missing.yaml", "num_processes": 0}
    recipe["fuse"]["per_source_launch"] = {"nobody": {"num_processes": 2}}
    (work / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    with pytest.raises(PipelineRecipeError, match=r"fuse.launch.num_processes \(line \d+\): Input should be greater"):
        load_pipeline_recipe(work / "recipe.yaml", work)
    recipe["fuse"]["launch"]["num_processes"] = 2
    (work / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    with pytest.raises(PipelineRecipeError) as err:
        load_pipeline_recipe(work / "recipe.yaml", work)
    assert "fuse.per_source_launch.nobody (line" in str(err.value) and "no source named 'nobody'" in str(err.value)
    assert "fuse.launch.accelerate_config (line" in str(err.value) and "missing.yaml does not exist" in str(err.value)


@pytest.mark.parametrize(("content", "said"), [(b"distributed_type: [FSDP\n", "<yaml>: while parsing"),
                                               (b"- FSDP\n", "<top level>: an accelerate config is a YAML mapping"),
                                               (b"num_processes: \xff\n", "<file>: cannot be read")])
def test_an_accelerate_config_that_cannot_be_read_is_named_before_any_work(work, content, said):
    """The memory estimate and the FSDP-on-CPU check read it before accelerate does: a
    broken one is the recipe's fault, named with its key, not a traceback mid-run."""
    (work / "accel.yaml").write_bytes(content)
    recipe = json.loads(json.dumps(RECIPE))
    recipe["fuse"]["launch"] = {**LAUNCH, "accelerate_config": str(work / "accel.yaml")}
    (work / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    with pytest.raises(PipelineRecipeError) as err:
        load_pipeline_recipe(work / "recipe.yaml", work)
    pattern = r"fuse\.launch\.accelerate_config \(line \d+\): " + re.escape(f"{work / 'accel.yaml'}: {said}")
    assert re.search(pattern, str(err.value)), str(err.value)


@needs_gloo
def test_a_launched_fuse_stage_logs_its_processes_and_shows_only_our_lines(work):
    from test_console import LIBRARY_MARKERS, cli, summarised

    launched = json.loads(json.dumps(RECIPE))
    launched["fuse"]["launch"] = LAUNCH
    (work / "recipe.yaml").write_text(yaml.safe_dump(launched, sort_keys=False))
    done = cli("run", str(work / "recipe.yaml"), "--work-dir", str(work))
    assert done.returncode == 0, done.stderr[-3000:]
    for marker in LIBRARY_MARKERS:
        assert marker not in done.stdout + done.stderr, (marker, done.stdout + done.stderr)
    assert "fuse/seed-0/qwen" in summarised(done.stdout)
    log = (work / "logs" / "fuse__seed-0__qwen.log").read_text()
    assert "accelerate.commands.launch" in log and "{'loss'" in log and "==> fuse" in log
    assert not (work / "targets" / "seed-0" / "qwen.log").exists()  # the launched command logs into the stage's


@pytest.mark.slow
@needs_gloo
def test_an_fsdp_config_on_cpu_says_once_that_it_runs_as_ddp(work):
    """accelerate allows FSDP on accelerators only: with use_cpu it trains DDP, silently."""
    from test_console import cli

    launched = json.loads(json.dumps(RECIPE))
    launched["fuse"]["defaults"]["max_steps"] = 1
    launched["fuse"]["launch"] = {**LAUNCH, "accelerate_config": str(DDP.with_name("fsdp.yaml"))}
    (work / "recipe.yaml").write_text(yaml.safe_dump(launched, sort_keys=False))
    done = cli("run", str(work / "recipe.yaml"), "--work-dir", str(work))
    assert done.returncode == 0, done.stderr[-3000:]
    said = "FSDP with use_cpu: accelerate runs it as DDP (it allows FSDP on accelerators only)"
    assert done.stdout.count(said) == 1, done.stdout
    log = (work / "logs" / "fuse__seed-0__qwen.log").read_text()
    assert log.count(said) == 1 and re.search(r"accelerate launch \(2 processes\), log: .*" + re.escape(said), log)
    assert fuse_record(work)["world_size"] == 2
