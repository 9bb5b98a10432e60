"""AcceptanceStats arithmetic."""

from __future__ import annotations

import json

import pytest

from offspec.speculative.stats import AcceptanceStats
from offspec.speculative.verify import VerifyResult


def passes() -> list[VerifyResult]:
    return [
        VerifyResult([1, 4], 7, [5, 2, 7], ranks=[0, 1], tries=2),  # stopped at a leaf
        VerifyResult([], 3, [3], ranks=[], tries=1),
        VerifyResult([2, 5, 9], 1, [6, 3, 8, 1], ranks=[1, 0, 0], tries=4),  # rejected below depth 3
    ]


def test_counters() -> None:
    stats = AcceptanceStats()
    for r, drafted in zip(passes(), [10, 10, 20]):
        stats.record(r, drafted=drafted, draft_s=0.1, target_s=1.0)
    assert stats.passes == 3 and stats.tokens == 3 + 1 + 4 and stats.drafted == 40
    assert stats.accepted_hist == [1, 0, 1, 1]
    assert stats.depth_tries == [3, 2, 1, 1] and stats.depth_accepts == [2, 2, 1]
    assert stats.depth_acceptance() == pytest.approx([2 / 3, 1.0, 1.0, 0.0])
    assert stats.rank_accepts == [3, 2] and stats.tries == 7
    assert stats.acceptance_p(3) == pytest.approx([3 / 7, 2 / 7, 0.0])
    assert stats.tokens_per_pass == pytest.approx(8 / 3) and stats.mean_accepted == pytest.approx(5 / 3)
    assert stats.draft_s == pytest.approx(0.3) and stats.target_s == pytest.approx(3.0)
    json.dumps(stats.as_dict())


def test_empty_stats() -> None:
    assert AcceptanceStats().acceptance_p(2) == [0.0, 0.0] and AcceptanceStats().tokens_per_pass == 0.0
