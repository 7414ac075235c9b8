"""Voting and stopping rules."""

from __future__ import annotations

import pytest

from detot_agent.detot.task import StoppingRule
from detot_agent.detot.voting import beta_confidence, should_stop, vote


def test_vote_counts_weights_and_ties():
    r = vote(["7", None, "8", "7"])
    assert (r.winner, r.counts, r.parsed, r.unparsed) == ("7", {"7": 2.0, "8": 1.0}, 3, 1)
    assert r.agreement == pytest.approx(2 / 3)
    assert vote(["8", "7"]).winner == "8"  # tie: first seen wins
    assert vote(["8", "7"], weights=[0.2, 0.9]).winner == "7"
    assert vote([None, None]).winner is None and vote([None]).unparsed == 1
    with pytest.raises(ValueError, match="weights"):
        vote(["1"], weights=[1.0, 2.0])


def test_beta_confidence_matches_the_beta_integral():
    from scipy.stats import beta

    for a, b in [(2, 0), (3, 1), (5, 2), (10, 9)]:
        assert beta_confidence(a, b) == pytest.approx(1 - beta.cdf(0.5, a + 1, b + 1))


SEQUENCES = {
    "unanimous": ["7"] * 8,
    "split": ["7", "8"] * 4,
    "late-majority": ["7", "8", "7", "7", "7", "7", "7", "7"],
}


def _first_stop(seq, rule, threshold, *, min_samples=2, max_samples=8, round_size=2):
    drawn = 0
    while True:
        drawn = min_samples if drawn == 0 else min(drawn + round_size, max_samples)
        if should_stop(vote(seq[:drawn]), drawn, rule=rule, threshold=threshold, min_samples=min_samples,
                       max_samples=max_samples):
            return drawn


@pytest.mark.parametrize(("name", "rule", "threshold", "expected"), [
    ("unanimous", StoppingRule.FIXED, 0.95, 8),
    ("unanimous", StoppingRule.BETA, 0.95, 4),      # 4-0: P = 0.969
    ("unanimous", StoppingRule.MAJORITY, 0.9, 2),
    ("unanimous", StoppingRule.ENTROPY, 0.9, 2),
    ("split", StoppingRule.BETA, 0.95, 8),
    ("split", StoppingRule.MAJORITY, 0.6, 8),
    ("split", StoppingRule.ENTROPY, 0.5, 8),
    ("late-majority", StoppingRule.BETA, 0.95, 8),  # 7-1 only at 8: 6-1 gives 0.965 at 7 (not a round)
    ("late-majority", StoppingRule.BETA, 0.9, 6),   # 5-1: P = 0.9375
    ("late-majority", StoppingRule.MAJORITY, 0.75, 4),
])
def test_stopping_rules_on_known_sequences(name, rule, threshold, expected):
    assert _first_stop(SEQUENCES[name], rule, threshold) == expected


def test_no_parse_never_stops_early():
    assert not should_stop(vote([None, None]), 2, rule="majority", threshold=0.5, min_samples=2, max_samples=8)
    assert should_stop(vote([None] * 8), 8, rule="beta", threshold=0.95, min_samples=2, max_samples=8)
