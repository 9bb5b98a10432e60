"""AcceptanceStats: running counters of speculative passes (pure Python)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


class Verified(Protocol):
    """What record() reads from a VerifyResult."""

    accepted: list[int]
    ranks: list[int]
    tries: int


def _bump(counts: list[int], i: int, by: int = 1) -> None:
    if i >= len(counts):
        counts.extend([0] * (i + 1 - len(counts)))
    counts[i] += by


@dataclass
class AcceptanceStats:
    """Passes, committed tokens, accepted-per-pass histogram, per-depth and per-rank acceptance, time split."""

    passes: int = 0
    tokens: int = 0  # committed tokens (accepted drafted tokens + one target token per pass)
    drafted: int = 0  # drafted nodes over all passes
    accepted_hist: list[int] = field(default_factory=list)  # [k] = passes that accepted k drafted tokens
    depth_tries: list[int] = field(default_factory=list)  # [d - 1] = choices made among depth-d children
    depth_accepts: list[int] = field(default_factory=list)  # [d - 1] = depth-d nodes accepted
    rank_accepts: list[int] = field(default_factory=list)  # [k] = accepted nodes that were their parent's rank-k child
    draft_s: float = 0.0
    target_s: float = 0.0

    def record(self, result: Verified, drafted: int = 0, draft_s: float = 0.0, target_s: float = 0.0) -> None:
        """Count one pass from its VerifyResult (drafted = tree budget)."""
        accepted = len(result.accepted)
        self.passes += 1
        self.tokens += accepted + 1
        self.drafted += drafted
        _bump(self.accepted_hist, accepted)
        for d in range(result.tries):
            _bump(self.depth_tries, d)
        for d in range(accepted):
            _bump(self.depth_accepts, d)
        for rank in result.ranks:
            _bump(self.rank_accepts, rank)
        self.draft_s += draft_s
        self.target_s += target_s

    @property
    def tries(self) -> int:
        """Choices the target made at nodes with children."""
        return sum(self.depth_tries)

    @property
    def accepted(self) -> int:
        return sum(self.depth_accepts)

    @property
    def tokens_per_pass(self) -> float:
        return self.tokens / self.passes if self.passes else 0.0

    @property
    def mean_accepted(self) -> float:
        return self.accepted / self.passes if self.passes else 0.0

    def acceptance_p(self, width: int) -> list[float]:
        """Empirical positional acceptance for Sequoia: p[k] = P(the accepted child has rank k) per try."""
        tries = self.tries
        return [(self.rank_accepts[k] if k < len(self.rank_accepts) else 0) / tries if tries else 0.0 for k in range(width)]

    def depth_acceptance(self) -> list[float]:
        """[d - 1] = P(some depth-d child is accepted | the target chose at depth d - 1 with children)."""
        return [a / t if t else 0.0 for a, t in zip(self.depth_accepts + [0] * len(self.depth_tries), self.depth_tries)]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready summary (generate --json's "acceptance")."""
        return {
            "passes": self.passes,
            "tokens": self.tokens,
            "drafted": self.drafted,
            "tokens_per_pass": self.tokens_per_pass,
            "mean_accepted": self.mean_accepted,
            "accepted_hist": list(self.accepted_hist),
            "depth_acceptance": self.depth_acceptance(),
            "rank_p": self.acceptance_p(len(self.rank_accepts)),
            "draft_s": self.draft_s,
            "target_s": self.target_s,
        }
