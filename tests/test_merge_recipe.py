"""The pre-flight check of a mergekit recipe: every problem named by its YAML key, nothing loaded."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import BIN, run, sce_recipe, write_recipe

from fusechat_merge.cli import main as cli


def merge(tmp_path: Path, recipe: dict, *extra: str):
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["merge", str(path), str(out), "--quiet", *extra])
    return result, out


@pytest.mark.parametrize(
    "change,key,text",
    [
        ({"parameters": {"select_topk": 0.1, "weight": 1.0}}, "parameters.weight", "no parameter 'weight'"),
        ({"parameters": {"select_topk": 0}}, "parameters.select_topk", "must be in (0, 1]"),
        ({"parameters": {"select_topk": 1.5}}, "parameters.select_topk", "got 1.5"),
        ({"parameters": {"select_scope": "mask"}}, "parameters.select_scope", "'weights' or 'deltas'"),
        ({"merge_method": "fusechat_sec"}, "merge_method", "did you mean 'fusechat_sce'"),
        ({"dtyp": "float32"}, "dtyp", "unknown key"),
    ],
)
def test_recipe_errors_name_the_key(model_family, tmp_path, change, key, text):
    result, out = merge(tmp_path, {**sce_recipe(model_family["llama"]), **change})
    assert result.exit_code != 0
    assert f"{key}:" in result.output and text in result.output, result.output
    assert not out.exists()


def test_shared_parameter_under_one_model_is_an_error_not_silence(model_family, tmp_path):
    recipe = sce_recipe(model_family["llama"])
    recipe["models"][1]["parameters"] = {"select_topk": 0.5}
    result, out = merge(tmp_path, recipe)
    assert "models[1].parameters.select_topk:" in result.output
    assert "Move it to the top-level" in result.output
    # stock mergekit-yaml, through the import hook, refuses it too
    path = write_recipe(tmp_path / "stock.yaml", recipe)
    proc = run([str(BIN / "mergekit-yaml"), str(path), str(tmp_path / "stock")], check=False)
    assert proc.returncode != 0 and "models[1].parameters.select_topk" in proc.stderr
    assert not (tmp_path / "stock").exists()


def test_missing_model_path(model_family, tmp_path):
    models = [*model_family["llama"][:2], tmp_path / "nowhere"]
    result, out = merge(tmp_path, sce_recipe(models))
    assert "models[2].model:" in result.output and "does not exist" in result.output
    assert not out.exists()


def test_check_only_loads_nothing(model_family, tmp_path):
    result, out = merge(tmp_path, sce_recipe(model_family["qwen2"]), "--check-only")
    assert result.exit_code == 0 and "OK" in result.output
    assert not out.exists()


def test_merge_checks_the_recipe_once(model_family, tmp_path, monkeypatch):
    """The check reads every model's config and looks hub ids up: `merge` pays it once."""
    import fusechat_merge.merge_recipe as merge_recipe

    calls = []
    check = merge_recipe.check_recipe
    monkeypatch.setattr(merge_recipe, "check_recipe", lambda *a, **kw: calls.append(a) or check(*a, **kw))
    result, out = merge(tmp_path, sce_recipe(model_family["qwen2"]))
    assert result.exit_code == 0, result.output
    assert len(calls) == 1 and (out / "config.json").is_file()
