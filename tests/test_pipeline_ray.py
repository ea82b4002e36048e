"""`run --executor ray` on a real local Ray instance: the same artifacts as the local
executor, independent stages at once, a failed stage fails the run by its id while the
others finish, and the rerun after the fix skips what finished."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from corpus import conversations, write_jsonl
from helpers import assert_close_weights, assert_same_columns

from fusechat_merge.cli import main
from fusechat_merge.pipeline import run_pipeline
from fusechat_merge.pipeline_recipe import load_pipeline_recipe

pytest.importorskip("ray", reason="the Ray executor needs the ray extra (pip install 'fusechat-merge[ray]')")

SOURCES = ("qwen", "mistral")
RECIPE = {
    "name": "tiny-ray",
    "pivot": {"name": "pivot", "model": "models/pivot"},
    "sources": [{"name": name, "model": f"models/{name}"} for name in SOURCES],
    "data": {"train": "data/train.jsonl"},
    "logits": {"top_k": 5, "max_length": 96, "batch_size": 8},
    "fuse": {"defaults": {"max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 1e-3}},
    "merges": [{"name": "sce", "method": "fusechat_sce", "parameters": {"select_topk": 0.5}}],
    # three logits stages fit at once on two CPUs
    "resources": {"logits": {"num_cpus": 0.5}, "align": {"num_cpus": 1}, "fuse": {"num_cpus": 1}},
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, metaspace_tokenizer, bytelevel_tokenizer) -> Path:
    from fusechat_merge.demo.toy import make_model

    root = tmp_path_factory.mktemp("ray-inputs")
    make_model(root / "models" / "pivot", "llama", tokenizer=metaspace_tokenizer, seed=1)
    make_model(root / "models" / "qwen", "qwen2", tokenizer=bytelevel_tokenizer, seed=2)
    make_model(root / "models" / "mistral", "mistral", tokenizer=metaspace_tokenizer, seed=3)
    (root / "data").mkdir()
    write_jsonl(root / "data" / "train.jsonl", conversations(12))
    (root / "recipe.yaml").write_text(yaml.safe_dump(RECIPE, sort_keys=False))
    return root


def work_dir(inputs: Path, path: Path) -> Path:
    shutil.copytree(inputs, path)
    return path


def run(work: Path, **kw) -> dict[str, str]:
    stages = run_pipeline(load_pipeline_recipe(work / "recipe.yaml", work), work, log=lambda _: None, **kw)
    return {s.id: s.status for s in stages}


def record(work: Path, stage_id: str) -> dict:
    return json.loads((work / "stages" / (stage_id.replace("/", "__") + ".done.json")).read_text())


# what a store records of its upstream stores: fingerprints of their manifests, which hold paths
UPSTREAM_FINGERPRINTS = ("pivot_store", "source_store", "sha256")


def store_files(store: Path) -> dict[str, bytes]:
    """A store's files but its shards (compare those with `helpers.assert_same_columns`),
    byte for byte, but for the paths in run.json and manifest.json (the other work dir's),
    the fingerprints of upstream manifests that hold those paths, and the shards' sha256
    (a Ray task runs with its own thread count: floats may differ in the last bit)."""
    files = {p.relative_to(store).as_posix(): p.read_bytes() for p in sorted(store.rglob("*"))
             if p.is_file() and p.name != "scoring.json"  # timings: a measurement, not content
             and p.suffix != ".arrow"}
    assert files
    for name in ("run.json", "manifest.json"):
        if name in files:
            files[name] = json.dumps(_without_paths(json.loads(files[name]), store.parents[1]), sort_keys=True).encode()
    return files


def _without_paths(value, root: Path):
    if isinstance(value, dict):
        return {k: _without_paths(v, root) for k, v in value.items() if k not in UPSTREAM_FINGERPRINTS}
    if isinstance(value, list):
        return [_without_paths(v, root) for v in value]
    return value.replace(str(root), "WORK") if isinstance(value, str) else value


@pytest.mark.slow
def test_ray_executor_makes_the_local_executors_artifacts_at_once(inputs, tmp_path):
    local, on_ray = work_dir(inputs, tmp_path / "local"), work_dir(inputs, tmp_path / "ray")
    assert all(v == "ran" for v in run(local).values())
    statuses = run(on_ray, executor="ray")
    assert all(v == "ran" for v in statuses.values()), statuses

    for name in ("pivot", *SOURCES):
        assert store_files(local / "logits" / name) == store_files(on_ray / "logits" / name), name
        assert_same_columns(local / "logits" / name, on_ray / "logits" / name)
    for name in SOURCES:
        assert store_files(local / "aligned" / name) == store_files(on_ray / "aligned" / name), name
        assert_same_columns(local / "aligned" / name, on_ray / "aligned" / name)
        assert_close_weights(local / "targets" / "seed-0" / name, on_ray / "targets" / "seed-0" / name)
    assert_close_weights(local / "merges" / "seed-0" / "sce", on_ray / "merges" / "seed-0" / "sce")

    records = {s: record(on_ray, s) for s in statuses}
    assert {r["executor"] for r in records.values()} == {"ray"}
    assert {r["executor"] for r in (record(local, s) for s in statuses)} == {"local"}
    for r in records.values():
        assert r["started_at"] < r["finished_at"] and r["peak_rss_mb"] > 0 and r["host"]
    assert records["fuse/seed-0/qwen"]["world_size"] == 1
    a, b = (records[f"logits/{s}"] for s in SOURCES)
    assert max(a["started_at"], b["started_at"]) < min(a["finished_at"], b["finished_at"]), (a, b)
    assert len({records[f"logits/{s}"]["pid"] for s in ("pivot", *SOURCES)}) == 3  # at once: 3 workers
    # a stage waits for its upstream stages
    for stage_id, r in records.items():
        upstream = {"align/qwen": ["logits/pivot", "logits/qwen"], "fuse/seed-0/qwen": ["align/qwen"],
                    "merge/seed-0/sce": ["fuse/seed-0/qwen", "fuse/seed-0/mistral"]}.get(stage_id, [])
        assert all(records[u]["finished_at"] <= r["started_at"] for u in upstream), stage_id
    assert all(v.startswith("skipped") for v in run(on_ray, executor="ray").values())


@pytest.mark.slow
def test_a_failed_stage_fails_the_run_by_id_while_independent_stages_finish(inputs, tmp_path):
    work = work_dir(inputs, tmp_path / "broken")
    config = work / "models" / "mistral" / "config.json"
    good = config.read_text()
    config.write_text("{not json")
    result = CliRunner().invoke(main, ["run", str(work / "recipe.yaml"), "--work-dir", str(work), "--executor", "ray"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert "Error: stage logits/mistral failed" in result.output
    # its own error (a broken config), not a lost worker: not retried
    assert result.output.count("[logits/mistral] submitted") == 1 and "attempt" not in result.output
    assert "[logits/mistral] submitted num_cpus" in result.output  # a first run states no reason
    assert "not run yet" not in result.output and "submitted (" not in result.output
    assert "not run (an upstream stage failed): align/mistral, fuse/seed-0/mistral, merge/seed-0/sce" in result.output
    finished = ["logits/pivot", "logits/qwen", "align/qwen", "fuse/seed-0/qwen"]
    before = {s: record(work, s) for s in finished}  # the independent stages finished
    assert (work / "stages" / "logits__mistral.started.json").exists()
    assert not (work / "stages" / "merge__seed-0__sce.done.json").exists()

    config.write_text(good)
    statuses = run(work, executor="ray")
    assert {s for s, v in statuses.items() if v == "ran"} == {
        "logits/mistral", "align/mistral", "fuse/seed-0/mistral", "merge/seed-0/sce"}
    assert all(record(work, s) == before[s] for s in finished)


@pytest.mark.slow
def test_ray_runs_a_models_parts_at_once_and_combines_them_as_the_local_run(inputs, tmp_path):
    recipe = json.loads(json.dumps(RECIPE))
    recipe["logits"].update(batch_size=1, parts=2)  # one sequence per pass: exact across batchings
    recipe["sources"] = recipe["sources"][:1]
    local, on_ray = work_dir(inputs, tmp_path / "local"), work_dir(inputs, tmp_path / "ray")
    for work in (local, on_ray):
        (work / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    run(local)
    statuses = run(on_ray, executor="ray")
    assert all(v == "ran" for v in statuses.values()), statuses
    for name in ("pivot", "qwen"):
        assert_same_columns(local / "logits" / name, on_ray / "logits" / name)
    assert_close_weights(local / "merges" / "seed-0" / "sce", on_ray / "merges" / "seed-0" / "sce")
    a, b = (record(on_ray, f"logits/pivot/part-{i}") for i in range(2))
    assert max(a["started_at"], b["started_at"]) < min(a["finished_at"], b["finished_at"]), (a, b)
    combined = record(on_ray, "logits/pivot")
    assert combined["started_at"] >= max(a["finished_at"], b["finished_at"])
