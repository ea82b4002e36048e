"""The transformers backend: top-K and gold log-probabilities equal a plain forward pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fusion.backends import make_backend
from fusion.backends.hf import resolve_device, resolve_dtype
from fusion.options import LogitOptions


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, metaspace_tokenizer):
    from fusechat_merge.demo.toy import make_model

    return make_model(tmp_path_factory.mktemp("hf") / "llama", "llama", tokenizer=metaspace_tokenizer, seed=4)


def test_scores_equal_log_softmax_of_a_forward_pass(model_dir):
    from transformers import AutoModelForCausalLM

    rng = np.random.default_rng(0)
    sequences = [rng.integers(3, 300, n).tolist() for n in (9, 5, 12)]  # padded in one batch
    positions = [np.array([0, 3, 7]), np.array([1, 3]), np.arange(11)]
    backend = make_backend(str(model_dir), LogitOptions(top_k=5, dtype="float32", device="cpu"))
    scores = backend.score(sequences, positions)
    backend.close()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for seq, pos, got in zip(sequences, positions, scores, strict=True):
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([seq])).logits[0].float(), -1)[pos]
        values, ids = logprobs.topk(5, dim=-1)
        np.testing.assert_allclose(got.topk_logprobs, values.numpy(), atol=1e-5)
        assert np.array_equal(got.topk_ids, ids.numpy())
        gold = logprobs.gather(1, torch.tensor(seq)[pos + 1][:, None]).squeeze(1)
        np.testing.assert_allclose(got.target_logprobs, gold.numpy(), atol=1e-5)


def test_auto_device_and_dtype_on_this_machine():
    device = resolve_device("auto")
    assert device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32


def _score_all(backend, sequences, positions):
    try:
        return backend.score(sequences, positions)
    finally:
        backend.close()


def test_device_map_auto_loads_and_scores_identically(model_dir):
    """accelerate's big-model loading (on a CPU-only machine the whole model lands on the CPU,
    without a device map to record): the same numbers as the plain load's."""
    rng = np.random.default_rng(1)
    sequences = [rng.integers(3, 300, n).tolist() for n in (14, 6, 9)]
    positions = [np.arange(13), np.array([0, 4]), np.array([2, 5, 7])]
    plain = _score_all(make_backend(str(model_dir), LogitOptions(top_k=6, dtype="float32", device="cpu")),
                       sequences, positions)
    mapped = make_backend(str(model_dir), LogitOptions(top_k=6, dtype="float32", device_map="auto"))
    assert {p.device.type for p in mapped.model.parameters()} == {"cuda" if torch.cuda.is_available() else "cpu"}
    for a, b in zip(plain, _score_all(mapped, sequences, positions), strict=True):
        np.testing.assert_array_equal(a.topk_ids, b.topk_ids)
        np.testing.assert_allclose(a.topk_logprobs, b.topk_logprobs, rtol=0, atol=1e-6)
        np.testing.assert_allclose(a.target_logprobs, b.target_logprobs, rtol=0, atol=1e-6)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="spreading a model needs 2 or more GPUs")
def test_device_map_spreads_layers_over_the_gpus_with_the_same_scores(model_dir):
    rng = np.random.default_rng(2)
    sequences = [rng.integers(3, 300, n).tolist() for n in (30, 12)]
    positions = [np.arange(29), np.arange(11)]
    one = _score_all(make_backend(str(model_dir), LogitOptions(top_k=6, dtype="float32", device="cuda:0")),
                     sequences, positions)
    spread = make_backend(str(model_dir), LogitOptions(top_k=6, dtype="float32", device_map="balanced"))
    assert len(set(spread.model.hf_device_map.values())) >= 2, spread.model.hf_device_map
    for a, b in zip(one, _score_all(spread, sequences, positions), strict=True):
        np.testing.assert_allclose(a.topk_logprobs, b.topk_logprobs, rtol=0, atol=1e-4)
        np.testing.assert_allclose(a.target_logprobs, b.target_logprobs, rtol=0, atol=1e-4)
