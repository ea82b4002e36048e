"""The report's diagnostics as pure functions, against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fusechat_merge.diagnostics import gold_mass


def test_gold_mass_averages_probabilities_over_aligned_positions():
    # NaN: no source distribution there (skipped); -inf: gold outside the top-K (mass 0)
    rows = [np.array([math.log(0.5), math.nan, -math.inf], dtype=np.float32), np.array([0.0])]
    assert gold_mass(rows) == pytest.approx((0.5 + 0.0 + 1.0) / 3, rel=1e-6)
    assert gold_mass([]) is None
    assert gold_mass([np.array([math.nan])]) is None


def test_rule_shares_count_positions_per_rule():
    from fusechat_merge.diagnostics import rule_shares

    rows = [np.array([1, 1, 2, 0], dtype=np.uint8), np.array([2], dtype=np.uint8)]
    assert rule_shares(rows) == {"fallback": 0.2, "boundary": 0.4, "projected": 0.4}
    assert rule_shares([]) is None
