"""Padding: on the right, for scoring and training; the mask marks real tokens."""

from __future__ import annotations

import numpy as np

from fusion.batching import pad_sequences


def test_right_padding():
    ids, mask = pad_sequences([[1, 2, 3], np.array([4], dtype=np.uint16)], 9)
    assert ids.tolist() == [[1, 2, 3], [4, 9, 9]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_empty_batch():
    ids, mask = pad_sequences([], 0)
    assert ids.shape == (0, 0) and mask.shape == (0, 0)
