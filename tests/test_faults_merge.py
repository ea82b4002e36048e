"""Faults a new user meets with ``fusechat-merge merge`` (issue 11), one test per class.

Every test asserts the exit code, that the message names the thing at fault (key, file,
model or tensor), that no traceback is printed, and that nothing of the user's changed
(the directories are hashed before and after). Real tiny models, real mergekit.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from helpers import BIN, kill_once_a_shard_is_written, load_weights, run, sce_recipe, write_recipe
from safetensors.torch import load_file, save_file

from fusechat_merge.cli import main as cli
from fusechat_merge.merging import OUTPUT_MARKER
from fusion.artifacts.lifecycle import PARTIAL_MARKER


def tree_hash(root: Path) -> dict[str, str]:
    """{relative path: sha256 (files) or 'dir'} of everything under root."""
    out: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            out[rel] = "-> " + str(path.readlink())
        elif path.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture
def workspace(tmp_path, model_family):
    """A user's directory: models/{base,t1,t2} (t1 with the user's own notes) and a recipe."""
    models = tmp_path / "models"
    for name, src in zip(("base", "t1", "t2"), model_family["llama"][:3], strict=True):
        shutil.copytree(src, models / name)
    (models / "t1" / "NOTES.md").write_text("my fine-tune notes", encoding="utf-8")
    recipe = write_recipe(
        tmp_path / "r.yaml", sce_recipe([models / "base", models / "t1", models / "t2"], select_topk=0.5)
    )
    return tmp_path, recipe


def invoke(*args: str, cwd: Path | None = None):
    old = Path.cwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        return CliRunner().invoke(cli, ["merge", *map(str, args), "--quiet"])
    finally:
        os.chdir(old)


def assert_refused(result, *texts: str) -> None:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and "Error:" in result.output, result.output
    for text in texts:
        assert text in result.output, result.output


def no_partials(directory: Path) -> bool:
    return not [p for p in directory.rglob(".*") if ".partial-" in p.name or ".old-" in p.name]


# --- class 1: never destroy what the tool did not write -------------------------------------


@pytest.mark.parametrize(
    "target,relation",
    [("models/t1", "is the recipe's model"), ("models/t1/merged", "lies inside the recipe's model"),
     ("models", "contains the recipe's model"), (".", "contains the recipe's model")],
)
def test_a_merge_into_its_own_inputs_is_refused_before_any_work(workspace, target, relation):
    root, recipe = workspace
    before = tree_hash(root)
    result = invoke(recipe, target, cwd=root)
    assert_refused(result, relation, str(root / "models"))
    assert tree_hash(root) == before  # nothing written, nothing removed, no partial dirs


def test_a_tokenizer_source_is_an_input_too(workspace):
    root, recipe = workspace
    raw = yaml.safe_load(recipe.read_text())
    tok_src = root / "tok"
    shutil.copytree(root / "models" / "t2", tok_src)
    raw["tokenizer_source"] = str(tok_src)
    write_recipe(recipe, raw)
    before = tree_hash(root)
    assert_refused(invoke(recipe, tok_src), "is the recipe's model", str(tok_src))
    assert tree_hash(root) == before


def test_only_an_earlier_output_of_this_tool_is_replaced(workspace, model_family):
    root, recipe = workspace
    # a directory that looks like a model (config.json) but is not ours: kept
    foreign = root / "foreign"
    shutil.copytree(model_family["llama"][3], foreign)
    (foreign / "notes.txt").write_text("keep me")
    before = tree_hash(root)
    assert_refused(invoke(recipe, foreign), "holds no output of this tool", OUTPUT_MARKER)
    assert tree_hash(root) == before
    # a file where the output should go: kept (click refuses it as OUT_DIR)
    (root / "afile").write_text("data")
    result = invoke(recipe, root / "afile")
    assert result.exit_code == 2 and "is a file" in result.output
    assert (root / "afile").read_text() == "data"
    # our own output: replaced, and it carries the marker
    out = root / "merged"
    assert invoke(recipe, out).exit_code == 0
    marker = json.loads((out / OUTPUT_MARKER).read_text())
    assert marker["tool"] == "fusechat-merge" and marker["merge_method"] == "fusechat_sce"
    assert len(marker["recipe_sha256"]) == 64 and marker["version"]
    first = tree_hash(out)
    result = invoke(recipe, out)  # the same recipe and models: left as it is
    assert result.exit_code == 0 and tree_hash(out) == first, result.output
    (out / "stale.txt").write_text("from the old merge")
    result = invoke(recipe, out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert tree_hash(out) == first  # replaced as a whole, the same bytes
    assert no_partials(root)


def test_the_published_merge_gets_the_users_umask(workspace):
    root, recipe = workspace
    old = os.umask(0o027)
    try:
        result = invoke(recipe, root / "out")
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    assert (root / "out").stat().st_mode & 0o777 == 0o750
    modes = {p.name: p.stat().st_mode & 0o777 for p in (root / "out").iterdir()}
    assert set(modes.values()) == {0o640}, modes
    assert "# out" in (root / "out" / "README.md").read_text().splitlines()  # not the partial's name


def test_a_killed_merges_partial_dir_is_cleaned_and_only_ours(workspace):
    root, recipe = workspace
    # what a SIGKILLed run leaves: a marked hidden directory (a dead pid)
    stale = root / ".out.partial-dead1234"
    (stale / "out").mkdir(parents=True)
    (stale / "out" / "model-00001-of-00002.safetensors").write_bytes(b"half")
    (stale / PARTIAL_MARKER).write_text(json.dumps(
        {"tool": "fusechat-merge", "out": str(root / "out"), "pid": 2**22 + 12345, "host": "x"}))
    # a user's directory that merely looks like one: kept
    lookalike = root / ".out.partial-mine"
    lookalike.mkdir()
    (lookalike / "keep.txt").write_text("mine")
    result = invoke(recipe, root / "out")
    assert result.exit_code == 0, result.output
    assert not stale.exists()
    assert (lookalike / "keep.txt").read_text() == "mine"


# --- class 5: hub ids, from the Hugging Face cache offline ----------------------------------


def lay_out_in_hub_cache(hf_home: Path, repo_id: str, model: Path, revision: str) -> None:
    org, name = repo_id.split("/")
    repo = hf_home / "hub" / f"models--{org}--{name}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    shutil.copytree(model, repo / "snapshots" / revision)


def test_hub_ids_merge_offline_from_the_cache(workspace, tmp_path_factory):
    root, recipe = workspace
    models = root / "models"
    hf_home = tmp_path_factory.mktemp("hf-home")
    lay_out_in_hub_cache(hf_home, "fuse-org/base", models / "base", "a" * 40)
    lay_out_in_hub_cache(hf_home, "fuse-org/t1", models / "t1", "b" * 40)
    hub = {
        "merge_method": "fusechat_sce",
        "base_model": "fuse-org/base",
        "models": [{"model": "fuse-org/base"}, {"model": "fuse-org/t1"}, {"model": "models/t2"}],
        "parameters": {"select_topk": 0.5},
        "dtype": "float32",
    }
    hub_recipe = write_recipe(root / "hub.yaml", hub)
    env = dict(os.environ, HF_HOME=str(hf_home), HF_HUB_OFFLINE="1")
    cache_before, user_before = tree_hash(hf_home), tree_hash(models)

    def call(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), cwd=root, env=env, capture_output=True, text=True, timeout=600)

    ours = call(str(BIN / "fusechat-merge"), "merge", "hub.yaml", "out-hub", "--quiet")
    assert ours.returncode == 0, ours.stderr
    stock = call(str(BIN / "mergekit-yaml"), "hub.yaml", "out-stock")
    assert stock.returncode == 0, stock.stderr
    assert invoke(recipe, root / "out-local").exit_code == 0
    local = load_weights(root / "out-local")
    for out in ("out-hub", "out-stock"):
        merged = load_weights(root / out)
        assert merged.keys() == local.keys()
        assert all((merged[k] == local[k]).all() for k in local), out
    card = (root / "out-hub" / "README.md").read_text()
    assert "fuse-org/t1" in card and str(hf_home) not in card
    assert (root / "out-hub" / "mergekit_config.yml").read_text() == hub_recipe.read_text()
    # an id that is neither a local directory nor cached: named, before any work
    write_recipe(root / "missing.yaml", {**hub, "models": [*hub["models"], {"model": "fuse-org/t9"}]})
    missing = call(str(BIN / "fusechat-merge"), "merge", "missing.yaml", "out-missing", "--quiet")
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert "models[3].model:" in missing.stderr and "'fuse-org/t9'" in missing.stderr
    assert "Hugging Face cache" in missing.stderr and "huggingface.co" not in missing.stderr
    # the cache snapshot is an input: no merge into it
    snapshot = hf_home / "hub" / "models--fuse-org--t1" / "snapshots" / ("b" * 40)
    into = call(str(BIN / "fusechat-merge"), "merge", "hub.yaml", str(snapshot), "--quiet")
    assert into.returncode == 1 and "is the recipe's model fuse-org/t1" in into.stderr
    assert not (root / "out-missing").exists() and no_partials(root)
    assert tree_hash(hf_home) == cache_before and tree_hash(models) == user_before


# --- class 7: user errors end in a message, never a traceback -------------------------------


def test_a_local_model_path_that_does_not_exist_says_so(workspace):
    root, recipe = workspace
    raw = yaml.safe_load(recipe.read_text())
    raw["models"].append({"model": "models/t9"})  # relative, shaped like a hub id
    write_recipe(recipe, raw)
    before = tree_hash(root)
    result = invoke("r.yaml", "out", cwd=root)
    assert_refused(result, "models[3].model:", "models/t9", "does not exist")
    assert "huggingface.co" not in result.output
    assert tree_hash(root) == before


def test_models_whose_shapes_differ_name_the_model_and_tensor(workspace, metaspace_tokenizer):
    from fusechat_merge.demo.toy import make_model

    root, recipe = workspace
    narrow = make_model(root / "models" / "narrow", "llama", tokenizer=metaspace_tokenizer, hidden_size=32)
    raw = yaml.safe_load(recipe.read_text())
    raw["models"].append({"model": str(narrow)})
    write_recipe(recipe, raw)
    before = tree_hash(root)
    result = invoke(recipe, root / "out")
    assert_refused(result, "'lm_head.weight' of model", f"model {narrow} has shape", ", 32]", ", 64]")
    assert tree_hash(root) == before


def test_nan_in_weights_names_the_model_and_tensor(workspace):
    root, recipe = workspace
    shard = root / "models" / "t2" / "model.safetensors"
    weights = load_file(shard)
    weights["model.layers.1.mlp.down_proj.weight"][0, 3] = float("nan")
    save_file(weights, shard, metadata={"format": "pt"})
    before = tree_hash(root)
    result = invoke(recipe, root / "out")
    assert_refused(result, "'model.layers.1.mlp.down_proj.weight'", str(root / "models" / "t2"), "non-finite")
    assert tree_hash(root) == before  # the partial directory is gone too


@pytest.mark.parametrize("method", ["linear", "ties", "task_arithmetic"])
def test_mergekit_methods_do_not_publish_nan(workspace, method):
    """mergekit's own methods carry NaN into the output; the output scan refuses it before
    anything is published, naming the tensor and the input that holds the NaN."""
    root, _ = workspace
    shard = root / "models" / "t2" / "model.safetensors"
    weights = load_file(shard)
    weights["model.layers.0.self_attn.q_proj.weight"][1, 2] = float("inf")
    save_file(weights, shard, metadata={"format": "pt"})
    parameters = {"weight": 0.5, **({"density": 0.5} if method == "ties" else {})}
    models = [{"model": str(root / "models" / n), "parameters": parameters} for n in ("t1", "t2")]
    base = {} if method == "linear" else {"base_model": str(root / "models" / "base")}
    recipe = write_recipe(root / f"{method}.yaml", {"merge_method": method, **base, "models": models, "dtype": "float32"})
    before = tree_hash(root)
    result = invoke(recipe, root / "out")
    assert_refused(result, "'model.layers.0.self_attn.q_proj.weight'", "non-finite", str(root / "models" / "t2"),
                   "nothing was written")
    assert str(root / "models" / "t1") not in result.output.split("non-finite in the input")[-1]
    assert tree_hash(root) == before and not (root / "out").exists()


@pytest.mark.parametrize(
    "change,expected",
    [
        # linear merges the base model as an input: without a weight for it mergekit stops mid-merge
        (lambda r: r["models"].pop(0), "base_model: linear needs 'weight' for the base model too, which it merges as an input"),
        (lambda r: r["models"][1]["parameters"].clear(), "models[1].parameters: linear needs 'weight' for each model"),
        (lambda r: r.update(merge_method="slerp", models=r["models"][:2]), "parameters: slerp needs the parameter 't'"),
    ],
)
def test_a_missing_required_parameter_is_named_before_any_work(workspace, change, expected):
    root, _ = workspace
    raw = {"merge_method": "linear", "base_model": str(root / "models" / "base"), "dtype": "float32",
           "models": [{"model": str(root / "models" / n), "parameters": {"weight": 1.0}} for n in ("base", "t1", "t2")]}
    change(raw)
    if raw["merge_method"] == "slerp":
        for model in raw["models"]:
            model.pop("parameters")
    before = tree_hash(root)
    result = invoke(write_recipe(root / "missing.yaml", raw), root / "out")
    assert_refused(result, expected)
    assert tree_hash(root) == {**before, "missing.yaml": tree_hash(root)["missing.yaml"]}
    # a top-level value serves every model
    if raw["merge_method"] == "linear":
        raw["parameters"] = {"weight": 0.5}
        assert invoke(write_recipe(root / "missing.yaml", raw), root / "out").exit_code == 0


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_a_corrupt_safetensors_file_is_named(workspace, damage):
    root, recipe = workspace
    shard = root / "models" / "t2" / "model.safetensors"
    data = shard.read_bytes()
    shard.write_bytes({"truncated": data[: len(data) // 2], "garbage": os.urandom(3000), "empty": b""}[damage])
    before = tree_hash(root)
    result = invoke(recipe, root / "out")
    assert_refused(result, f"safetensors file {shard}")
    assert tree_hash(root) == before


def test_a_sharded_model_missing_a_shard_is_named(workspace):
    root, recipe = workspace
    t2 = root / "models" / "t2"
    names = load_file(t2 / "model.safetensors")
    index = {"metadata": {}, "weight_map": dict.fromkeys(names, "model-00002-of-00002.safetensors")}
    (t2 / "model.safetensors").rename(t2 / "model-00001-of-00002.safetensors")
    (t2 / "model.safetensors.index.json").write_text(json.dumps(index))
    before = tree_hash(root)
    assert_refused(invoke(recipe, root / "out"), "model-00002-of-00002.safetensors", "is missing")
    assert tree_hash(root) == before


def test_stock_mergekit_yaml_gets_the_same_guards(workspace):
    root, recipe = workspace
    before = tree_hash(root)
    proc = run([str(BIN / "mergekit-yaml"), str(recipe), str(root / "models" / "t1")], check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "is the recipe's model" in proc.stderr
    raw = yaml.safe_load(recipe.read_text())
    raw["models"][1]["parameters"] = {"select_topk": 0.5}
    bad = write_recipe(root / "bad.yaml", raw)
    proc = run([str(BIN / "mergekit-yaml"), str(bad), str(root / "out")], check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "models[1].parameters.select_topk" in proc.stderr
    bad.unlink()
    assert tree_hash(root) == before


# --- a SIGKILL mid-merge, then a re-run ------------------------------------------------------


def test_sigkill_mid_merge_then_rerun_gives_the_same_bytes(tmp_path, metaspace_tokenizer):
    from fusechat_merge.demo.toy import make_model

    models = tmp_path / "models"
    base = make_model(models / "base", "llama", tokenizer=metaspace_tokenizer, hidden_size=256, layers=8)
    targets = [make_model(models / f"t{i}", base=base, seed=i) for i in (1, 2)]
    recipe = write_recipe(tmp_path / "r.yaml", sce_recipe([base, *targets], select_topk=0.1))
    user_before = tree_hash(models)
    work, clean = tmp_path / "work", tmp_path / "clean"
    work.mkdir()
    clean.mkdir()

    def args(out: Path) -> list[str]:
        return [str(BIN / "fusechat-merge"), "merge", str(recipe), str(out), "--out-shard-size", "200K",
                "--quiet"]

    run(args(clean / "out"))  # the uninterrupted reference (the card is named after the dir)
    partial = kill_once_a_shard_is_written(args(work / "out"), work / "out")
    assert not (work / "out").exists()  # nothing that looks complete
    assert (partial[0] / PARTIAL_MARKER).is_file()
    run(args(work / "out"))
    assert tree_hash(work / "out") == tree_hash(clean / "out")
    assert sorted(p.name for p in work.iterdir()) == ["out", "out.log"]  # no partial leftovers; the log
    assert tree_hash(models) == user_before


@pytest.mark.parametrize("spelling", ["same", "relative", "in a slice"])
def test_a_model_listed_twice_is_refused_naming_both_yaml_lines(workspace, spelling):
    """mergekit would stop with "Duplicate merge inputs" once the models are loaded."""
    root, recipe = workspace
    t1 = str(root / "models" / "t1")
    if spelling == "in a slice":
        text = (f"merge_method: linear\ndtype: float32\nslices:\n  - sources:\n"
                f"      - model: {t1}\n        layer_range: [0, 2]\n        parameters: {{weight: 0.5}}\n"
                f"      - model: {t1}/../t1\n        layer_range: [0, 2]\n        parameters: {{weight: 0.5}}\n")
        key, lines = "slices[0].sources[1].model", "lines 5 and 8"
    else:
        second = t1 if spelling == "same" else "models/t1"
        text = (f"merge_method: linear\ndtype: float32\nmodels:\n  - model: {t1}\n    parameters: {{weight: 0.5}}\n"
                f"  - model: {root / 'models' / 't2'}\n    parameters: {{weight: 0.2}}\n"
                f"  - model: {second}\n    parameters: {{weight: 0.3}}\n")
        key, lines = "models[2].model", "lines 4 and 8"
    recipe.write_text(text, encoding="utf-8")
    before = tree_hash(root)
    for args in (("r.yaml", "out"), ("r.yaml", "out", "--check-only")):
        result = invoke(*args, cwd=root)
        assert_refused(result, f"{key}:", "is already an input of this merge", lines, "list each model once")
        assert "Duplicate merge inputs" not in result.output
    assert tree_hash(root) == before
