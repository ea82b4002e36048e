"""What both recipe kinds share: key names, their lines, and what a name means (the one
resolver, `fusion.names.resolve`: each rule once, and each place that used to have its own)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fusechat_merge.recipe_keys import key_path, line_map
from fusion.errors import InputNotFound
from fusion.names import CACHED, HUB, LOCAL, MISSING, looks_like_hub_id, model_problem, resolve


def test_key_path_and_lines():
    assert key_path(("merges", 2, "method")) == "merges[2].method" and key_path(()) == ""
    lines = line_map("a: 1\nmerges:\n  - name: x\n    method: y\n")
    assert lines[("merges", 0, "method")] == 4 and lines[("a",)] == 1


@pytest.mark.parametrize(("name", "hub"), [
    ("openchat/openchat_3.5", True), ("FuseAI/OpenChat-3.5-7B-Qwen-v2.0", True), ("./models/x", False),
    ("/abs/path", False), ("models", False), ("data/train.jsonl", False), ("a/b/c", False), ("~/m", False),
])
def test_hub_ids(name, hub):
    assert looks_like_hub_id(name) is hub


# --- what a name means: the one resolver (fusion.names.resolve), each rule once -------------


def _model(folder: Path, weights: bool = True) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "llama"}', encoding="utf-8")
    if weights:
        (folder / "model.safetensors").write_bytes(b"")
    return folder


def _in_hub_cache(cache: Path, kind: str, repo_id: str, files: dict[str, str]) -> Path:
    """Lay files out as the Hugging Face hub cache keeps ``repo_id`` (``kind``: models, datasets)."""
    repo = cache / f"{kind}--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    for name, text in files.items():
        (snapshot / name).write_text(text, encoding="utf-8")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    return snapshot


def test_resolve_a_local_path_relative_to_the_base(tmp_path):
    model = _model(tmp_path / "models" / "m")
    found = resolve("models/m", tmp_path)
    assert (found.kind, found.path, found.for_loader, found.problem()) == (LOCAL, model, str(model), None)
    assert resolve("models/m@main+lora", tmp_path).revision == "main"


def test_resolve_a_cached_hub_id_gives_its_snapshot(tmp_path):
    snapshot = _in_hub_cache(tmp_path / "hub", "models", "org/m", {"config.json": "{}"})
    found = resolve("org/m", tmp_path, cache_dir=str(tmp_path / "hub"))
    assert (found.kind, found.path, found.for_loader, found.problem()) == (CACHED, snapshot, str(snapshot), None)
    data = _in_hub_cache(tmp_path / "hub", "datasets", "org/chats", {"train.jsonl": "{}\n"})
    found = resolve("org/chats", tmp_path, what="dataset", cache_dir=str(tmp_path / "hub"))
    assert (found.kind, found.path, found.for_loader) == (CACHED, data, "org/chats")  # datasets reads its cache


def test_resolve_a_hub_id_to_fetch_is_refused_only_when_the_hub_cannot_answer(tmp_path):
    found = resolve("org/not-cached", tmp_path, cache_dir=str(tmp_path / "hub"))
    assert (found.kind, found.path, found.for_loader) == (HUB, None, "org/not-cached")
    assert "'org/not-cached' is not in the Hugging Face cache" in found.problem() and "HF_HUB_OFFLINE" in found.problem()
    data = resolve("org/chats", tmp_path, what="dataset", cache_dir=str(tmp_path / "hub"))
    assert data.kind == HUB and "the hub dataset 'org/chats'" in data.problem()


@pytest.mark.parametrize(("name", "what"), [
    ("./m", "model"), ("m", "model"), ("a/b/c", "model"), ("org/m.jsonl", "dataset"), ("chats", "dataset"),
    ("models/t9", "model"),  # `models` is a local folder: a path, not the hub id models/t9
])
def test_resolve_anything_else_is_a_missing_path(tmp_path, name, what):
    (tmp_path / "models").mkdir()
    found = resolve(name, tmp_path, what=what)
    assert found.kind == MISSING and found.path == tmp_path / name.removeprefix("./")
    assert found.problem().startswith(f"{what} path {tmp_path / name.removeprefix('./')} does not exist")
    assert ("org/name" in found.problem()) is (name == "chats")


def test_model_problem_the_one_no_config_json_check(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "empty").mkdir()
    assert model_problem(tmp_path / "file") == "is a file, not a model directory"
    assert model_problem(tmp_path / "empty") == "holds no config.json: not a model directory"
    assert "no weights" in model_problem(_model(tmp_path / "nw", weights=False))
    assert model_problem(tmp_path / "nw", weights=False) is None and model_problem(_model(tmp_path / "ok")) is None


# --- each former rule's call site goes through it ---------------------------------------------


def test_the_data_loader_takes_hub_ids_and_names_a_missing_path(tmp_path, monkeypatch):
    from fusion.data.conversations import data_files, load_conversations

    monkeypatch.chdir(tmp_path)
    assert data_files("org/chats") is None  # a hub dataset: `datasets` loads it
    with pytest.raises(FileNotFoundError, match="conversation file not found: chats .a hub dataset is named"):
        load_conversations("chats")
    with pytest.raises(InputNotFound, match="conversation file not found: data/x.jsonl$"):
        data_files("data/x.jsonl")


def test_the_work_dir_layout_resolves_models_and_data(tmp_path):
    from fusechat_merge.pipeline.layout import WorkDir

    layout = WorkDir(tmp_path)
    (tmp_path / "chats.jsonl").write_text("{}\n")
    assert layout.data("chats.jsonl") == str(tmp_path / "chats.jsonl") and layout.data("org/chats") == "org/chats"
    assert layout.model("org/m") == "org/m" and layout.model("m") == str(tmp_path / "m")


def test_the_pipeline_recipe_check_takes_a_hub_dataset_and_names_a_missing_one(tmp_path):
    from fusechat_merge.pipeline_recipe import PipelineRecipeError, load_pipeline_recipe

    def check(train: str) -> str:
        recipe = tmp_path / "p.yaml"
        recipe.write_text(yaml.safe_dump({"name": "n", "pivot": {"name": "p", "model": "org/pivot"},
                                          "sources": [{"name": "s", "model": "org/source"}],
                                          "data": {"train": train}}), encoding="utf-8")
        try:
            load_pipeline_recipe(recipe, tmp_path)
        except PipelineRecipeError as err:
            return str(err)
        return ""

    assert "data.train" not in check("org/chats")  # hub ids: models and data
    message = check("chats")
    assert "data.train (line" in message and f"dataset path {tmp_path / 'chats'} does not exist" in message


def test_the_merge_recipe_check_goes_through_the_resolver(tmp_path, monkeypatch):
    from fusechat_merge.merge_recipe import check_recipe

    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_text("x")
    raw = {"merge_method": "linear", "models": [{"model": "file", "parameters": {"weight": 1.0}},
                                                  {"model": "org/m", "parameters": {"weight": 1.0}}]}
    problems = {p.key: p.message for p in check_recipe(raw, need_models=True)}
    assert problems["models[0].model"] == f"model path {tmp_path / 'file'} is a file, not a model directory"
    assert "'org/m' is not in the Hugging Face cache" in problems["models[1].model"]
