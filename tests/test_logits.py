"""Teacher logits: the store holds exactly what transformers computes, and survives kills."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from corpus import conversations, write_jsonl
from helpers import BIN

from fusion.artifacts.logit_store import (
    LogitStore,
    StoreError,
    merge_stores,
)
from fusion.logits import LogitJob, generate_logits, shard_rows


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    rows = conversations(14)
    rows.insert(5, {"id": "bad-role", "conversations": [{"from": "robot", "value": "beep"}]})
    rows.insert(9, {"id": "empty", "conversations": []})
    return write_jsonl(root / "chats.jsonl", rows)


@pytest.fixture(scope="module")
def teachers(tmp_path_factory, metaspace_tokenizer, bytelevel_tokenizer) -> dict[str, Path]:
    from fusechat_merge.demo.toy import make_model

    root = tmp_path_factory.mktemp("teachers")
    return {
        "llama": make_model(root / "llama", "llama", tokenizer=metaspace_tokenizer, seed=1),
        "qwen2": make_model(root / "qwen2", "qwen2", tokenizer=bytelevel_tokenizer, seed=2),
    }


def run_job(model: Path, data: Path, out: Path, **kw) -> LogitStore:
    generate_logits(
        LogitJob(model=str(model), data=str(data), out=str(out), cache_dir=str(out.parent / "cache"), **kw),
        progress=False,
        log=lambda _: None,
    )
    return LogitStore(out)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("template", ["own", "shared"])
def test_store_equals_transformers_topk_and_loss(arch, template, teachers, corpus, tmp_path):
    from transformers import AutoModelForCausalLM

    store = run_job(teachers[arch], corpus, tmp_path / "store", template=template, top_k=5, batch_size=3)
    assert len(store) == 14
    assert set(store.manifest.skipped) == {"bad-role", "empty"}
    model = AutoModelForCausalLM.from_pretrained(teachers[arch]).eval()
    for seq in store:
        ids = torch.from_numpy(seq.input_ids.astype(np.int64))[None]
        labels = torch.where(torch.from_numpy(seq.loss_mask)[None], ids, -100)
        with torch.no_grad():
            out = model(ids, labels=labels)
        logprobs = torch.log_softmax(out.logits[0].float(), dim=-1)
        pos = torch.from_numpy(seq.positions)
        values, indices = torch.topk(logprobs[pos], 5, dim=-1)
        assert np.array_equal(seq.topk_ids, indices.numpy()), seq.id
        np.testing.assert_allclose(seq.topk_logprobs, values.numpy(), rtol=1e-3, atol=2e-3)
        gold = logprobs[pos, ids[0, pos + 1]]
        np.testing.assert_allclose(seq.target_logprobs, gold.numpy(), rtol=1e-5, atol=1e-5)
        assert seq.seq_ce == pytest.approx(out.loss.item(), rel=1e-5)
        assert seq.loss_mask[pos + 1].all() and len(pos) == seq.loss_mask[1:].sum()


def test_bytes_per_token_and_id_type(teachers, corpus, tmp_path):
    store = run_job(teachers["qwen2"], corpus, tmp_path / "s", top_k=10)
    assert store.options.id_type == "uint16"
    assert store.bytes_per_token() <= 60


def test_shards_across_machines_merge_into_the_single_run(teachers, corpus, tmp_path):
    whole = run_job(teachers["llama"], corpus, tmp_path / "whole", rows_per_shard=4)
    parts = [run_job(teachers["llama"], corpus, tmp_path / f"p{i}", shard=f"{i}/3") for i in range(3)]
    merge_stores([p.path for p in parts], tmp_path / "merged")
    merged = LogitStore(tmp_path / "merged")
    assert merged.ids() == whole.ids()
    for a, b in zip(whole, merged, strict=True):
        assert np.array_equal(a.topk_ids, b.topk_ids) and a.seq_ce == pytest.approx(b.seq_ce, rel=1e-6)
    assert list(shard_rows(10, "2/3")) == [8, 9]
    with pytest.raises(ValueError, match="i/N"):
        shard_rows(10, "3")


def test_resume_after_kill_gives_the_same_store(teachers, corpus, tmp_path):
    def args(out: Path) -> list[str]:
        return [str(BIN / "fusechat-merge"), "logits", "--model", str(teachers["qwen2"]), "--data", str(corpus),
                "--out", str(out), "--rows-per-shard", "2", "--batch-size", "1", "--cache-dir", str(tmp_path / "c")]

    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    subprocess.run(args(tmp_path / "clean"), env=env, check=True, capture_output=True, timeout=300)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(args(killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and not (killed / "shard-00001.arrow").exists():
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "manifest.json").exists(), "the run finished before it could be killed"
    with pytest.raises(StoreError, match="resume"):
        LogitStore(killed)
    kept = {p.name: p.stat().st_mtime_ns for p in killed.glob("shard-*.arrow")}
    subprocess.run(args(killed), env=env, check=True, capture_output=True, text=True, timeout=300)
    assert {n: (killed / n).stat().st_mtime_ns for n in kept} == kept  # resumed: not rewritten
    clean_files = sorted(p.name for p in (tmp_path / "clean").glob("shard-*.arrow"))
    assert clean_files == sorted(p.name for p in killed.glob("shard-*.arrow"))
    for name in clean_files:
        assert (tmp_path / "clean" / name).read_bytes() == (killed / name).read_bytes(), name
    assert not list(killed.glob(".*tmp*"))


def test_a_resumed_run_with_other_options_is_refused(teachers, corpus, tmp_path):
    run_job(teachers["llama"], corpus, tmp_path / "s", top_k=5)
    with pytest.raises(StoreError, match="top_k: 5 then, 3 now"):
        run_job(teachers["llama"], corpus, tmp_path / "s", top_k=3)


def test_strict_mode_raises_on_the_first_malformed_row(teachers, corpus, tmp_path):
    from fusion.data import MalformedRow

    with pytest.raises(MalformedRow, match="bad-role"):
        run_job(teachers["llama"], corpus, tmp_path / "s", strict=True)
