"""Teacher logits: the store holds exactly what transformers computes, and survives kills."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from corpus import conversations, write_jsonl
from helpers import BIN, assert_same_store, killed_once, refused

from fusion.artifacts.logit_store import (
    LogitStore,
    merge_stores,
)
from fusion.artifacts.records import StoreError
from fusion.backends.base import ScoringError
from fusion.capture.logit_job import LogitJob, generate_logits, shard_rows
from fusion.capture.throughput import Throughput


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
    killed_once(args(killed), lambda: (killed / "shard-00001.arrow").exists(), timeout=120)
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
    from fusion.data.conversations import MalformedRow

    with pytest.raises(MalformedRow, match="bad-role"):
        run_job(teachers["llama"], corpus, tmp_path / "s", strict=True)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_token_budget_batches_store_what_fixed_batches_store(arch, teachers, corpus, tmp_path):
    """Batches change the padding, never the store: every column of every sequence equal to
    one sequence per pass (no padding at all) and to today's fixed batches."""
    common = {"top_k": 6, "rows_per_shard": 5}
    alone = run_job(teachers[arch], corpus, tmp_path / "alone", batch_tokens=0, batch_size=1, **common)
    fixed = run_job(teachers[arch], corpus, tmp_path / "fixed", batch_tokens=0, batch_size=3, **common)
    budget = run_job(teachers[arch], corpus, tmp_path / "budget", batch_tokens=120, **common)
    default = run_job(teachers[arch], corpus, tmp_path / "default", **common)
    assert default.scoring["batches"] == 3  # one per store shard: the default budget holds them all
    assert alone.scoring["padding_share"] == 0
    assert budget.scoring["batches"] > fixed.scoring["batches"] > 3
    for store in (fixed, budget, default):
        assert_same_store(alone, store, atol=1e-5)


class MemoryLimit:
    """Fault injection: the real decoder, raising CUDA's out-of-memory error for a batch of
    more than ``limit`` padded tokens (as a device of that size would)."""

    def __init__(self, decoder, limit: int) -> None:
        self.decoder, self.limit, self.calls = decoder, limit, []

    def __call__(self, *, input_ids, attention_mask):
        self.calls.append(tuple(input_ids.shape))
        if input_ids.numel() > self.limit:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (injected: {input_ids.numel()} tokens)")
        return self.decoder(input_ids=input_ids, attention_mask=attention_mask)


@pytest.fixture
def memory_limit(monkeypatch):
    """Set ``limit[0]`` (padded tokens); scoring backends built from now on have that memory."""
    import fusion.backends

    made, limit = [], [10**9]
    real = fusion.backends.make_backend

    def limited(*args, **kwargs):
        backend = real(*args, **kwargs)
        backend.decoder = MemoryLimit(backend.decoder, limit[0])
        made.append(backend.decoder)
        return backend

    monkeypatch.setattr(fusion.backends, "make_backend", limited)
    return limit, made


def test_out_of_memory_halves_the_batch_once_and_the_store_is_unchanged(teachers, corpus, tmp_path, memory_limit):
    limit, made = memory_limit
    whole = run_job(teachers["llama"], corpus, tmp_path / "whole", top_k=6, batch_tokens=0, batch_size=1)
    width = max(len(s.input_ids) for s in whole)
    limit[0] = 8 * width  # a batch of 14 does not fit, its halves of 7 do
    lines: list[str] = []
    job = LogitJob(model=str(teachers["llama"]), data=str(corpus), out=str(tmp_path / "halved"), top_k=6,
                   cache_dir=str(tmp_path / "cache"))
    generate_logits(job, progress=False, log=lines.append)
    assert_same_store(whole, LogitStore(tmp_path / "halved"), atol=1e-5)
    scoring = LogitStore(tmp_path / "halved").scoring
    assert scoring["oom_halvings"] == 1 and scoring["batches"] == 2
    assert [b for b, _ in made[-1].calls] == [14, 7, 7]
    assert any("CUDA out of memory on a batch of 14 sequences: scoring it in two halves" in x for x in lines)


