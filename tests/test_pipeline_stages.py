"""Stage by stage for any scheduler: `run --plan` prints the plan as JSON (ids, kinds,
dependencies, status, resources) and `run --stage ID` runs one stage once its upstream
stages are done; the recipe's resources and per-model vLLM settings are checked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from corpus import conversations, write_jsonl

from fusechat_merge.cli import main
from fusechat_merge.pipeline import WorkDir, plan_stages
from fusechat_merge.pipeline_recipe import PipelineRecipeError, load_pipeline_recipe

RECIPE = {
    "name": "tiny-stages",
    "pivot": {"name": "pivot", "model": "models/pivot"},
    "sources": [{"name": "qwen", "model": "models/qwen", "backend": "hf"}],
    "data": {"train": "data/train.jsonl"},
    "logits": {"top_k": 5, "max_length": 96, "batch_size": 8},
    "fuse": {"defaults": {"max_steps": 2, "per_device_train_batch_size": 4}},
    "merges": [{"name": "linear", "method": "linear", "base": False, "model_parameters": {"weight": 1.0}}],
    "resources": {"logits": {"num_gpus": 1}, "fuse": {"num_cpus": 2, "memory": "1GiB"},
                  "stages": {"logits/qwen": {"num_gpus": 4}}},
}


@pytest.fixture
def work(tmp_path, metaspace_tokenizer, bytelevel_tokenizer) -> Path:
    from fusechat_merge.demo.toy import make_model

    make_model(tmp_path / "models" / "pivot", "llama", tokenizer=metaspace_tokenizer, seed=1)
    make_model(tmp_path / "models" / "qwen", "qwen2", tokenizer=bytelevel_tokenizer, seed=2)
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "train.jsonl", conversations(6))
    write(tmp_path, RECIPE)
    return tmp_path


def write(work: Path, recipe: dict) -> Path:
    path = work / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def cli(work: Path, *args: str):
    return CliRunner().invoke(main, ["run", str(work / "recipe.yaml"), "--work-dir", str(work), *args])


def plan(work: Path) -> dict[str, dict]:
    result = cli(work, "--plan")
    assert result.exit_code == 0, result.output
    return {s["id"]: s for s in json.loads(result.output)}


def test_plan_then_stage_by_stage(work):
    stages = plan(work)
    assert list(stages) == ["logits/pivot", "logits/qwen", "align/qwen", "fuse/seed-0/qwen", "merge/seed-0/linear"]
    assert stages["align/qwen"]["after"] == ["logits/pivot", "logits/qwen"]
    assert stages["align/qwen"]["kind"] == "align" and {s["status"] for s in stages.values()} == {"new"}
    assert stages["logits/pivot"]["resources"] == {"num_cpus": 1, "num_gpus": 1, "memory": None}
    assert stages["logits/qwen"]["resources"] == {"num_cpus": 1, "num_gpus": 4, "memory": None}
    assert stages["fuse/seed-0/qwen"]["resources"] == {"num_cpus": 2, "num_gpus": 0, "memory": 2**30}
    assert not (work / "stages").exists()  # --plan runs nothing

    refused = cli(work, "--stage", "align/qwen")
    assert refused.exit_code != 0
    assert "stage align/qwen waits for logits/pivot, logits/qwen: not done yet" in refused.output
    assert cli(work, "--stage", "logits/pivot").exit_code == 0
    refused = cli(work, "--stage", "align/qwen")
    assert "waits for logits/qwen: not done" in refused.output and refused.exit_code != 0
    assert cli(work, "--stage", "logits/qwen").exit_code == 0
    assert plan(work)["logits/qwen"]["status"] == "done"
    assert cli(work, "--stage", "align/qwen").exit_code == 0
    record = json.loads((work / "stages" / "align__qwen.done.json").read_text())
    assert record["executor"] == "local" and record["finished_at"] >= record["started_at"]
    again = cli(work, "--stage", "align/qwen")  # done: skipped
    assert again.exit_code == 0 and "up to date" in again.output
    assert json.loads((work / "stages" / "align__qwen.done.json").read_text()) == record
    unknown = cli(work, "--stage", "fuse/qwen")
    assert unknown.exit_code != 0 and "no stage 'fuse/qwen'; the stages are: logits/pivot" in unknown.output


def test_per_model_engine_settings_reach_the_logit_job(work):
    vllm = {"name": "qwen", "model": "models/qwen", "backend": "vllm", "tensor_parallel_size": 4,
            "gpu_memory_utilization": 0.8}
    write(work, {**RECIPE, "sources": [vllm]})  # planned only: vLLM need not be installed
    stages = {s.id: s for s in plan_stages(load_pipeline_recipe(work / "recipe.yaml", work), WorkDir(work))}
    job = stages["logits/qwen"].job
    assert (job.backend, job.tensor_parallel_size, job.gpu_memory_utilization) == ("vllm", 4, 0.8)
    assert stages["logits/pivot"].job.tensor_parallel_size == 1


@pytest.mark.parametrize(("change", "message"), [
    ({"resources": {"fuse": {"num_gpus": -1}}}, "resources.fuse.num_gpus (line"),
    ({"resources": {"merge": {"memory": "lots"}}}, "expected bytes or a size such as 64GiB"),
    ({"resources": {"fuse": {"gpus": 8}}}, "resources.fuse.gpus (line"),
    ({"sources": [{"name": "qwen", "model": "models/qwen", "gpu_memory_utilization": 1.5}]},
     "sources[0].gpu_memory_utilization (line"),
    ({"sources": [{"name": "qwen", "model": "models/qwen", "backend": "tgi"}]}, "sources[0].backend (line"),
])
def test_resource_and_engine_keys_are_checked(work, change, message):
    write(work, {**RECIPE, **change})
    with pytest.raises(PipelineRecipeError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_pipeline_recipe(work / "recipe.yaml", work)


def test_resources_for_an_unknown_stage_are_refused(work):
    write(work, {**RECIPE, "resources": {"stages": {"logits/nobody": {"num_gpus": 1}}}})
    result = cli(work, "--plan")
    assert result.exit_code != 0 and "resources.stages: no stage logits/nobody" in result.output


@pytest.mark.parametrize(("args", "message"), [
    (["--ray-address", "auto"], "--ray-address needs --executor ray"),
    (["--stage", "logits/pivot", "--executor", "ray"], "--stage runs the stage in this process"),
    (["--plan", "--stage", "logits/pivot"], "--plan, --stage and --dry-run go alone"),
    (["--stage", "logits/pivot", "--only", "logits"], "--plan, --stage and --dry-run go alone"),
])
def test_run_options_that_do_not_go_together(work, args, message):
    result = cli(work, *args)
    assert result.exit_code == 2 and message in result.output
    assert not (work / "stages").exists()
