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
