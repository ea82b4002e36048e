"""The whole run on tiny models: end to end, skipping, redoing on change, resuming a kill."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from corpus import conversations, write_jsonl
from helpers import BIN, killed_once

from fusechat_merge.pipeline import run_pipeline
from fusechat_merge.pipeline_recipe import load_pipeline_recipe

RECIPE = {
    "name": "tiny",
    "seeds": [0],
    "pivot": {"name": "pivot", "model": "models/pivot"},
    "sources": [{"name": "qwen", "model": "models/qwen"}],
    "data": {"train": "data/train.jsonl"},
    "logits": {"top_k": 5, "max_length": 96, "batch_size": 8},
    "fuse": {"defaults": {"max_steps": 3, "per_device_train_batch_size": 4, "learning_rate": 1e-3}},
    "merges": [
        {"name": "sce", "method": "fusechat_sce", "parameters": {"select_topk": 0.5}},
        {"name": "linear", "method": "linear", "base": False, "model_parameters": {"weight": 1.0}},
    ],
    "evaluate": {"skills": {"chat": "data/held.jsonl"}, "max_length": 96},
}


@pytest.fixture
def work(tmp_path, metaspace_tokenizer, bytelevel_tokenizer) -> Path:
    from fusechat_merge.demo.toy import make_model

    make_model(tmp_path / "models" / "pivot", "llama", tokenizer=metaspace_tokenizer, seed=1)
    make_model(tmp_path / "models" / "qwen", "qwen2", tokenizer=bytelevel_tokenizer, seed=2)
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "train.jsonl", conversations(12))
    write_jsonl(tmp_path / "data" / "held.jsonl", conversations(3))
    write_recipe(tmp_path, RECIPE)
    return tmp_path


def write_recipe(work: Path, recipe: dict) -> Path:
    path = work / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def run(work: Path, **kw) -> dict[str, str]:
    stages = run_pipeline(load_pipeline_recipe(work / "recipe.yaml", work), work, log=lambda _: None, **kw)
    return {s.id: s.status for s in stages}


def test_end_to_end_then_skip_then_redo_what_changed(work):
    first = run(work)
    assert all(status == "ran" for status in first.values()), first
    report = json.loads((work / "report" / "results.json").read_text())
    models = {r["model"] for r in report["results"]}
    assert models == {"pivot", "qwen", "target:qwen", "merge:sce", "merge:linear"}
    assert (work / "report" / "results.png").exists() and (work / "report" / "results.md").exists()
    assert (work / "merges" / "seed-0" / "sce-report" / "sce_coefficients.png").exists()
    assert (work / "targets" / "seed-0" / "qwen" / "config.json").exists()
    times = json.loads((work / "report" / "stage_times.json").read_text())
    assert {t["stage"] for t in times} == set(first)

    again = run(work)
    assert all(status.startswith("skipped") for status in again.values()), again

    changed = json.loads(json.dumps(RECIPE))
    changed["fuse"]["defaults"]["max_steps"] = 4
    write_recipe(work, changed)
    third = run(work)
    redone = {k for k, v in third.items() if v == "ran"}
    assert redone == {"fuse/seed-0/qwen", "merge/seed-0/sce", "merge/seed-0/linear",
                      "evaluate/seed-0", "evaluate/report"}


def test_dry_run_only_and_from(work):
    plan = run(work, dry_run=True)
    assert plan["logits/pivot"] == "would run (not run yet)"
    assert not (work / "logits").exists() and not (work / "report").exists()
    with pytest.raises(RuntimeError, match="--only merge: stage logits/pivot is not done"):
        run(work, only="merge")
    run(work)
    assert all(v.startswith("skipped") for v in run(work, only="merge").values())
    statuses = run(work, from_stage="merge")
    assert statuses["merge/seed-0/sce"] == "ran" and statuses["logits/pivot"].startswith("skipped")


def test_a_killed_run_resumes(work):
    args = [str(BIN / "fusechat-merge"), "run", str(work / "recipe.yaml"), "--work-dir", str(work)]
    marker = work / "stages" / "fuse__seed-0__qwen.started.json"
    assert killed_once(args, marker.exists, timeout=300), "the run ended before the fuse stage started"
    assert not (work / "report" / "results.json").exists()
    logits_record = (work / "stages" / "logits__pivot.done.json").read_bytes()
    done = subprocess.run(args, env=dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    statuses = {t["stage"]: t["status"] for t in json.loads((work / "report" / "stage_times.json").read_text())}
    assert statuses["logits/pivot"].startswith("skipped") and statuses["fuse/seed-0/qwen"] == "ran"
    assert (work / "stages" / "logits__pivot.done.json").read_bytes() == logits_record  # not redone
    assert not marker.exists() and (work / "stages" / "fuse__seed-0__qwen.done.json").exists()
    assert (work / "report" / "results.json").exists()


def test_cli_reports_bad_recipe_before_any_work(work):
    bad = json.loads(json.dumps(RECIPE))
    bad["sources"][0]["model"] = "models/missing"
    write_recipe(work, bad)
    proc = subprocess.run([str(BIN / "fusechat-merge"), "run", str(work / "recipe.yaml"), "--work-dir", str(work)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "sources[0].model (line" in proc.stderr
    assert not (work / "stages").exists()


def test_hub_ids_run_offline_from_the_hugging_face_cache(work, tmp_path_factory):
    from helpers import lay_out_in_hub_cache

    hf_home = tmp_path_factory.mktemp("hf-home")
    lay_out_in_hub_cache(hf_home, "toy-org/pivot", work / "models" / "pivot")
    lay_out_in_hub_cache(hf_home, "toy-org/qwen", work / "models" / "qwen")
    hub = json.loads(json.dumps(RECIPE))
    hub["pivot"]["model"], hub["sources"][0]["model"] = "toy-org/pivot", "toy-org/qwen"
    hub["merges"] = hub["merges"][:1]
    hub.pop("evaluate")
    run_dir = tmp_path_factory.mktemp("hub-run")
    (run_dir / "data").mkdir()
    (run_dir / "data" / "train.jsonl").write_bytes((work / "data" / "train.jsonl").read_bytes())
    write_recipe(run_dir, hub)
    env = dict(os.environ, HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    done = subprocess.run([str(BIN / "fusechat-merge"), "run", str(run_dir / "recipe.yaml"), "--work-dir",
                           str(run_dir)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (run_dir / "toy-org").exists()  # never taken as a path under the work dir
    assert (run_dir / "merges" / "seed-0" / "sce" / "config.json").exists()
    store = json.loads((run_dir / "logits" / "pivot" / "manifest.json").read_text())
    assert "models--toy-org--pivot" in store["options"]["model"]


def test_lm_eval_tasks_score_every_model_once(work):
    from fusion.evaluate.lm_eval_tasks import write_skill_tasks

    tasks = write_skill_tasks({"chat": work / "data" / "held.jsonl"}, work / "data" / "lm_eval", max_gen_toks=4)
    recipe = json.loads(json.dumps(RECIPE))
    recipe["evaluate"] = {"skills": {}, "lm_eval": {"tasks": [tasks.tag], "include_path": "data/lm_eval",
                                                    "apply_chat_template": True, "bootstrap_iters": 0}}
    write_recipe(work, recipe)
    first = run(work)
    lm_eval_stages = {k for k in first if k.startswith("evaluate/lm-eval/")}
    assert len(lm_eval_stages) == 5 and all(first[k] == "ran" for k in lm_eval_stages)  # 2 base + target + 2 merges
    results = json.loads((work / "report" / "results.json").read_text())["results"]
    scored = {(r["model"], r["skill"]) for r in results if r.get("metric")}
    for model in ("pivot", "qwen", "target:qwen", "merge:sce", "merge:linear"):
        assert (model, "fusechat_chat_gen/exact_match") in scored, model
        assert (model, "fusechat_chat_ll/perplexity") in scored, model
    assert "fusechat_chat_gen/exact_match" in (work / "report" / "results.md").read_text()
    stamps = {p: p.stat().st_mtime_ns for p in (work / "eval" / "lm-eval").rglob("*.json")}
    changed = json.loads(json.dumps(recipe))
    changed["merges"] = changed["merges"][:1]  # only the report changes: nothing is scored again
    write_recipe(work, changed)
    again = run(work)
    assert all(v.startswith("skipped") for k, v in again.items() if k.startswith("evaluate/lm-eval/")), again
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items() if p.exists())


def test_baselines_are_stages_trained_and_reported_like_targets(work, metaspace_tokenizer):
    from fusechat_merge.demo.toy import make_model
    from fusechat_merge.pipeline import plan_stages
    from fusechat_merge.pipeline.layout import WorkDir

    make_model(work / "models" / "other", "llama", tokenizer=metaspace_tokenizer, seed=3)
    recipe = json.loads(json.dumps(RECIPE))
    recipe["sources"].append({"name": "other", "model": "models/other"})
    recipe["merges"] = recipe["merges"][1:]
    recipe["fuse"]["baselines"] = {"sft": True, "multi": True}
    recipe["evaluate"]["source_skills"] = {"qwen": "chat"}
    write_recipe(work, recipe)
    plan = {s.id: s for s in plan_stages(load_pipeline_recipe(work / "recipe.yaml", work), WorkDir(work))}
    sft, multi = plan["baseline/seed-0/sft"], plan["baseline/seed-0/multi"]
    assert sft.kind == multi.kind == "fuse"
    assert sft.job.settings["lm_weight"] == 1.0 and sft.after == ["align/qwen"]
    assert "lm_weight" not in multi.job.settings and multi.after == ["align/qwen", "align/other"]
    assert len(multi.job.aligned) == 2 and {"baseline/seed-0/sft", "baseline/seed-0/multi"} <= set(
        plan["evaluate/seed-0"].after)
    statuses = run(work)
    assert statuses["baseline/seed-0/sft"] == statuses["baseline/seed-0/multi"] == "ran"
    results = json.loads((work / "report" / "results.json").read_text())["results"]
    kinds = {r["model"]: r["kind"] for r in results}
    assert kinds["sft"] == "sft" and kinds["multi"] == "multi" and kinds["target:other"] == "target"
    report = json.loads((work / "report" / "results.json").read_text())
    fusion = {(e["model"], e["skill"]): e for e in report["effects"]["fusion"]}
    assert set(fusion) == {("target:qwen", "chat"), ("multi", "chat")}
    assert fusion["target:qwen", "chat"]["loss"]["mean"] is not None
    assert [(e["model"], e["skill"]) for e in report["effects"]["merge"]] == [("merge:linear", "chat"),
                                                                              ("merge:linear", "mean")]
    diagnostics = report["diagnostics"]
    assert set(diagnostics["update"]) == {"target:qwen", "target:other", "sft", "multi"}
    assert all(u["mean"] > 0 for u in diagnostics["update"].values())
    assert diagnostics["loss"]["sft"][0]["fuse_share"] == 0.0
    assert 0 < diagnostics["loss"]["multi"][0]["fuse_share"] < 1
    assert diagnostics["loss"]["sft"][0]["fuse_grad_share"] == 0.0
    assert 0 < diagnostics["loss"]["multi"][0]["fuse_grad_share"] < 1
    assert -1 <= diagnostics["loss"]["target:qwen"][0]["grad_cosine"] <= 1
    assert diagnostics["mince"]["qwen"]["all"]["sequences"] == 12
    assert diagnostics["alignment"]["qwen"]["aligned_fraction"] > 0
    # the rule shares per skill add up, and over all sequences they are the manifest's
    shares = diagnostics["mince"]["qwen"]["all"]["rules"]
    assert sum(shares.values()) == pytest.approx(1.0)
    assert shares == pytest.approx({k: diagnostics["alignment"]["qwen"]["rules"][k] for k in shares})
    picks = diagnostics["mince"]["qwen"]["all"]
    assert picks["gold_mass"] is None if picks["source_picked"] == 0 else 0 <= picks["gold_mass"] <= 1
    markdown = (work / "report" / "results.md").read_text()
    assert "Fusion effect" in markdown and "Relative update" in markdown
    # the transfer measure: every model that reads the pivot's tokens, against every source,
    # from the held-out file's own stores (scored and aligned as stages), not the corpus's
    assert {"align/eval-chat/qwen", "align/eval-chat/other"} <= set(
        plan["evaluate/seed-0"].after)
    assert plan["align/eval-chat/qwen"].after == ["logits/eval-chat/pivot", "logits/eval-chat/qwen", "align/qwen"]
    transfer = {(r["model"], r["source"]): r for r in results if r.get("transfer")}
    assert set(transfer) == {(m, s) for m in ("pivot", "target:qwen", "target:other", "sft", "multi", "merge:linear")
                             for s in ("qwen", "other")}
    assert all(r["kl_mean"] > 0 and 0 <= r["cover_mean"] <= 1 and r["positions"] > 0 for r in transfer.values())
    held = json.loads((work / "eval-aligned" / "chat" / "qwen" / "manifest.json").read_text())
    assert held["sequences"] == 3  # the held-out file, not the corpus
    assert held["alignment"]["vocab_map"]["file"].endswith("aligned/qwen/vocab_map.json")  # training's map
    assert fusion["target:qwen", "chat"]["kl"]["mean"] == pytest.approx(
        transfer["target:qwen", "qwen"]["kl_mean"] - transfer["sft", "qwen"]["kl_mean"])
    assert "## Transfer to the sources" in markdown and "chat ← qwen KL" in markdown

    recipe["sources"][1]["name"] = "sft"
    write_recipe(work, recipe)
    with pytest.raises(ValueError, match="fuse.baselines.sft"):
        load_pipeline_recipe(work / "recipe.yaml", work)



VOLATILE_FILES = ("logs/", "report/stage_times.json")
"""What a run writes that is its own log or timing table: not compared."""
VOLATILE_KEYS = {"pid", "started_at", "finished_at", "ended_at", "seconds", "peak_rss_mb", "tokens_per_s"}
"""Keys of a record that say when, where and how fast it ran."""


def _steady(value):
    """``value`` (JSON data) without `VOLATILE_KEYS`; key order kept, so it is compared too."""
    if isinstance(value, dict):
        return [(k, _steady(v)) for k, v in value.items() if k not in VOLATILE_KEYS]
    if isinstance(value, list):
        return [_steady(v) for v in value]
    return value


def test_the_whole_run_writes_the_same_bytes_whatever_the_hash_seed(work):
    """Python salts ``str`` hashes per process, so a set iterated into a record (a model
    card, a report) orders it differently run to run, and an output resumed by another
    process differs from an uninterrupted one. Two runs, two seeds, threads pinned: the
    same bytes, the same records but for when and how fast each stage ran."""
    import shutil

    inputs = {"models", "data", "recipe.yaml"}
    snapshots = []
    for seed in ("1", "2"):
        for path in work.iterdir():
            if path.name not in inputs:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONHASHSEED=seed,
                   OMP_NUM_THREADS="1")
        done = subprocess.run([str(BIN / "fusechat-merge"), "run", str(work / "recipe.yaml"), "--work-dir", str(work)],
                              env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        snapshots.append({
            str(p.relative_to(work)): _steady(json.loads(p.read_text())) if p.suffix == ".json" else p.read_bytes()
            for p in sorted(work.rglob("*")) if p.is_file() and p.relative_to(work).parts[0] not in inputs
            and not str(p.relative_to(work)).startswith(VOLATILE_FILES)})
    first, second = snapshots
    assert sorted(first) == sorted(second)
    assert [name for name in first if first[name] != second[name]] == []