def test_out_of_memory_after_halving_names_the_options_to_lower(teachers, corpus, tmp_path, memory_limit):
    from click.testing import CliRunner

    from fusechat_merge.cli import main as cli

    limit, made = memory_limit
    limit[0] = 3 * 40  # not even 4 sequences of ~40 tokens
    args = ["logits", "--model", str(teachers["llama"]), "--data", str(corpus), "--out", str(tmp_path / "s"),
            "--cache-dir", str(tmp_path / "c")]
    result = CliRunner().invoke(cli, [*args, "--batch-tokens", "4000", "--batch-size", "14"])
    refused(result, "CUDA out of memory on a batch of 14 sequences, also after halving it",
            "lower batch_tokens (now 4000) or batch_size (now 14)")
    assert [b for b, _ in made[-1].calls] == [14, 7]  # retried once, then stopped
    assert not (tmp_path / "s").exists()  # nothing written: nothing half-made stays
    limit[0] = 1
    result = CliRunner().invoke(cli, [*args, "--batch-size", "1"])
    refused(result, "CUDA out of memory on a single sequence", "max_length", "device_map: auto")
    with pytest.raises(ScoringError, match="single sequence"):
        run_job(teachers["llama"], corpus, tmp_path / "t", batch_size=1)


def test_progress_and_throughput_per_shard_in_the_log_and_the_manifest(teachers, corpus, tmp_path):
    lines: list[str] = []
    job = LogitJob(model=str(teachers["qwen2"]), data=str(corpus), out=str(tmp_path / "s"), top_k=4,
                   rows_per_shard=4, batch_tokens=0, batch_size=2, cache_dir=str(tmp_path / "c"))
    manifest = generate_logits(job, progress=False, log=lines.append)
    shard_lines = [x for x in lines if x.startswith("shard ")]
    assert [x.split(":")[0] for x in shard_lines] == ["shard 1/4", "shard 2/4", "shard 3/4", "shard 4/4"]
    assert all("tok/s" in x and "ETA" in x for x in shard_lines) and "(100%)" in shard_lines[-1]
    scoring = LogitStore(tmp_path / "s").scoring
    assert scoring["tokens"] == manifest.tokens and scoring["shards_scored"] == 4
    assert scoring["tokens_per_s"] > 0 and scoring["batches"] == 7  # 4 + 4 + 4 + 2 sequences, two a pass
    store = LogitStore(tmp_path / "s")
    lengths = [len(s.input_ids) for s in store]
    padded = 0
    for start in range(0, len(lengths), 4):  # brute force: each shard's pairs of the length order
        shard = sorted(lengths[start:start + 4], reverse=True)
        padded += sum(len(pair) * pair[0] for pair in (shard[i:i + 2] for i in range(0, len(shard), 2)))
    assert scoring["padding_share"] == pytest.approx(1 - sum(lengths) / padded, abs=1e-4)
    # a resumed run that had nothing left to score says so
    (tmp_path / "s" / "manifest.json").unlink()
    generate_logits(job, progress=False, log=lambda _: None)
    again = LogitStore(tmp_path / "s").scoring
    assert again["shards_resumed"] == 4 and again["tokens"] == 0
    # a measurement beside the store, never in its manifest (so not in its fingerprint)
    assert "scoring" not in json.loads((tmp_path / "s" / "manifest.json").read_text())


def test_throughput_rate_and_eta_on_a_clock():
    now = [100.0]
    meter = Throughput(total=1000, clock=lambda: now[0])
    assert meter.eta_s() is None
    now[0] = 102.0
    meter.add(200, 250)
    assert meter.tokens_per_s == 100.0 and meter.eta_s() == 8.0  # 800 tokens left at 100 tok/s
    now[0] = 104.0
    meter.add(200, 200)
    assert meter.line() == "400/1,000 tokens (40%), 100 tok/s, padding 11%, ETA 0:00:06"
    assert meter.record() == {"tokens": 400, "seconds": 4.0, "tokens_per_s": 100.0, "padding_share": 0.1111,
                              "batches": 2, "oom_halvings": 0}
