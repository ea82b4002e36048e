"""Padding: on the right, for scoring and training; the mask marks real tokens."""

from __future__ import annotations

import numpy as np

from fusion.data.batching import pad_sequences


def test_right_padding():
    ids, mask = pad_sequences([[1, 2, 3], np.array([4], dtype=np.uint16)], 9)
    assert ids.tolist() == [[1, 2, 3], [4, 9, 9]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_empty_batch():
    ids, mask = pad_sequences([], 0)
    assert ids.shape == (0, 0) and mask.shape == (0, 0)


def test_token_budget_batches_are_greedy_length_sorted_and_cover_each_index_once():
    from fusion.data.batching import length_sorted_batches, padded_tokens

    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 2049, 300).tolist() + [5000, 3]  # one longer than the budget
    budget, cap = 8192, 64
    batches = length_sorted_batches(lengths, cap, budget)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))
    assert flat == sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))  # longest first, ties by index
    for batch, following in zip(batches, batches[1:] + [[]], strict=True):
        assert len(batch) <= cap
        assert padded_tokens(lengths, batch) <= budget or len(batch) == 1
        if following and len(batch) < cap:  # greedy: the next sequence did not fit
            assert (len(batch) + 1) * lengths[batch[0]] > budget
    assert batches[0] == [len(lengths) - 2]  # 5000 tokens: alone
    assert padded_tokens(lengths, [0, 1]) == 2 * max(lengths[0], lengths[1])


def test_without_a_budget_batches_are_fixed_slices_of_the_length_order():
    from fusion.data.batching import length_sorted_batches

    lengths = [5, 9, 9, 1, 7, 3, 8]
    order = [1, 2, 6, 4, 0, 5, 3]
    assert length_sorted_batches(lengths, 3) == [order[0:3], order[3:6], order[6:]]
    assert length_sorted_batches(lengths, 3, 0) == length_sorted_batches(lengths, 3)
    # a budget between: 2 sequences of 9, then 8 + 7 (16 > 15 for three), ...
    assert length_sorted_batches(lengths, 10, 18) == [[1, 2], [6, 4], [0, 5, 3]]
    assert length_sorted_batches([], 4, 100) == []
