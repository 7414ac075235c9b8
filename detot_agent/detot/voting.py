"""Voting and adaptive stopping for self-consistency.

`vote` counts answer keys (optionally weighted); ties go to the key whose first sample
came earliest. `should_stop` applies a stopping rule to the counts so far:

- `fixed`: never early; draw the whole budget;
- `majority`: stop when the winner's share reaches the threshold;
- `beta`: Adaptive-Consistency: with a votes for the winner and b for the runner-up,
  stop when P(p > 0.5) >= threshold for p ~ Beta(a + 1, b + 1);
- `entropy`: stop when the normalised entropy of the vote falls to 1 - threshold or below;
- `confidence`: stop when the winner's share of the *confidence-weighted* vote reaches the threshold
  (DeepConf's online consensus stop, Fu et al. 2025, on whole samples).

Votes may be weighted by each sample's confidence, its mean token log-probability
(`confidence`), by `vote_weights`:

- `uniform`: one vote each (plain self-consistency);
- `cisc`: confidence-informed self-consistency (Taubenfeld et al. 2025): weights are the softmax of
  the confidences over the question's samples at a temperature (`cisc_temperature`); a confident
  minority can outvote an unconfident majority;
- `filter`: DeepConf's offline filter (Fu et al. 2025): only the most confident `keep_fraction` of the
  samples vote (at least one), one vote each.

What the engines report is a sample's summed log-probability, not per-token values as they are
generated, so DeepConf's per-token group confidence and its trace-level early termination are not
available here; these rules use the whole-sample mean instead. A sample without a log-probability
(the rollout path) makes the vote uniform.

Keys come from `detot_agent.answers.normalize`.

Example:
    >>> vote(["7", "7", "8"]).winner
    '7'
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from detot_agent.detot.task import StoppingRule, Weighting
from detot_agent.errors import InvalidRequestError

__all__ = ["VoteResult", "beta_confidence", "confidence", "should_stop", "vote", "vote_weights"]

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


def confidence(logprob: float | None, tokens: int) -> float | None:
    """A sample's confidence: its mean token log-probability (None when unknown or empty).

    Example:
        >>> confidence(-3.0, 6), confidence(None, 6), confidence(-1.0, 0)
        (-0.5, None, None)
    """
    if logprob is None or tokens < 1 or not math.isfinite(logprob):
        return None
    return logprob / tokens


def vote_weights(confidences: Sequence[float | None], *, weighting: Weighting | str, temperature: float = 0.1,
                 keep_fraction: float = 0.9) -> list[float] | None:
    """Vote weights for samples with these confidences (None: vote uniformly).

    Example:
        >>> [round(w, 3) for w in vote_weights([-0.1, -0.1, -0.9], weighting="cisc", temperature=0.5)]
        [0.454, 0.454, 0.092]
        >>> vote_weights([-0.1, -0.5, -0.9, -0.3], weighting="filter", keep_fraction=0.5)
        [1.0, 0.0, 0.0, 1.0]
    """
    weighting = Weighting(weighting)
    if weighting is Weighting.UNIFORM or not confidences or any(c is None for c in confidences):
        return None
    conf = [float(c) for c in confidences if c is not None]
    if weighting is Weighting.CISC:
        if not temperature > 0:
            raise InvalidRequestError(f"cisc temperature must be > 0, got {temperature}")
        top = max(conf)
        exps = [math.exp((c - top) / temperature) for c in conf]  # softmax, shifted for stability
        total = sum(exps)
        return [e / total for e in exps]
    if not 0 < keep_fraction <= 1:
        raise InvalidRequestError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
    keep = max(1, math.ceil(keep_fraction * len(conf)))
    ranked = sorted(range(len(conf)), key=lambda i: (-conf[i], i))  # ties: the earlier sample
    kept = set(ranked[:keep])
    return [1.0 if i in kept else 0.0 for i in range(len(conf))]


def beta_confidence(a: int, b: int) -> float:
    """P(p > 0.5) for p ~ Beta(a + 1, b + 1), exactly: P(Binomial(a + b + 1, 1/2) <= a)."""
    n = a + b + 1
    return sum(math.comb(n, i) for i in range(a + 1)) / 2**n


def should_stop(result: VoteResult, drawn: int, *, rule: StoppingRule | str, threshold: float, min_samples: int,
                max_samples: int, weighted: VoteResult | None = None) -> bool:
    """Whether to stop sampling after `drawn` samples with this vote so far.

    `result` is the one-vote-per-sample count (the count rules read it); `weighted` the confidence-weighted
    vote that the `confidence` rule reads (default: `result`).

    Example:
        >>> weighted = vote(["7", "8", "8"], [0.8, 0.1, 0.1])
        >>> should_stop(vote(["7", "8", "8"]), 3, rule="confidence", threshold=0.75, min_samples=2, max_samples=8,
        ...             weighted=weighted)
        True
    """
    if drawn >= max_samples:
        return True
    if drawn < min_samples or result.winner is None:
        return False
    rule = StoppingRule(rule)
    counts = sorted(result.counts.values(), reverse=True)
    if rule is StoppingRule.FIXED:
        return False
    if rule is StoppingRule.CONFIDENCE:
        decided = weighted if weighted is not None else result
        return decided.winner is not None and decided.agreement >= threshold
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
