"""Pipeline recipes: the shipped ones validate; bad ones fail before work, naming key and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from fusechat_merge.pipeline_recipe import PipelineRecipeError, load_pipeline_recipe

RECIPES = Path(__file__).parent.parent / "recipes"


def test_fusechat_7b_recipe_validates(tmp_path):
    recipe = load_pipeline_recipe(RECIPES / "fusechat-7b.yaml", tmp_path)
    assert recipe.pivot.model == "openchat/openchat_3.5" and len(recipe.sources) == 5
    assert recipe.merges[0].parameters["select_topk"] == 0.1
    assert recipe.fuse.defaults["learning_rate"] == 5e-6 and recipe.fuse.defaults["num_train_epochs"] == 3


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


BASE = """\
pivot: {name: p, model: openchat/openchat_3.5}
sources:
  - {name: s, model: Qwen/Qwen1.5-72B-Chat}
data: {train: data.jsonl}
"""


@pytest.mark.parametrize(
    "extra,expected",
    [
        ("colour: blue\n", "colour (line 5): Extra inputs are not permitted"),
        ("logits: {top_k: 0}\n", "logits.top_k (line 5)"),
        ("merges:\n  - {name: m, method: sce_typo}\n", "merges[0].method (line 6): mergekit knows no merge method 'sce_typo'"),
        ("fuse:\n  defaults: {learning_rat: 1.0}\n", "unknown training option(s) learning_rat"),
        ("fuse:\n  per_source: {nobody: {max_steps: 1}}\n", "fuse.per_source.nobody (line 6): no source named 'nobody'"),
    ],
)
def test_bad_recipes_name_the_key_and_line(tmp_path, extra, expected):
    (tmp_path / "data.jsonl").write_text("")
    with pytest.raises(PipelineRecipeError) as info:
        load_pipeline_recipe(write(tmp_path, BASE + extra), tmp_path)
    assert expected in str(info.value)


def test_missing_model_and_source_without_tokenizer(tmp_path):
    (tmp_path / "data.jsonl").write_text("")
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "config.json").write_text("{}")
    text = BASE.replace("openchat/openchat_3.5", "./nowhere").replace("Qwen/Qwen1.5-72B-Chat", "bare")
    with pytest.raises(PipelineRecipeError) as info:
        load_pipeline_recipe(write(tmp_path, text), tmp_path)
    message = str(info.value)
    assert "pivot.model (line 1): model path" in message and "does not exist" in message
    assert "sources[0].model (line 3)" in message and "has no tokenizer" in message


@pytest.mark.parametrize(
    "extra,expected",
    [
        ("merges:\n  - {name: m, parameters: {select_topk: 1.5}}\n", "merges[0].parameters.select_topk (line 6)"),
        ("merges:\n  - {name: m, method: ties, model_parameters: {densty: 0.5}}\n",
         "merges[0].model_parameters.densty (line 6): ties has no parameter 'densty'"),
        ("fuse:\n  defaults: {learning_rate: -1.0}\n", "fuse.defaults (line 6): learning_rate must be > 0"),
        ("fuse:\n  defaults: {max_steps: 0}\n", "fuse.defaults (line 6): max_steps must be > 0"),
        ("fuse:\n  defaults: {learning_rate: 5e-6, max_steps: x}\n", "fuse.defaults (line 6): max_steps: expected a number"),
        ("merges:\n  - {name: ../../victim}\n", "merges[0].name (line 6): Value error, '../../victim' is not a plain name"),
        # required parameters mergekit would only miss mid-merge
        ("merges:\n  - {name: m, method: ties, model_parameters: {density: 0.5}}\n",
         "merges[0].model_parameters (line 6): ties needs 'weight' for each target"),
        ("merges:\n  - {name: m, method: linear, model_parameters: {weight: 0.5}}\n",
         "merges[0].base (line 6): linear needs 'weight' for the pivot too, which `base: true` merges as an input"),
        ("merges:\n  - {name: m, method: slerp, base: true}\n", "merges[0].parameters (line 6): slerp needs the parameter 't'"),
    ],
)
def test_every_stage_option_is_checked_before_any_work(tmp_path, extra, expected):
    (tmp_path / "data.jsonl").write_text("")
    with pytest.raises(PipelineRecipeError) as info:
        load_pipeline_recipe(write(tmp_path, BASE + extra), tmp_path)
    assert expected in str(info.value)


@pytest.mark.parametrize("name", ["../../victim", "a/b", "..", ".hidden", "x y"])
def test_names_that_would_leave_the_work_dir_are_refused(tmp_path, name):
    (tmp_path / "data.jsonl").write_text("")
    text = BASE.replace("{name: s,", f"{{name: '{name}',")
    with pytest.raises(PipelineRecipeError, match=r"sources\[0\]\.name \(line 3\).*not a plain name"):
        load_pipeline_recipe(write(tmp_path, text), tmp_path)


def test_own_template_needs_a_chat_template(tmp_path, metaspace_tokenizer):
    from fusechat_merge.demo.toy import make_model

    model = make_model(tmp_path / "base-model", "llama", tokenizer=metaspace_tokenizer, seed=0)
    config = model / "tokenizer_config.json"
    import json

    raw = json.loads(config.read_text())
    raw.pop("chat_template", None)
    config.write_text(json.dumps(raw))
    (model / "chat_template.jinja").unlink(missing_ok=True)
    (tmp_path / "data.jsonl").write_text("")
    text = BASE.replace("Qwen/Qwen1.5-72B-Chat", "base-model")
    with pytest.raises(PipelineRecipeError, match=r"sources\[0\]\.template.*has no chat template"):
        load_pipeline_recipe(write(tmp_path, text), tmp_path)
    ok = text.replace("model: base-model}", "model: base-model, template: shared}")
    load_pipeline_recipe(write(tmp_path, ok), tmp_path)
