"""Voting and adaptive stopping for self-consistency.

`vote` counts answer keys (optionally weighted); ties go to the key whose first sample
came earliest. `should_stop` applies a stopping rule to the counts so far:

- `fixed`: never early; draw the whole budget;
- `majority`: stop when the winner's share reaches the threshold;
- `beta`: Adaptive-Consistency: with a votes for the winner and b for the runner-up,
  stop when P(p > 0.5) >= threshold for p ~ Beta(a + 1, b + 1);
- `entropy`: stop when the normalised entropy of the vote falls to 1 - threshold or below.

Keys come from `detot_agent.answers.normalize`.

Example:
    >>> vote(["7", "7", "8"]).winner
    '7'
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from detot_agent.detot.task import StoppingRule
from detot_agent.errors import InvalidRequestError

__all__ = ["VoteResult", "beta_confidence", "should_stop", "vote"]

@dataclass(frozen=True)
class VoteResult:
    """Outcome of a vote.

    Attributes:
        winner: the winning key (None when no sample parsed).
        counts: weight per key, in order of first appearance.
        agreement: winner's share of the parsed weight (0 when nothing parsed).
        parsed: number of samples that parsed.
        unparsed: number that did not.
    """

    winner: str | None
    counts: dict[str, float] = field(default_factory=dict)
    agreement: float = 0.0
    parsed: int = 0
    unparsed: int = 0


def vote(answers: Sequence[str | None], weights: Sequence[float] | None = None) -> VoteResult:
    """Count normalised answers (None = unparseable, skipped). Ties: the key seen first wins.

    Example:
        >>> vote(["7", None, "8", "7"]).winner, vote(["8", "7"]).winner
        ('7', '8')
    """
    if weights is not None and len(weights) != len(answers):
        raise InvalidRequestError(f"{len(answers)} answers but {len(weights)} weights")
    counts: dict[str, float] = {}
    parsed = 0
    for i, key in enumerate(answers):
        if key is None:
            continue
        w = 1.0 if weights is None else float(weights[i])
        if not math.isfinite(w) or w < 0:
            raise InvalidRequestError(f"weight #{i} must be finite and >= 0, got {w}")
        counts[key] = counts.get(key, 0.0) + w
        parsed += 1
    if not counts:
        return VoteResult(None, {}, 0.0, 0, len(answers))
    best = max(counts.values())
    winner = next(k for k, v in counts.items() if v == best)  # dict order = first appearance
    total = sum(counts.values())
    return VoteResult(winner, counts, best / total if total else 0.0, parsed, len(answers) - parsed)


def beta_confidence(a: int, b: int) -> float:
    """P(p > 0.5) for p ~ Beta(a + 1, b + 1), exactly: P(Binomial(a + b + 1, 1/2) <= a)."""
    n = a + b + 1
    return sum(math.comb(n, i) for i in range(a + 1)) / 2**n


def should_stop(result: VoteResult, drawn: int, *, rule: StoppingRule | str, threshold: float, min_samples: int,
                max_samples: int) -> bool:
    """Whether to stop sampling after `drawn` samples with this vote so far."""
    if drawn >= max_samples:
        return True
    if drawn < min_samples or result.winner is None:
        return False
    rule = StoppingRule(rule)
    counts = sorted(result.counts.values(), reverse=True)
    if rule is StoppingRule.FIXED:
        return False
    if rule is StoppingRule.MAJORITY:
        return result.agreement >= threshold
    if rule is StoppingRule.BETA:
        a = round(counts[0])
        b = round(counts[1]) if len(counts) > 1 else 0
        return beta_confidence(a, b) >= threshold
    total = sum(counts)
    if len(counts) == 1:
        return True
    entropy = -sum(c / total * math.log(c / total) for c in counts if c > 0) / math.log(len(counts))
    return entropy <= 1 - threshold
