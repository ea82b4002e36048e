"""The paper's run, rehearsed: recipes/fusechat-7b.yaml with its six models replaced by
stand-ins of the same architecture class and tokenizer family (tests/standins.py), under
the recipe's own hub ids in a temporary Hugging Face cache, scaled down (sizes, steps, the
corpus), run end to end (logits in parts, align, fuse, merge, evaluate, report) as Ray
tasks on a local Ray cluster of two simulated nodes of eight logical GPUs each. The stage
records then show the placement docs/cluster.md promises.

What the rehearsal changes besides sizes, steps and the corpus, because this machine has no
GPU: scoring with transformers (``backend: hf``) instead of vLLM, each part still asking for
its model's ``tensor_parallel_size`` GPUs (the plan's GPUs per stage are checked equal to
the unchanged recipe's); training in-process instead of ``accelerate launch`` with FSDP over
8 processes (FSDP needs an accelerator); no bf16/tf32; an ``evaluate`` section (the 7B
recipe has none) with a held-out file.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from corpus import conversations, write_jsonl
from helpers import refused
from standins import HUB_IDS, lay_out_standins, make_standins

from fusechat_merge.cli import main
from fusechat_merge.pipeline import WorkDir, plan_stages
from fusechat_merge.pipeline_recipe import load_pipeline_recipe
from fusion.artifacts.records import read_record

REPO = Path(__file__).parents[1]
SEVEN_B = REPO / "recipes" / "fusechat-7b.yaml"
NODES, GPUS_PER_NODE = 2, 8


def tensor_parallel(recipe: dict) -> dict[str, int]:
    return {s["name"]: s.get("tensor_parallel_size", 1) for s in [recipe["pivot"], *recipe["sources"]]}


def rehearsal_recipe(parts: int | None = None) -> dict:
    """The 7B recipe, its model ids untouched (the stand-ins are cached under them), shrunk;
    ``parts``: every model scored in that many parts (None: the 7B recipe's 8, 4, 2 and 2)."""
    recipe = yaml.safe_load(SEVEN_B.read_text(encoding="utf-8"))
    seven_b = copy.deepcopy(recipe)
    counts = {}
    for spec in [recipe["pivot"], *recipe["sources"]]:
        assert spec["model"] == HUB_IDS[spec["name"]]
        spec["backend"] = "hf"  # vLLM needs CUDA; each part keeps its GPUs in resources.stages below
        spec.pop("tensor_parallel_size", None)
        spec.pop("gpu_memory_utilization", None)
        if parts is not None:
            spec["parts"] = parts
        counts[spec["name"]] = spec.get("parts", recipe["logits"]["parts"])
    recipe["data"]["train"] = "data/train.jsonl"
    recipe["logits"]["max_length"] = 256
    defaults = recipe["fuse"]["defaults"]
    defaults.pop("num_train_epochs")
    defaults.update(max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=1,
                    learning_rate=1e-3, bf16=False)
    defaults.pop("tf32")
    recipe["fuse"].pop("launch")  # FSDP over 8 processes needs GPUs: trained in-process here
    resources = recipe["resources"]
    for kind in ("logits", "align", "fuse", "merge"):  # one CPU each, no memory reservations
        resources[kind] = {k: v for k, v in resources[kind].items() if k == "num_gpus"} | {"num_cpus": 1}
    tp = tensor_parallel(seven_b)
    resources["stages"] = {f"logits/{name}/part-{i}": {"num_gpus": tp[name]}
                           for name, count in counts.items() for i in range(count)}
    # a held-out file's store (the transfer measure) is scored as vLLM would: on the model's GPUs
    resources["stages"].update({f"logits/eval-chat/{name}": {"num_gpus": tp[name]} for name in counts})
    recipe["evaluate"] = {"skills": {"chat": "data/heldout.jsonl"}, "max_length": 128, "batch_size": 8}
    return recipe


@pytest.fixture(scope="module")
def hub(tmp_path_factory, metaspace_tokenizer, bytelevel_tokenizer) -> Path:
    """HF_HOME with the six stand-ins in its hub cache, and a work dir with the corpus."""
    root = tmp_path_factory.mktemp("rehearsal")
    models = make_standins(root / "models", metaspace_tokenizer, bytelevel_tokenizer)
    lay_out_standins(root / "hf", models)
    work = root / "work"
    (work / "data").mkdir(parents=True)
    write_jsonl(work / "data" / "train.jsonl", conversations(16))
    held = conversations(20)[16:]
    write_jsonl(work / "data" / "heldout.jsonl", held)
    (work / "recipe.yaml").write_text(yaml.safe_dump(rehearsal_recipe(), sort_keys=False), encoding="utf-8")
    # what runs: two parts per model (a fresh Ray worker per part: 32 of them cost minutes on 2 cores)
    (work / "run.yaml").write_text(yaml.safe_dump(rehearsal_recipe(parts=2), sort_keys=False), encoding="utf-8")
    return root


@pytest.fixture
def in_hub_cache(hub, monkeypatch):
    """This process reads hub ids from ``hub/hf`` (as a process started with HF_HOME there)."""
    import huggingface_hub

    monkeypatch.setenv("HF_HOME", str(hub / "hf"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub / "hf" / "hub"))


def _plan(recipe_file: Path, work: Path) -> list[dict]:
    """What ``run --plan`` prints."""
    from fusechat_merge.pipeline import pipeline_runner

    return pipeline_runner(load_pipeline_recipe(recipe_file, work), work, memory=True).plan()


def test_rehearsal_plans_the_stages_and_gpus_of_the_7b_recipe(hub, in_hub_cache):
    """Same stage ids and GPUs per stage as the unchanged recipe (its evaluation aside),
    and a memory estimate for every scoring and training stage."""
    work = hub / "work"
    real = {s["id"]: s for s in _plan(SEVEN_B, hub / "plan-7b")}
    ours = {s["id"]: s for s in _plan(work / "recipe.yaml", work)}
    assert len(real) == 49 and sum(1 for i in real if "/part-" in i) == 32  # as docs/cluster.md counts
    # the evaluation and its held-out stores (a skill file scored and aligned: the transfer measure)
    assert set(ours) - set(real) == {i for i in ours if i.startswith("evaluate/") or i.split("/")[1:2] == ["eval-chat"]}
    for stage_id, stage in real.items():
        assert ours[stage_id]["after"] == stage["after"], stage_id
        assert ours[stage_id]["resources"]["num_gpus"] == stage["resources"]["num_gpus"], stage_id
        if stage["kind"] == "fuse" or "/part-" in stage_id:
            assert stage["memory"]["per_device_gib"] > 0, stage_id
    qwen = real["logits/qwen/part-0"]["memory"]
    assert qwen["devices"] == 8 and qwen["fits"] is True


def test_the_7b_recipe_refuses_internlm_without_remote_code(hub, in_hub_cache):
    recipe = yaml.safe_load(SEVEN_B.read_text(encoding="utf-8"))
    entry = next(s for s in recipe["sources"] if s["name"] == "internlm")
    entry.pop("trust_remote_code")
    path = hub / "no-remote-code.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    result = CliRunner().invoke(main, ["run", str(path), "--work-dir", str(hub / "refused"), "--dry-run"])
    refused(result, "internlm/internlm2-chat-20b", "sources[2].trust_remote_code: true", "modeling_internlm2.py")
    assert not (hub / "refused" / "stages").exists()


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster of two nodes with 2 CPUs and 8 logical GPUs each (models run on CPU)."""
    pytest.importorskip("ray", reason="the placement rehearsal needs the ray extra")
    from ray.cluster_utils import Cluster

    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    (Path(temp) / "ray").mkdir()
    mp = pytest.MonkeyPatch()
    mp.setenv("RAY_TMPDIR", temp)  # the cluster's address file too, not the machine's /tmp/ray
    node = {"num_cpus": 2, "num_gpus": GPUS_PER_NODE, "object_store_memory": 80 * 2**20}
    made = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False, "temp_dir": temp})
    for _ in range(NODES - 1):
        made.add_node(**node)
    made.wait_for_nodes()
    yield made
    made.shutdown()
    mp.undo()
    shutil.rmtree(temp, ignore_errors=True)


def _records(work: Path) -> dict[str, dict]:
    layout = WorkDir(work)
    stages = plan_stages(load_pipeline_recipe(work / "run.yaml", work), layout)
    return {s.id: {**read_record(layout.record(s.id, "done")), "after": s.after, "kind": s.kind} for s in stages}


@pytest.mark.slow
def test_rehearsal_runs_the_7b_recipe_on_a_simulated_gpu_cluster(hub, cluster):
    work = hub / "work"
    env = dict(os.environ, HF_HOME=str(hub / "hf"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "fusechat_merge.cli", "run", str(work / "run.yaml"),
                           "--work-dir", str(work), "--executor", "ray", "--ray-address", cluster.address],
                          env=env, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    # a merged model that loads and scores, and the report
    from transformers import AutoModelForCausalLM

    merged = work / "merges" / "seed-42" / "fusechat-7b-sce"
    model = AutoModelForCausalLM.from_pretrained(merged)
    assert type(model).__name__ == "MistralForCausalLM"
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 5, 9]])).logits).all()
    rows = json.loads((work / "eval" / "base.json").read_text(encoding="utf-8"))
    assert {r["model"] for r in rows} == set(HUB_IDS)  # InternLM2 evaluated with its own code too
    assert all(r["loss"] > 0 for r in rows if "loss" in r)
    assert any(r.get("transfer_kl", -1) >= 0 for r in rows)  # the pivot's distance to each source
    assert (work / "report" / "results.json").is_file()  # and the report

    records = _records(work)
    tp = tensor_parallel(yaml.safe_load(SEVEN_B.read_text(encoding="utf-8")))
    nodes = set()
    for stage_id, rec in records.items():
        where = rec["placement"]
        assert rec["executor"] == "ray" and "node_id" in where, stage_id
        nodes.add(where["node_id"])
        gpus = where["gpu_ids"]
        if "/part-" in stage_id:  # each scoring part holds its model's tensor-parallel GPUs
            assert len(gpus) == tp[stage_id.split("/")[1]], (stage_id, gpus)
        elif stage_id.startswith("logits/eval-"):  # a held-out file's store: the model's GPUs too
            assert len(gpus) == tp[stage_id.split("/")[2]], (stage_id, gpus)
        elif rec["kind"] == "fuse":  # each training a whole node
            assert gpus == sorted(str(i) for i in range(GPUS_PER_NODE)), (stage_id, gpus)
        else:
            assert gpus == [], (stage_id, gpus)
        for upstream in rec["after"]:  # no stage starts before what it reads is done
            assert rec["started_at"] >= records[upstream]["finished_at"], (stage_id, upstream)
    assert len(nodes) == NODES  # both nodes worked
    # no GPU slot served two stages at once
    busy = [(r["placement"]["node_id"], g, r["started_at"], r["finished_at"], i)
            for i, r in records.items() for g in r["placement"]["gpu_ids"]]
    for a in busy:
        for b in busy:
            if a[4] < b[4] and a[:2] == b[:2]:
                assert a[3] <= b[2] or b[3] <= a[2], (a, b)
    # the order docs/cluster.md promises: every part before its combine, combine before align,
    # align before its pair's training, all trainings before the merge, then the evaluations
    merge = records["merge/seed-42/fusechat-7b-sce"]
    assert merge["started_at"] >= max(r["finished_at"] for i, r in records.items() if r["kind"] == "fuse")
    # each stage submitted as soon as the stages it waits for are done: in the driver's lines, the
    # last stage done before a stage's submission is one of its own upstream stages
    done: list[str] = []
    for line in proc.stdout.splitlines():
        if match := re.match(r"^\[(\S+)\] (submitted|done on) ", line):
            stage_id, what = match.groups()
            if what == "done on":
                done.append(stage_id)
            elif records[stage_id]["after"]:
                assert done and done[-1] in records[stage_id]["after"], (stage_id, done[-3:])
    assert sorted(done) == sorted(records)
    report_rec = records["evaluate/report"]
    assert report_rec["started_at"] >= max(r["finished_at"] for i, r in records.items()
                                           if i.startswith("evaluate/") and i != "evaluate/report")
