"""The checked, atomic merge: an interrupted or refused merge leaves no output that looks complete."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner
from helpers import BIN, kill_once_a_shard_is_written, run, sce_recipe, write_recipe
from safetensors.torch import load_file, save_file

from fusechat_merge.cli import main as cli


def merge(tmp_path: Path, recipe: dict, *extra: str):
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["merge", str(path), str(out), "--quiet", *extra])
    return result, out


def test_nan_in_an_input_names_the_tensor_and_model(model_family, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(model_family["llama"][2], broken)
    (shard,) = broken.glob("*.safetensors")
    weights = load_file(shard)
    name = "model.layers.1.mlp.down_proj.weight"
    weights[name][0, 3] = float("nan")
    save_file(weights, shard, metadata={"format": "pt"})
    result, out = merge(tmp_path, sce_recipe([*model_family["llama"][:2], broken]))
    assert result.exit_code == 1 and "Traceback" not in result.output
    message = result.output
    assert name in message and "broken" in message and "non-finite" in message
    assert not out.exists()
    assert not list(tmp_path.glob(".out.partial-*"))


def test_existing_unrelated_directory_is_not_replaced(model_family, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    result, _ = merge(tmp_path, sce_recipe(model_family["llama"]))
    assert result.exit_code == 1 and "holds no output of this tool" in result.output
    assert (out / "notes.txt").read_text() == "keep me"


def test_a_killed_merge_leaves_no_complete_looking_output(tmp_path, metaspace_tokenizer):
    from fusechat_merge.demo.toy import make_model

    base = make_model(tmp_path / "base", "llama", tokenizer=metaspace_tokenizer, hidden_size=256, layers=8)
    targets = [make_model(tmp_path / f"t{i}", base=base, seed=i) for i in (1, 2, 3)]
    recipe = write_recipe(tmp_path / "r.yaml", sce_recipe([base, *targets], select_topk=0.1))
    out = tmp_path / "out"
    args = [str(BIN / "fusechat-merge"), "merge", str(recipe), str(out), "--out-shard-size", "200K", "--quiet"]
    partial = kill_once_a_shard_is_written(args, out, timeout=120)
    assert not out.exists()
    assert all(p.name.startswith(".out.partial-") for p in partial)
    # a re-run completes and publishes the output
    run(args)
    assert (out / "config.json").exists() and list(out.glob("*.safetensors"))
