"""Bad recipes and inputs fail clearly, naming the key, tensor or path; no fake output."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import BIN, run, sce_recipe, write_recipe
from safetensors.torch import load_file, save_file

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
    assert result.exit_code == 1 and "holds no previous merge" in result.output
    assert (out / "notes.txt").read_text() == "keep me"


def test_a_killed_merge_leaves_no_complete_looking_output(tmp_path, metaspace_tokenizer):
    from fusechat_merge.toy import make_model

    base = make_model(tmp_path / "base", "llama", tokenizer=metaspace_tokenizer, hidden_size=256, layers=8)
    targets = [make_model(tmp_path / f"t{i}", base=base, seed=i) for i in (1, 2, 3)]
    recipe = write_recipe(tmp_path / "r.yaml", sce_recipe([base, *targets], select_topk=0.1))
    out = tmp_path / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    args = [str(BIN / "fusechat-merge"), "merge", str(recipe), str(out), "--out-shard-size", "200K", "--quiet"]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    partial: list[Path] = []
    while time.monotonic() < deadline and proc.poll() is None:
        partial = [p for p in tmp_path.glob(".out.partial-*") if any(p.rglob("*.safetensors"))]
        if partial:
            break
        time.sleep(0.005)
    assert partial, "the merge finished before any shard was written; make the model bigger"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    assert all(p.name.startswith(".out.partial-") for p in partial)
    # a re-run completes and publishes the output
    run(args)
    assert (out / "config.json").exists() and list(out.glob("*.safetensors"))


def test_check_only_loads_nothing(model_family, tmp_path):
    result, out = merge(tmp_path, sce_recipe(model_family["qwen2"]), "--check-only")
    assert result.exit_code == 0 and "OK" in result.output
    assert not out.exists()


def test_every_help_text():
    for args in (["--help"], ["merge", "--help"], ["demo", "--help"]):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 0 and "Usage" in result.output


def test_cli_module_entry_point():
    proc = run([sys.executable, "-m", "fusechat_merge.cli", "--help"])
    assert "merge" in proc.stdout
