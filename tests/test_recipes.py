"""Every shipped recipe is valid, and runs for real once its hub models become tiny local ones."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import BIN, assert_loads_and_runs, load_weights, run, write_recipe

from fusechat_merge.cli import main as cli
from fusechat_merge.merge_recipe import check_recipe, load_recipe

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))
HUB_RECIPES = [r for r in RECIPES if r.name.startswith("fusechat-7b") and "merge_method:" in r.read_text()]


def test_the_paper_recipes_are_shipped():
    names = {r.name for r in HUB_RECIPES}
    for method in ("sce", "linear", "ta", "ties", "dare"):
        assert f"fusechat-7b-{method}.yaml" in names


@pytest.fixture(scope="module")
def five_targets(model_family, tmp_path_factory):
    """The pivot and five fine-tune-like targets, like FuseChat-7B's merge inputs."""
    from fusechat_merge.demo.toy import make_model

    pivot = model_family["mistral"][0]
    root = tmp_path_factory.mktemp("five")
    return [pivot] + [make_model(root / f"t{i}", base=pivot, seed=10 + i) for i in range(5)]


@pytest.mark.parametrize("recipe", HUB_RECIPES, ids=lambda p: p.name)
def test_hub_recipe_is_valid_and_runs_on_tiny_stand_ins(recipe, five_targets, tmp_path):
    raw, text = load_recipe(recipe)
    assert check_recipe(raw) == []
    # Replace each hub id by a tiny local model: the pivot by the base, targets in turn.
    pivot, *targets = five_targets
    hub_ids = list(dict.fromkeys(re.findall(r"(?:openchat|FuseAI)/[\w.\-]+", text)))
    local = {"openchat/openchat_3.5": pivot}
    for i, hub_id in enumerate(h for h in hub_ids if h != "openchat/openchat_3.5"):
        local[hub_id] = targets[i]
    for hub_id, path in local.items():
        text = text.replace(hub_id, str(path))
    tiny = tmp_path / recipe.name
    tiny.write_text(text, encoding="utf-8")
    result = CliRunner().invoke(cli, ["merge", str(tiny), str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert_loads_and_runs(tmp_path / "out")


def test_demo_and_tiny_recipe(tmp_path):
    result = CliRunner().invoke(cli, ["demo", "--merge-only", "--work-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert_loads_and_runs(tmp_path / "merged")
    rows = (tmp_path / "report" / "sce_report.csv").read_text().splitlines()
    assert rows[0].startswith("tensor,model,coefficient") and len(rows) > 10
    # the shipped tiny recipe, run from the work dir, reproduces the demo's merge
    recipe = Path(__file__).parent.parent / "recipes" / "tiny-sce.yaml"
    run([str(BIN / "fusechat-merge"), "merge", str(recipe), "again", "--quiet"], cwd=tmp_path)
    demo, again = load_weights(tmp_path / "merged"), load_weights(tmp_path / "again")
    assert demo.keys() == again.keys()
    assert all(torch.equal(demo[k], again[k]) for k in demo)


def test_recipe_file_errors_name_the_file(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("merge_method: [unclosed\n")
    result = CliRunner().invoke(cli, ["merge", str(broken), str(tmp_path / "o")])
    assert result.exit_code != 0 and "broken.yaml" in result.output and "<yaml>" in result.output
    result = CliRunner().invoke(cli, ["merge", str(tmp_path / "absent.yaml"), str(tmp_path / "o")])
    assert result.exit_code != 0 and "absent.yaml" in result.output
    write_recipe(tmp_path / "list.yaml", [1, 2])  # type: ignore[arg-type]
    result = CliRunner().invoke(cli, ["merge", str(tmp_path / "list.yaml"), str(tmp_path / "o")])
    assert "a recipe is a YAML mapping" in result.output
